"""Region repair resamples only what its mask flags."""

import torch

from models.diffusion.text_to_image import load_text_to_image
from models.feedback.repair import latent_mask, repair, resample_masked
from tests.models.diffusion.test_diffusers_export import PROMPTS, _recapflow_export


def test_masked_resampling_keeps_every_unmasked_latent_and_redraws_the_masked(tmp_path):
    _recapflow_export(tmp_path / "model", "recapflow-tiny-vae")
    pipe = load_text_to_image(tmp_path / "model")
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    known = torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 1, s, s)
    mask[0, :, : s // 2] = 1  # the top half of the first image only
    out = resample_masked(
        pipe.unet, pipe.text_encoder, known, mask, PROMPTS, pipe.diffusion, steps=3
    )
    keep = mask.expand_as(known) == 0
    assert torch.equal(out[keep], known[keep])
    assert not torch.allclose(out[~keep], known[~keep])
    # the same seed redraws the same region
    again = resample_masked(
        pipe.unet, pipe.text_encoder, known, mask, PROMPTS, pipe.diffusion, steps=3
    )
    assert torch.equal(out, again)


def test_a_flagged_pixel_flags_the_latent_it_decodes_to():
    pixels = torch.zeros(1, 32, 32, dtype=torch.bool)
    pixels[0, 0, 31] = True  # the top-right pixel
    m = latent_mask(pixels, 8)
    assert m.shape == (1, 1, 8, 8)
    assert m[0, 0, 0, 7] == 1 and m.sum() == 1


def test_repair_with_an_empty_mask_returns_the_images_autoencoded(tmp_path):
    _recapflow_export(tmp_path / "model", "recapflow-tiny-vae")
    pipe = load_text_to_image(tmp_path / "model")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    none = torch.zeros(2, 32, 32, dtype=torch.bool)
    out = repair(pipe, images, none, PROMPTS, steps=2)
    from models.diffusion.autoencoder import to_model_range, to_uint8

    with torch.no_grad():
        z = pipe.vae.encode(to_model_range(images)).latent_dist.mode()
        direct = to_uint8(pipe.vae.decode(z).sample.float())
    # the same latents, scaled and unscaled on the way: equal up to rounding
    assert (out.int() - direct.int()).abs().max() <= 1
