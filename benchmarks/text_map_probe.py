"""Can the text map learn to put a caption's objects in their cells? The map alone, without
the UNet: `TextMap` (models/diffusion/text_map.py) and a 1x1 head trained to draw the
clean latent of ground-truth renders from their descriptive captions (the
`diffusion.map_loss` objective of models/diffusion/model.py), on a frozen text tower;
then its drawing of fresh one-object scenes, read by the world judge (where the drawn
objects stand against the prompted cell, as benchmarks/text_map_reading.py reads a
model's images), and how far apart the nine cells' readings of the captions are.

Variants: `--pad-mask` (padding tokens masked out of the attention), `--free-queries`
(each latent position a learnt query instead of sine features through an MLP),
`--over-positions` (the attention normalised over the positions instead of the tokens,
as Slot Attention normalises over its slots: each token chooses where it goes, and a
place sums what chose it; padding left out), `--sigmoid` (each place weighs each token
by a sigmoid of their score, biased by -log of the caption's length, with no softmax:
Ramapuram et al. 2024; the tokens do not compete for a place, padding left out),
`--sine-queries S` (each place's query is its fixed sine features times a learnt scale
that starts at S, no MLP: the places differ from the first step).

    python -m benchmarks.text_map_probe --text-encoder data/diffusion_model/text_encoder \
        [--pad-mask] [--free-queries] [--steps 1500] [--sampler data/mixed_sampler]

`--sampler` trains on the lineage's own images (`--raw`) and the synthetic captions the
mixed sampler holds (the recaptioned dataset's) instead of fresh renders with their
ground-truth captions: what `diffusion.map_pretrain_steps` trains on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from benchmarks.text_map_reading import cell_reading_distance, placement
from corpus.scene_text import descriptive_caption
from corpus.world import (
    BACKGROUNDS,
    CELL_NAMES,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    WorldConfig,
    sample_scene,
)
from models.common.clip import warmup_cosine_adamw
from models.common.data import load_images
from models.diffusion.autoencoder import to_model_range, to_uint8
from models.diffusion.model import foreground_weights
from models.diffusion.patch_autoencoder import PatchAutoencoder
from models.diffusion.text_encoder import load_text_encoder
from models.diffusion.text_map import TextMap
from models.evaluation.world_judge import load_judge, render_scenes

RESOLUTION = 32


class ProbeMap(TextMap):
    """`TextMap` with the variants; `reading` gives its attention weights (B, side^2, L)."""

    def __init__(
        self, side, text_dim, channels, pad_mask, free_queries, over_positions, sigmoid,
        sine_queries,
    ):  # fmt: skip
        super().__init__(side, text_dim, channels)
        self.pad_mask, self.over_positions, self.sigmoid = pad_mask, over_positions, sigmoid
        width = self.positions.shape[1]
        free = torch.nn.Parameter(0.02 * torch.randn(side * side, width))
        self.free = free if free_queries else None
        self.sine_scale = torch.nn.Parameter(torch.tensor(sine_queries)) if sine_queries else None
        own = over_positions or sigmoid
        self.key = torch.nn.Linear(text_dim, width) if own else None
        self.value = torch.nn.Linear(text_dim, width) if own else None

    def _queries(self, n: int, dtype) -> torch.Tensor:
        if self.sine_scale is not None:
            q = self.positions.to(dtype) * self.sine_scale
            return q.expand(n, -1, -1)
        q = self.free if self.free is not None else self.query(self.positions.to(dtype))
        return q.expand(n, -1, -1)

    def _attend(self, states, pad, weights: bool):
        if self.over_positions:
            q = self._queries(len(states), states.dtype)
            scores = q @ self.key(states).transpose(1, 2) / q.shape[-1] ** 0.5  # (B, P, L)
            w = scores.softmax(1) * (~pad)[:, None, :]
            return (w * w.shape[1]) @ self.value(states), w  # a token spread evenly: 1 per place
        if self.sigmoid:
            q = self._queries(len(states), states.dtype)
            n = (~pad).sum(1, keepdim=True).clamp(min=1)[:, None].float()  # (B, 1, 1)
            scores = q @ self.key(states).transpose(1, 2) / q.shape[-1] ** 0.5 - n.log()
            w = scores.sigmoid() * (~pad)[:, None, :]
            return w @ self.value(states), w
        mask = pad if self.pad_mask else None
        return self.attn(
            self._queries(len(states), states.dtype), states, states,
            key_padding_mask=mask, need_weights=weights,
        )  # fmt: skip

    def forward(self, states, pad):
        read, _ = self._attend(states, pad, False)
        return self.out(read).transpose(1, 2).reshape(len(states), -1, self.side, self.side)

    def reading(self, states, pad):
        """Each place's weights over the tokens, as a distribution."""
        w = self._attend(states, pad, True)[1]
        return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def scenes_and_captions(n: int, seed: int) -> tuple[list[Scene], list[str]]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, WorldConfig()) for _ in range(n)]
    return scenes, [descriptive_caption(s, rng) for s in scenes]


