"""Pixels as the latent space: the patch autoencoder returns every image exactly, trains
nothing, and is saved and loaded by the same code as a trained AutoencoderKL."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.autoencoder import AutoencoderConfig, train_autoencoder
from models.diffusion.patch_autoencoder import PatchAutoencoder, load_trained_autoencoder


@pytest.mark.parametrize("patch", [2, 4])
def test_encode_decode_is_exact_and_folds_patches_into_channels(patch):
    ae = PatchAutoencoder(patch_size=patch)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = ae.encode(x).latent_dist.mode()
    assert z.shape == (3, 3 * patch * patch, 32 // patch, 32 // patch)
    assert torch.equal(ae.decode(z).sample, x)
    # The latent at (i, j) holds exactly the pixels of patch (i, j).
    assert torch.equal(
        z[0, :, 1, 2].reshape(3, patch, patch), x[0, :, patch : 2 * patch, 2 * patch : 3 * patch]
    )


def test_a_sample_size_that_is_not_a_multiple_of_the_patch_is_refused():
    with pytest.raises(ValueError, match="not a multiple of patch 3"):
        PatchAutoencoder(patch_size=3, sample_size=32)


def test_train_autoencoder_writes_a_lossless_patch_autoencoder_that_loads_back(tiny_raw, tmp_path):
    out = tmp_path / "autoencoder"
    # What a trained VAE left there before params.yaml switched to the patch autoencoder.
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"stale VAE weights")
    cfg = AutoencoderConfig(config="recapflow-tiny-patch", eval_images=16)
    metrics = train_autoencoder(cfg, tiny_raw, out)
    assert metrics["mean_abs_error"] == 0.0
    assert metrics["colour_kept"] == 1.0
    assert metrics["latent_shape"] == [12, 16, 16]
    ae = load_trained_autoencoder(out / "vae")
    assert isinstance(ae, PatchAutoencoder)
    assert ae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    # Nothing was learnt, and nothing of the previous autoencoder survives the rewrite.
    assert not list((out / "vae").glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoder"]
