"""The latent space: a diffusers `AutoencoderKL`, trained on the synthetic world for
`tiny` (config in models/configs/) or loaded pretrained for `full` (hub id or path).

Latent diffusion in both profiles is one code path: images are encoded once, latents are
cached and the UNet never sees pixels. The autoencoder is checked on its own so that it
is never the hidden bottleneck of prompt following: `colour_kept` is the share of object
pixels whose palette colour survives encode -> decode.

    python -m models.diffusion.autoencoder --params params.yaml --raw data/raw \
        --out data/autoencoder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.callbacks import TQDMProgressBar
from PIL import Image
from torchvision.utils import make_grid

from corpus.atomic import replace_dir
from corpus.config import build_config
from corpus.palette import colour_kept
from corpus.params import load_section
from models import CONFIG_DIR
from models.common.clip import warmup_cosine_adamw
from models.common.data import load_images
from models.diffusion.patch_autoencoder import PatchAutoencoder, autoencoder_class
from models.evaluation.world_judge import (
    WorldJudge,
    judge_accuracy,
    load_judge,
    render_scenes,
    sample_scenes,
)


class MissingAutoencoderError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class AutoencoderConfig:
    config: str = "recapflow-tiny-vae"  # a config in models/configs (tiny) ...
    overrides: dict | None = None  # ... with its fields changed from params.yaml ...
    pretrained: str | None = None  # ... or a diffusers AutoencoderKL path / hub id (full)
    subfolder: str | None = None  # e.g. "vae" inside a full pipeline folder
    resolution: int = 32
    max_steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    sample_posterior: bool = False
    # Objects cover a few % of a synthetic-world image; unweighted, the background's
    # error dominates and objects (what prompts are about) are learned last.
    foreground_weight: float = 10.0
    eval_images: int = 256
    min_colour_kept: float = 0.95  # the asset check's threshold
    # The scene check: the world judge reads reconstructions of fresh renders; each kind
    # in SCENE_KINDS must stay at least this accurate (word is reported, not required).
    scene_images: int = 1000
    min_scene_kept: float = 0.97
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        return build_config(cls, d, "autoencoder")


def load_autoencoder(path_or_id: str, subfolder: str | None = None) -> AutoencoderKL:
    """A pretrained AutoencoderKL from a local folder or a hub id (offline machines need
    the folder: `huggingface-cli download <id>` elsewhere, then point `pretrained` at it)."""
    try:
        return AutoencoderKL.from_pretrained(path_or_id, subfolder=subfolder)
    except OSError as e:
        raise MissingAutoencoderError(
            f"could not load AutoencoderKL {path_or_id!r} (subfolder {subfolder!r}): {e}. "
            "Give a local folder holding config.json and diffusion_pytorch_model.safetensors, "
            "or a hub id on a machine that can reach the hub."
        ) from e


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | PatchAutoencoder:
    if cfg.pretrained:
        return load_autoencoder(cfg.pretrained, cfg.subfolder)
    config = json.loads((CONFIG_DIR / f"{cfg.config}.json").read_text())
    config.update(cfg.overrides or {})
    return autoencoder_class(config).from_config(config)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def foreground_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """(N, 1, H, W): `weight` where a pixel differs from its image's background (the
    median colour of the border), 1 elsewhere."""
    if weight == 1.0:
        return torch.ones_like(x[:, :1])
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    differs = (x - background).abs().amax(1, keepdim=True) > 0.1
    return 1.0 + (weight - 1.0) * differs.float()


class AutoencoderModule(L.LightningModule):
    """Reconstruction (L1 + MSE) with a small KL term, as in latent diffusion's VAE."""

    def __init__(self, vae: AutoencoderKL, cfg: AutoencoderConfig):
        super().__init__()
        self.vae, self.cfg = vae, cfg

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = to_model_range(batch)
        posterior = self.vae.encode(x).latent_dist
        # A sampled latent at initialisation carries noise of std ~1 that drowns the
        # image signal; the mean learns in minutes what the sample learns in hours on a CPU.
        z = posterior.sample() if self.cfg.sample_posterior else posterior.mode()
        recon = self.vae.decode(z).sample
        err = (recon - x).abs() + (recon - x).pow(2)
        rec = (err * foreground_weight(x, self.cfg.foreground_weight)).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + self.cfg.kl_weight * kl
        self.log_dict({"vae/loss": loss, "vae/recon": rec}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return warmup_cosine_adamw(
            self.vae, self.cfg.lr, 0.0, self.cfg.warmup_steps, self.cfg.max_steps
        )


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images_uint8: torch.Tensor, batch: int = 128) -> torch.Tensor:
    vae.eval()
    out = []
    for i in range(0, len(images_uint8), batch):
        x = to_model_range(images_uint8[i : i + batch])
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    return torch.cat(out)


