"""Can the UNet learn to draw shapes? A small, fast proxy of the generator's training.

Single-object scenes rendered in memory (no corpus, no caches), their ground-truth
descriptive captions, the UNet trained with `LatentDiffusion.diffusion_loss` in a plain
loop, then one sample per (shape, colour, size, cell) combination read by the world judge:
the share of objects drawn, and of those the share with the prompted shape. The world can
be narrowed (`--cells`, `--sizes`, `--backgrounds`) to find where learning shape stops.

    python -m benchmarks.shape_probe --text-encoder data/exp/work/e3/text_encoder \
        --cells 4 --sizes large --steps 400 --out data/probe/a
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers.training_utils import EMAModel

from corpus.scene_text import descriptive_caption
from corpus.world import BACKGROUNDS, CELL_NAMES, COLORS, SHAPES, SIZES, Scene, SceneObject
from models.common.clip import warmup_cosine_adamw
from models.diffusion.autoencoder import image_grid, to_model_range
from models.diffusion.model import (
    DiffusionConfig,
    LatentDiffusion,
    UNetConfig,
    build_unet,
    generate,
)
from models.diffusion.patch_autoencoder import PatchAutoencoder
from models.diffusion.text_encoder import clip_text_features, load_text_encoder
from models.evaluation.world_judge import load_judge, render_scenes

CELLS = sorted(CELL_NAMES)


def world(cells: int, sizes: list[str], backgrounds: list[str]) -> list[tuple]:
    """Every (shape, colour, size, cell, background) of the narrowed world."""
    return list(itertools.product(SHAPES, COLORS, sizes, CELLS[:cells], backgrounds))


def scene_of(item: tuple) -> Scene:
    shape, colour, size, (row, col), background = item
    return Scene((SceneObject(shape, colour, size, row, col),), background)


class ExtraPooled(torch.nn.Module):
    """The text encoder with more appended to its pooled vector: `shape`, the prompt's
    shape one-hot (a diagnostic: the UNet is told the shape without reading the text);
    `mean` / `max`, the mean / elementwise max of the caption's token states (padding
    left out); None, nothing. The pooled vector itself is first multiplied by
    `pooled_scale`."""

    def __init__(self, encoder, mode: str | None, scale: float, pooled_scale: float = 1.0):
        super().__init__()
        self.encoder, self.mode, self.scale = encoder, mode, scale
        self.pooled_scale = pooled_scale

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = self.encoder(texts)
        pooled = self.pooled_scale * pooled
        if self.mode is None:
            return states, pooled
        if self.mode == "shape":
            extra = torch.zeros(len(texts), len(SHAPES))
            for i, text in enumerate(texts):
                for j, shape in enumerate(SHAPES):
                    extra[i, j] = float(shape in text)
        else:
            ids = self.encoder.tokenize(texts)
            mask = (ids != self.encoder.tokenizer.pad_token_id).float()[..., None]
            if self.mode == "mean":
                extra = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            else:
                extra = states.masked_fill(mask == 0, -1e4).amax(1).clamp(min=-1e3)
        return states, torch.cat([pooled, self.scale * extra.to(pooled)], 1)

    def encode_all(self, texts: list[str], dtype: torch.dtype) -> tuple:
        states, pooled = self(texts)
        return states.to(dtype), pooled.to(dtype)


class TextTuner:
    """The text tower trained with the UNet (GLIDE trains its text transformer jointly):
    the captions' token ids encoded with gradients at every step, its own AdamW on the
    UNet's warmup-cosine schedule at `mult` times its lr, and an EMA that sampling uses,
    as the UNet's EMA is used."""

    def __init__(self, encoder, captions: list[str], mult: float, dcfg: DiffusionConfig):
        self.encoder, self.model = encoder, encoder.model
        self.model.requires_grad_(True)
        self.ids = encoder.tokenize(captions)
        self.empty = encoder.tokenize([""])[0]
        self.opt = warmup_cosine_adamw(
            self.model, dcfg.lr * mult, dcfg.weight_decay, dcfg.warmup_steps, dcfg.max_steps
        )
        self.ema = EMAModel(self.model.parameters(), decay=dcfg.ema_decay, use_ema_warmup=True)

    def encode(self, idx: torch.Tensor, drop: torch.Tensor) -> tuple:
        ids = self.ids[idx].clone()
        ids[drop] = self.empty
        return clip_text_features(self.model, ids, self.encoder.tokenizer.eos_token_id)

    def step(self) -> None:
        self.opt["optimizer"].step()
        self.opt["optimizer"].zero_grad(set_to_none=True)
        self.opt["lr_scheduler"]["scheduler"].step()
        self.ema.step(self.model.parameters())

    def use_ema(self) -> None:
        self.ema.copy_to(self.model.parameters())
        self.model.requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-encoder", type=Path, required=True)
    p.add_argument("--judge", type=Path, default=Path("data/world_judge"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cells", type=int, default=9, help="the first N of the 9 cells")
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--backgrounds", nargs="+", default=list(BACKGROUNDS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--guidance", type=float, nargs="+", default=[6.0])
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout for guidance")
    p.add_argument("--config", type=Path, help="yaml: {unet: {...}, diffusion: {...}}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="the UNet's init, batches and noise")
    p.add_argument("--extra-pooled", choices=["shape", "mean", "max"], default=None)
    p.add_argument("--extra-scale", type=float, default=1.0)
    p.add_argument(
        "--pooled-scale", type=float, default=1.0, help="multiply the pooled vector by this"
    )
    p.add_argument(
        "--tune-text",
        type=float,
        default=0.0,
        help="train the text tower with the UNet at this multiple of its lr (0: frozen)",
    )
    args = p.parse_args()
    if args.tune_text and (args.extra_pooled or args.pooled_scale != 1):
        p.error("--tune-text trains the tower's own outputs: no --extra-pooled, --pooled-scale")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(0)
    cfg = yaml.safe_load(args.config.read_text()) if args.config else {}
    items = world(args.cells, args.sizes, args.backgrounds)
    captions = [descriptive_caption(scene_of(i), rng) for i in items]
    encoder = load_text_encoder(args.text_encoder, 96)
    if args.extra_pooled or args.pooled_scale != 1:
        encoder = ExtraPooled(encoder, args.extra_pooled, args.extra_scale, args.pooled_scale)
    with torch.no_grad():
        states, pooled = encoder.encode_all(captions, dtype=torch.float32)
        empty_states, empty_pooled = encoder([""])
    renders = to_model_range(render_scenes([scene_of(i) for i in items], 32))
    pixels = PatchAutoencoder(patch_size=2, sample_size=32).encode(renders).latent_dist.mode()
    # Unit-variance latents, as the autoencoder asset's scaling factor gives the real runs.
    scale = float(1 / pixels.std())
    ae = PatchAutoencoder(patch_size=2, sample_size=32, scaling_factor=scale)
    latents = pixels * scale
    dcfg = DiffusionConfig(**{"max_steps": args.steps, **cfg.get("diffusion", {})})
    unet = build_unet(
        UNetConfig(**cfg.get("unet", {})), states.shape[-1], pooled.shape[-1], latents.shape[1:]
    )
    module = LatentDiffusion(unet, dcfg)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    tuner = TextTuner(encoder, captions, args.tune_text, dcfg) if args.tune_text else None
    print(f"{len(items)} scenes, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params")
    start, losses = time.time(), []
    for step in range(args.steps):
        idx = torch.randint(0, len(items), (args.batch,))
        drop = torch.rand(args.batch) < args.drop
        if tuner:
            s, pv = tuner.encode(idx, drop)
        else:
            s, pv = states[idx].clone(), pooled[idx].clone()
            s[drop], pv[drop] = empty_states[0], empty_pooled[0]
        loss = module.diffusion_loss({"latents": latents[idx], "states": s, "pooled": pv})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        module.ema.step(unet.parameters())
        if tuner:
            tuner.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            rate = (step + 1) * args.batch / (time.time() - start)
            print(f"step {step + 1} loss {np.mean(losses[-50:]):.4f} {rate:.0f} img/s", flush=True)
    train_s = time.time() - start
    # One sample of each combination (at most 448), judged, at each guidance scale.
    eval_items = items if len(items) <= 448 else random.Random(1).sample(items, 448)
    prompts = [descriptive_caption(scene_of(i), random.Random(2)) for i in eval_items]
    judge, ema = load_judge(args.judge), module.ema_unet()
    if tuner:
        tuner.use_ema()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "scenes": len(items),
        "steps": args.steps,
        "train_seconds": round(train_s, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "guidance": {},
        "config": cfg,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for guidance in args.guidance:
        images = generate(
            ema,
            ae,
            encoder,
            prompts,
            dcfg,
            seed=0,
            steps=args.sample_steps,
            guidance_scale=guidance,
        )
        result["guidance"][guidance] = score(eval_items, judge.predict(images))
        order = sorted(range(len(eval_items)), key=lambda i: SHAPES.index(eval_items[i][0]))
        image_grid(images[order[:56]], nrow=8, scale=3).save(args.out / f"samples_g{guidance}.png")
    (args.out / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("args", "config")}, indent=1))


def score(items: list[tuple], judged: list[Scene]) -> dict:
    """Share of prompted objects drawn in their cell, and of those with the prompted shape."""
    drawn, per_shape = [], {s: [] for s in SHAPES}
    for item, scene in zip(items, judged, strict=True):
        shape, _, _, (row, col), _ = item
        hit = [o for o in scene.objects if (o.row, o.col) == (row, col)]
        drawn.append(bool(hit))
        if hit:
            per_shape[shape].append(hit[0].shape == shape)
    shape_ok = [x for v in per_shape.values() for x in v]
    return {
        "drawn": round(float(np.mean(drawn)), 3),
        "shape_given_drawn": round(float(np.mean(shape_ok)), 3) if shape_ok else 0.0,
        "per_shape": {k: round(float(np.mean(v)), 2) if v else None for k, v in per_shape.items()},
    }


if __name__ == "__main__":
    main()
