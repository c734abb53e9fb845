"""The reference CLIP behind CLIP score, the report's headline metric.

CLIP score = 100 x cosine(image embedding, text embedding) per sample, averaged (no
clamp at 0; torchmetrics clamps). The report used public CLIP ViT-B/32; `full` loads it
(`model_name: ViT-B-32`, `pretrained:` a local weights file or tag) and trains nothing.
`tiny` trains the open_clip config `recapflow-tiny-reference-clip` contrastively on
ground-truth renders with their ground-truth descriptive captions (a seed disjoint from
the corpus), at the diffusion model's resolution. Both tokenize with open_clip's own
tokenizer and cut text at the model's context length (77 for CLIP): how many prompts
were cut is reported next to every score.

    python -m models.evaluation.reference_clip --params params.yaml --out data/reference_clip
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import torch
from safetensors.torch import load_file

from corpus.atomic import write_text_atomic
from corpus.config import build_config
from corpus.scene_text import descriptive_caption
from models.common.clip import ClipPretrainModule, clip_preprocess_cfg, create_clip, save_clip
from models.common.data import normalize_images
from models.evaluation.world_judge import render_scenes, sample_scenes

TINY_MODEL = "recapflow-tiny-reference-clip"


class MissingReferenceClipError(FileNotFoundError):
    """The reference CLIP folder lacks its weights or config."""


@dataclass(frozen=True)
class ReferenceClipConfig:
    model_name: str = TINY_MODEL
    pretrained: str | None = None  # full: local open_clip weights (or tag); no training
    resolution: int = 32  # renders are read at the diffusion model's image size
    train_images: int = 16_000
    eval_images: int = 512
    max_steps: int = 500
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 4_000_037  # apart from the corpus, the judge and the prompt suite

    @classmethod
    def from_dict(cls, d: dict) -> ReferenceClipConfig:
        return build_config(cls, d, "reference_clip")


class ReferenceClip:
    """An open_clip model and its tokenizer, scoring uint8 images against texts."""

    def __init__(self, model: torch.nn.Module, model_name: str):
        self.model = model.eval()
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.image_size, self.mean, self.std = clip_preprocess_cfg(model)
        self.context_length = self.tokenizer.context_length

    def truncated(self, texts: list[str]) -> list[bool]:
        """Which texts are cut at the context length (start and end tokens included)."""
        return [len(self.tokenizer.encode(t)) + 2 > self.context_length for t in texts]

    @torch.no_grad()
    def score(self, images_uint8: torch.Tensor, texts: list[str], batch_size: int = 256):
        """Per-sample CLIP score, 100 x cosine, as a float numpy array."""
        if len(images_uint8) != len(texts):
            raise ValueError(f"{len(images_uint8)} images but {len(texts)} texts")
        out = []
        for i in range(0, len(texts), batch_size):
            x = normalize_images(
                images_uint8[i : i + batch_size], self.image_size, self.mean, self.std
            )
            img = self.model.encode_image(x, normalize=True)
            txt = self.model.encode_text(self.tokenizer(texts[i : i + batch_size]), normalize=True)
            out.append((100 * (img * txt).sum(-1)).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def _pairs(n: int, seed: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    scenes = sample_scenes(n, seed, word_prob=0.2)
    rng = random.Random(seed + 1)
    return render_scenes(scenes, resolution), [descriptive_caption(s, rng) for s in scenes]


def retrieval_metrics(clip: ReferenceClip, images: torch.Tensor, texts: list[str]) -> dict:
    """Image->text top-1 retrieval among the held-out set, and the mean CLIP score of true
    pairs against pairs shifted by one (what a score that reads the image separates)."""
    with torch.no_grad():
        x = normalize_images(images, clip.image_size, clip.mean, clip.std)
        img = clip.model.encode_image(x, normalize=True)
        txt = clip.model.encode_text(clip.tokenizer(texts), normalize=True)
    sims = 100 * img @ txt.T
    top1 = sims.argmax(1).eq(torch.arange(len(texts))).float().mean().item()
    return {
        "image_to_text_top1": top1,
        "chance_top1": 1 / len(texts),
        "clip_score_true_pairs": sims.diag().mean().item(),
        "clip_score_shuffled_pairs": sims.roll(1, dims=1).diag().mean().item(),
        "truncated_share": float(np.mean(clip.truncated(texts))),
        "eval_pairs": len(texts),
    }


def train_reference_clip(
    cfg: ReferenceClipConfig, out: Path, logger: L.pytorch.loggers.Logger | None = None
) -> dict:
    """Train (tiny) or load (full) the reference CLIP, score it on held-out renders, save."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    module = ClipPretrainModule(
        cfg.model_name,
        cfg.pretrained,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
    )
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    if cfg.pretrained is None:
        images, texts = _pairs(cfg.train_images, cfg.seed, cfg.resolution)
        data = torch.utils.data.TensorDataset(images, tokenizer(texts))
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=lambda b: {
                "images": torch.stack([x for x, _ in b]),
                "text": torch.stack([t for _, t in b]),
            },
        )
        trainer = L.Trainer(
            max_steps=cfg.max_steps,
            accelerator="auto",
            devices=1,
            logger=logger or False,
            enable_checkpointing=False,
            log_every_n_steps=25,
            enable_model_summary=False,
        )
        trainer.fit(module, loader)
    clip = ReferenceClip(module.model.cpu(), cfg.model_name)
    held_images, held_texts = _pairs(cfg.eval_images, cfg.seed + 7, cfg.resolution)
    metrics = {
        **retrieval_metrics(clip, held_images, held_texts),
        "context_length": clip.context_length,
        "trained": cfg.pretrained is None,
        "seconds": round(time.time() - t0, 1),
        "config": asdict(cfg),
    }
    save_reference_clip(clip, out, cfg, metrics)
    return metrics


def save_reference_clip(
    clip: ReferenceClip, out: Path, cfg: ReferenceClipConfig, metrics: dict
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_clip(clip.model, cfg.model_name, out)
    write_text_atomic(out / "reference_clip.json", json.dumps(asdict(cfg), indent=2))
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))


def load_reference_clip(path: Path) -> ReferenceClip:
    path = Path(path)
    weights, config = path / "model.safetensors", path / "config.json"
    if not weights.is_file() or not config.is_file():
        raise MissingReferenceClipError(
            f"no reference CLIP in {path} (expected model.safetensors and config.json); "
            "materialize the reference_clip asset or run "
            f"`python -m models.evaluation.reference_clip --out {path}`"
        )
    name = json.loads(config.read_text())["model_name"]
    model = create_clip(name)
    model.load_state_dict(load_file(weights))
    return ReferenceClip(model, name)


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, ReferenceClipConfig)
    args = ap.parse_args()
    cfg = config_from_args(ReferenceClipConfig, args, "reference_clip")
    metrics = train_reference_clip(cfg, args.out)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
