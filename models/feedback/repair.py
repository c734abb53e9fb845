"""Region repair: resample only the flagged regions of an image with the same UNet.

Inpainting by masked denoising (RePaint's replacement step, without its resampling
loops): the image is encoded to latents; at every DDIM step, the latents outside the mask
are replaced by the image's own latents noised to that step, so the model denoises the
masked region in the context of the rest; at the end the unmasked latents are exactly
the image's. A pixel mask becomes a latent mask by max-pooling: a latent is resampled
when any pixel it decodes to is flagged.
"""

from __future__ import annotations

import torch

from models.diffusion.autoencoder import to_model_range, to_uint8
from models.diffusion.model import sampling_scheduler


@torch.no_grad()
def resample_masked(
    unet: torch.nn.Module,
    text_encoder,
    known: torch.Tensor,
    mask: torch.Tensor,
    prompts: list[str],
    train_cfg,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 3.0,
    spacing: str = "leading",
) -> torch.Tensor:
    """Latents (N, C, h, w): `known` where `mask` (N, 1, h, w) is 0, resampled where 1."""
    if mask.shape[0] != known.shape[0] or mask.shape[-2:] != known.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit latents {tuple(known.shape)}")
    sched = sampling_scheduler("ddim", train_cfg, spacing)
    sched.set_timesteps(steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(known.shape, generator=gen)
    mask = mask.to(known.dtype)
    n = len(prompts)
    empty_states, empty_pooled = text_encoder([""])
    states, pooled = text_encoder(prompts)
    states = torch.cat([empty_states.expand(n, -1, -1), states])
    pooled = torch.cat([empty_pooled.expand(n, -1), pooled])
    class_labels = pooled if unet.config.class_embed_type == "projection" else None
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        kept = sched.add_noise(known, noise, t.view(1))
        latents = mask * latents + (1 - mask) * kept
        inp = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps = unet(inp, t, encoder_hidden_states=states, class_labels=class_labels).sample
        uncond, cond = eps.chunk(2)
        latents = sched.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    return mask * latents + (1 - mask) * known


def latent_mask(pixel_mask: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(N, H, W) bool pixels -> (N, 1, s, s) float latents, any flagged pixel counting."""
    m = pixel_mask.float()[:, None]
    return torch.nn.functional.adaptive_max_pool2d(m, latent_size)


@torch.no_grad()
def repair(
    pipe,
    images_uint8: torch.Tensor,
    pixel_mask: torch.Tensor,
    prompts: list[str],
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """The images with their masked regions resampled by `pipe`'s model
    (a `models.diffusion.text_to_image.TextToImagePipeline`)."""
    vae, scale = pipe.vae, pipe.vae.config.scaling_factor
    known = vae.encode(to_model_range(images_uint8)).latent_dist.mode() * scale
    mask = latent_mask(pixel_mask, known.shape[-1])
    latents = resample_masked(
        pipe.unet,
        pipe.text_encoder,
        known,
        mask,
        prompts,
        pipe.diffusion,
        seed=seed,
        steps=steps or pipe.eval_cfg["steps"],
        guidance_scale=guidance_scale or pipe.eval_cfg["guidance_scale"],
        spacing=pipe.eval_cfg.get("spacing", "leading"),
    )
    return to_uint8(vae.decode(latents / scale).sample.float())