def one_object_scenes(seed: int) -> list[Scene]:
    """Every (shape, cell) pair twice, with a random colour, size and background."""
    rng = random.Random(seed)
    return [
        Scene((SceneObject(shape, rng.choice(sorted(COLORS)), rng.choice(sorted(SIZES)), r, c),),
              rng.choice(sorted(BACKGROUNDS)))
        for shape, (r, c), _ in itertools.product(SHAPES, sorted(CELL_NAMES), range(2))
    ]  # fmt: skip


def lineage_images_and_captions(
    sampler: Path, raw: Path, n: int, seed: int
) -> tuple[torch.Tensor, list[str]]:
    """`n` of the mixed sampler's images (uint8, RESOLUTION px) with their synthetic captions."""
    rows = pd.read_parquet(sampler / "captions.parquet")
    rows = rows.sample(n=min(n, len(rows)), random_state=seed)
    images = load_images(raw, rows["key"].tolist(), rows["shard"].tolist(), RESOLUTION)
    return images, rows["synthetic"].tolist()


def encode(encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    states, _ = encoder.encode_all(captions, dtype=torch.float32)
    return states, encoder.tokenize(captions) == encoder.tokenizer.pad_token_id


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-encoder", type=Path, required=True)
    ap.add_argument("--context-length", type=int, default=96)
    ap.add_argument("--judge", type=Path, default=Path("data/world_judge"))
    ap.add_argument("--pad-mask", action="store_true")
    ap.add_argument("--free-queries", action="store_true")
    ap.add_argument("--over-positions", action="store_true")
    ap.add_argument("--sigmoid", action="store_true")
    ap.add_argument("--sine-queries", type=float, help="queries: the sine features times this")
    ap.add_argument("--sampler", type=Path, help="train on this mixed sampler's captions")
    ap.add_argument("--raw", type=Path, default=Path("data/raw"), help="and these images")
    ap.add_argument("--train-scenes", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    encoder = load_text_encoder(args.text_encoder, args.context_length)
    vae = PatchAutoencoder(sample_size=RESOLUTION)
    if args.sampler:
        pixels, captions = lineage_images_and_captions(
            args.sampler, args.raw, args.train_scenes, args.seed
        )
    else:
        scenes, captions = scenes_and_captions(args.train_scenes, 7_000_021 + args.seed)
        pixels = render_scenes(scenes, RESOLUTION)
    z = vae.encode(to_model_range(pixels)).latent_dist.mode()
    states, pad = encode(encoder, captions)
    side, width = z.shape[-1], states.shape[-1]
    tm = ProbeMap(
        side, width, args.channels, args.pad_mask, args.free_queries, args.over_positions,
        args.sigmoid, args.sine_queries,
    )  # fmt: skip
    head = torch.nn.Conv2d(args.channels, z.shape[1], 1)
    model = torch.nn.ModuleDict({"map": tm, "head": head})
    opt = warmup_cosine_adamw(model, args.lr, 0.01, 100, args.steps)
    for step in range(args.steps):
        i = torch.randint(0, len(z), (args.batch,))
        drawn = head(tm(states[i], pad[i]))
        weight = foreground_weights(z[i], 10.0)
        loss = ((F.mse_loss(drawn, z[i], reduction="none").mean(1) * weight).sum((1, 2))
                / weight.sum((1, 2))).mean()  # fmt: skip
        loss.backward()
        opt["optimizer"].step()
        opt["optimizer"].zero_grad(set_to_none=True)
        opt["lr_scheduler"]["scheduler"].step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    test = one_object_scenes(8_000_003 + args.seed)
    test_captions = [descriptive_caption(s, random.Random(0)) for s in test]
    test_states, test_pad = encode(encoder, test_captions)
    with torch.no_grad():
        images = to_uint8(vae.decode(head(tm(test_states, test_pad))).sample.float())
        weights = tm.reading(test_states, test_pad)
    judged = load_judge(args.judge).predict(images)
    res = {
        "config": vars(args) | {k: str(v) for k, v in vars(args).items() if isinstance(v, Path)},
        "final_loss": loss.item(),
        "map_drawing": placement(judged, [s.objects[0] for s in test]),
        "cell_reading_distance": cell_reading_distance(weights, side),
    }
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
