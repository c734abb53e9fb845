"""Pixels as the latent space: space-to-depth (`pixel_unshuffle`) of p x p patches.

A 32 px image becomes a 16x16x12 (p=2) or 8x8x48 (p=4) latent that the decoder returns
exactly, so the UNet works at a small spatial size without an autoencoder that loses the
small shapes prompts are about, and there is nothing to train. It speaks the
`AutoencoderKL` interface recapflow and diffusers' pipelines use (`encode(x).latent_dist`,
`decode(z).sample`, `config.scaling_factor`), so a trained or pretrained `AutoencoderKL`
and this one are swapped in params.yaml alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin


class PatchAutoencoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 3,
        sample_size: int = 32,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch {patch_size}")
        # Parameter-free, but ModelMixin reads its dtype and device from a tensor it holds.
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """From the folder's config.json alone: there are no weights (diffusers' loader
        looks for a weights file, which `save_pretrained` does not write for this class)."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        model = cls.from_config(config)
        dtype = kwargs.get("torch_dtype")
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = F.pixel_unshuffle(x, self.config.patch_size)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1), True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        x = F.pixel_shuffle(z, self.config.patch_size)
        return DecoderOutput(sample=x) if return_dict else (x,)


def autoencoder_class(config: dict) -> type[AutoencoderKL] | type[PatchAutoencoder]:
    """The class a diffusers config (its `_class_name`) describes."""
    patch = config.get("_class_name") == PatchAutoencoder.__name__
    return PatchAutoencoder if patch else AutoencoderKL


def load_trained_autoencoder(folder: Path) -> AutoencoderKL | PatchAutoencoder:
    """The autoencoder saved in `folder` (a `save_pretrained` folder), whichever class."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return autoencoder_class(config).from_pretrained(folder)
