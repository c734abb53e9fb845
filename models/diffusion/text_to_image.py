"""The exported text-to-image folder (what `diffusion_model` writes), loaded for sampling.

One loader for the MLflow pyfunc and the eval report, so both sample the same model the
same way: `unet/`, `vae/`, `text_encoder/` and `train_config.json` of the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# What a folder's train_config.json `eval` holds that changes the images drawn for a
# prompt, seed, step count and guidance scale (a cache of drawn images keys on these).
SAMPLING_KEYS = ("sampler", "spacing", "clip_sample", "guidance_min_t", "layout_guidance")


def sampling_settings(root: Path) -> dict:
    """The SAMPLING_KEYS of the exported model at `root` (None where its config has none)."""
    cfg = json.loads((Path(root) / "train_config.json").read_text())["eval"]
    return {k: cfg.get(k) for k in SAMPLING_KEYS}


class MissingModelError(FileNotFoundError):
    """The text-to-image folder is not a complete export."""


@dataclass
class TextToImagePipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: object
    diffusion: object  # models.diffusion.model.DiffusionConfig
    eval_cfg: dict

    def to(self, device: str | torch.device) -> TextToImagePipeline:
        self.unet.to(device)
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    def __call__(
        self,
        prompts: list[str],
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 128,
    ) -> torch.Tensor:
        """uint8 (N, 3, H, W) images; the same seed gives the same images."""
        from models.diffusion.model import generate

        return generate(
            self.unet,
            self.vae,
            self.text_encoder,
            prompts,
            self.diffusion,
            seed=seed,
            steps=self.eval_cfg["steps"] if steps is None else steps,
            guidance_scale=(
                self.eval_cfg["guidance_scale"] if guidance_scale is None else guidance_scale
            ),
            batch_size=batch_size,
            sampler=self.eval_cfg.get("sampler", "ddim"),
            spacing=self.eval_cfg.get("spacing", "leading"),
            clip_sample=self.eval_cfg.get("clip_sample"),
            guidance_min_t=self.eval_cfg.get("guidance_min_t", 0),
            layout_guidance=self.eval_cfg.get("layout_guidance", 1.0),
        )


def load_text_to_image(root: Path) -> TextToImagePipeline:
    from corpus.config import build_config
    from models.diffusion.model import DiffusionConfig, load_unet
    from models.diffusion.patch_autoencoder import load_trained_autoencoder
    from models.diffusion.text_encoder import load_text_encoder

    root = Path(root)
    missing = [
        p for p in ("unet", "vae", "text_encoder", "train_config.json") if not (root / p).exists()
    ]
    if missing:
        raise MissingModelError(
            f"{root} is not an exported text-to-image model (missing {missing}); "
            "materialize the diffusion_model asset first"
        )
    cfg = json.loads((root / "train_config.json").read_text())
    return TextToImagePipeline(
        unet=load_unet(root / "unet").eval(),
        vae=load_trained_autoencoder(root / "vae").eval(),
        text_encoder=load_text_encoder(
            root / "text_encoder", cfg["text_encoder"]["context_length"]
        ),
        diffusion=build_config(DiffusionConfig, cfg["diffusion"], "diffusion_model.diffusion"),
        eval_cfg=cfg["eval"],
    )