def image_grid(images_uint8: torch.Tensor, nrow: int = 8, scale: int = 1) -> Image.Image:
    """uint8 (N, 3, H, W) as one PIL grid (each image upscaled `scale` times, nearest)."""
    grid = make_grid(images_uint8, nrow=nrow, padding=1, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def _hwc(images_uint8: torch.Tensor) -> np.ndarray:
    return images_uint8.permute(0, 2, 3, 1).numpy()


def psnr(original: torch.Tensor, recon: torch.Tensor) -> float:
    mse = (original.float() - recon.float()).pow(2).mean().item()
    return float(10 * math.log10(255.0**2 / max(mse, 1e-10)))


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images_uint8: torch.Tensor) -> float:
    """1 / std of the latents, so the diffusion model sees unit-variance inputs (what
    Stable Diffusion's 0.18215 is for its VAE)."""
    vae.eval()
    z = vae.encode(to_model_range(images_uint8[:512])).latent_dist.mode()
    return float(1.0 / z.std().item())


SCENE_KINDS = ("shape", "colour", "size", "position", "count")
SCENE_SEED = 3_000_029  # disjoint from the corpus, the judge's and the prompt suite's seeds


def scene_kept(vae: AutoencoderKL, judge: WorldJudge, n: int, resolution: int) -> dict:
    """The world judge's accuracy per attribute kind on reconstructions of `n` fresh
    renders, next to its accuracy on the renders themselves (what the autoencoder loses
    is the difference)."""
    scenes = sample_scenes(n, SCENE_SEED, word_prob=0.5)
    renders = render_scenes(scenes, resolution)
    recon = reconstruct(vae, renders)
    return {
        "reconstructed": judge_accuracy(scenes, judge.predict(recon)),
        "rendered": judge_accuracy(scenes, judge.predict(renders)),
        "images": n,
    }


def scene_check(metrics: dict) -> dict[str, float]:
    """Kinds of SCENE_KINDS the reconstructions lose (accuracy below the threshold)."""
    kept = metrics["scene_kept"]["reconstructed"]
    bar = metrics["config"]["min_scene_kept"]
    return {k: kept[k] for k in SCENE_KINDS if kept[k] < bar}


def _split_images(raw: Path, split: str, size: int, limit: int | None = None) -> torch.Tensor:
    index = pd.read_parquet(raw / "index.parquet", columns=["key", "shard", "split"])
    rows = index[index["split"] == split].sort_values("key")
    if limit:
        rows = rows.head(limit)
    return load_images(raw, rows["key"].tolist(), rows["shard"].tolist(), size)


def train_autoencoder(
    cfg: AutoencoderConfig,
    raw: Path,
    out: Path,
    logger: L.pytorch.loggers.Logger | None = None,
    judge: Path | None = None,
) -> dict:
    """Train (tiny) or load (full) the autoencoder, measure it on held-out images (and,
    given a world judge folder, on the scenes it keeps) and save it with
    `save_pretrained` (safetensors); returns the metrics written to `out/metrics.json`."""
    L.seed_everything(cfg.seed, verbose=False)
    vae = build_autoencoder(cfg)
    t0 = time.perf_counter()
    if not cfg.pretrained and any(p.requires_grad for p in vae.parameters()):
        images = _split_images(raw, "train", cfg.resolution)
        loader = torch.utils.data.DataLoader(
            images, batch_size=cfg.batch_size, shuffle=True, drop_last=True
        )
        trainer = L.Trainer(
            max_steps=cfg.max_steps,
            accelerator="auto",
            devices=1,
            logger=logger or False,
            enable_checkpointing=False,
            callbacks=[TQDMProgressBar(refresh_rate=20)],
            log_every_n_steps=20,
        )
        trainer.fit(AutoencoderModule(vae, cfg), loader)
    train_seconds = time.perf_counter() - t0
    vae = vae.cpu().eval()
    held_out = _split_images(raw, "eval", cfg.resolution, cfg.eval_images)
    recon = reconstruct(vae, held_out)
    scaling = latent_scaling_factor(vae, held_out)
    vae.register_to_config(scaling_factor=scaling)
    metrics = {
        "colour_kept": colour_kept(_hwc(held_out), _hwc(recon)),
        "psnr_db": psnr(held_out, recon),
        "mean_abs_error": float((held_out.float() - recon.float()).abs().mean()),
        "scaling_factor": scaling,
        "latent_shape": list(vae.encode(to_model_range(held_out[:1])).latent_dist.mode().shape[1:]),
        "eval_images": len(held_out),
        "train_seconds": train_seconds,
        "config": asdict(cfg),
    }
    if judge is not None:
        metrics["scene_kept"] = scene_kept(vae, load_judge(judge), cfg.scene_images, cfg.resolution)
    # Written whole into a fresh folder, then swapped in: a previous autoencoder's files
    # (a VAE's weights beside a patch autoencoder's config) must not survive a rewrite.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pairs = torch.stack([held_out[:16], recon[:16]], 1).flatten(0, 1)
    image_grid(pairs, nrow=8, scale=4).save(tmp / "reconstructions.png")
    replace_dir(tmp, out)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description="Train or load the latent autoencoder.")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--out", type=Path, default=Path("data/autoencoder"))
    ap.add_argument("--judge", type=Path, default=None, help="world judge folder (scene check)")
    args = ap.parse_args()
    cfg = AutoencoderConfig.from_dict(load_section(args.params, "autoencoder"))
    print(json.dumps(train_autoencoder(cfg, args.raw, args.out, judge=args.judge), indent=2))


if __name__ == "__main__":
    main()
