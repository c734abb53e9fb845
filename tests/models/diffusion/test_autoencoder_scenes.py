"""The autoencoder's scene check: the world judge reads reconstructions as it reads the
renders, so an autoencoder that returns blobs fails it whatever its PSNR."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from models.diffusion.autoencoder import SCENE_KINDS, scene_check, scene_kept
from models.evaluation.world_judge import load_judge


class _Pooling(torch.nn.Module):
    """An AutoencoderKL stand-in: latents are the image average-pooled by `factor`,
    decoded by bilinear upsampling (factor 1: the identity)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def encode(self, x: torch.Tensor):
        z = F.avg_pool2d(x, self.factor) if self.factor > 1 else x
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: z))

    def decode(self, z: torch.Tensor):
        x = F.interpolate(z, scale_factor=self.factor, mode="bilinear") if self.factor > 1 else z
        return SimpleNamespace(sample=x)


def _check(kept: dict) -> dict[str, float]:
    return scene_check({"scene_kept": kept, "config": {"min_scene_kept": 0.97}})


def test_a_blob_making_autoencoder_fails_the_scene_check_naming_shape(judge_dir):
    judge = load_judge(judge_dir)
    kept = scene_kept(_Pooling(8), judge, n=200, resolution=judge.cfg.resolution)
    assert "shape" in _check(kept)
    assert kept["reconstructed"]["shape"] < kept["rendered"]["shape"] - 0.2


def test_a_lossless_autoencoder_keeps_what_the_judge_reads_on_renders(judge_dir):
    judge = load_judge(judge_dir)
    kept = scene_kept(_Pooling(1), judge, n=200, resolution=judge.cfg.resolution)
    assert kept["reconstructed"] == kept["rendered"]
    assert set(SCENE_KINDS) <= set(kept["reconstructed"])
    assert kept["images"] == 200
