"""Can each cell find its own object in a caption's token states? A binding probe.

`benchmarks.generator_runs cells` shows the generator putting the other object's shape
and colour in a two-object prompt's cell about as often as its own. This asks whether
the frozen text tower's token states let an attention read-out bind them: nine learnt
cell queries attend over the states (one attention layer, as the UNet's text map does)
and linear heads name each cell's shape and colour (or empty). Trained on captions of
fresh scenes, scored on others, per number of objects in the scene; `--binder N` puts N
trainable bidirectional transformer layers before the read-out
(`unet.text_binder_layers`).

    python -m benchmarks.cell_binding_probe --text-encoder data/diffusion_model/text_encoder \
        [--context-length 96] [--steps 1500] [--binder 1]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from corpus.scene_text import descriptive_caption
from corpus.world import CELL_NAMES, COLORS, SHAPES, WorldConfig, sample_scene
from models.diffusion.text_encoder import load_text_encoder
from models.diffusion.text_probes import SEED

CELLS = sorted(CELL_NAMES)


def scenes_and_targets(n: int, seed: int = SEED) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Captions of `n` fresh scenes, their (n, 9) shape and colour targets per cell (0:
    no object there, else the index + 1) and each scene's number of objects."""
    rng, cfg = random.Random(seed), WorldConfig()
    captions, targets, objects = [], np.zeros((n, 9, 2), dtype=np.int64), []
    for i in range(n):
        scene = sample_scene(rng, cfg)
        captions.append(descriptive_caption(scene, rng))
        objects.append(len(scene.objects))
        for o in scene.objects:
            cell = CELLS.index((o.row, o.col))
            targets[i, cell] = (SHAPES.index(o.shape) + 1, list(COLORS).index(o.color) + 1)
    return captions, targets, np.array(objects)


class CellReadout(torch.nn.Module):
    def __init__(self, text_dim: int, binder: int, width: int = 64):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(
            text_dim, 4, 4 * text_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.binder = (
            torch.nn.TransformerEncoder(layer, binder, enable_nested_tensor=False)
            if binder
            else None
        )
        self.queries = torch.nn.Parameter(torch.randn(9, width))
        self.attn = torch.nn.MultiheadAttention(
            width, 4, kdim=text_dim, vdim=text_dim, batch_first=True
        )
        self.shape = torch.nn.Linear(width, len(SHAPES) + 1)
        self.colour = torch.nn.Linear(width, len(COLORS) + 1)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.binder is not None:
            states = self.binder(states)
        read, _ = self.attn(self.queries.expand(len(states), -1, -1), states, states)
        return self.shape(read), self.colour(read)


def probe(
    text_encoder: Path,
    context_length: int,
    steps: int,
    binder: int,
    n: int = 4000,
    seed: int = 0,
) -> dict:
    encoder = load_text_encoder(text_encoder, context_length)
    captions, targets, objects = scenes_and_targets(n)
    with torch.no_grad():
        states = torch.cat([encoder(captions[i : i + 256])[0] for i in range(0, n, 256)])
    states, y = states.float(), torch.from_numpy(targets)
    cut = int(n * 0.75)
    torch.manual_seed(seed)
    model = CellReadout(states.shape[-1], binder)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for _ in range(steps):
        i = torch.randint(0, cut, (128,))
        shape, colour = model(states[i])
        loss = F.cross_entropy(shape.flatten(0, 1), y[i, :, 0].flatten())
        loss = loss + F.cross_entropy(colour.flatten(0, 1), y[i, :, 1].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        shape, colour = model(states[cut:])
    got = torch.stack([shape.argmax(-1), colour.argmax(-1)], -1).numpy()
    want, count = targets[cut:], objects[cut:]
    out = {"captions": n, "steps": steps, "binder": binder, "final_loss": round(loss.item(), 4)}
    filled = want[..., 0] > 0
    out["empty_cells_read_empty"] = round(float((got[..., 0][~filled] == 0).mean()), 3)
    for k in sorted(set(count.tolist())):
        rows = count == k
        cells = filled & rows[:, None]
        own_shape = got[..., 0][cells] == want[..., 0][cells]
        own_colour = got[..., 1][cells] == want[..., 1][cells]
        out[f"{k}_objects"] = {
            "cells": int(cells.sum()),
            "shape": round(float(own_shape.mean()), 3),
            "colour": round(float(own_colour.mean()), 3),
            "both": round(float((own_shape & own_colour).mean()), 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text-encoder", type=Path, required=True)
    ap.add_argument("--context-length", type=int, default=96)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--binder", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(probe(args.text_encoder, args.context_length, args.steps, args.binder)))


if __name__ == "__main__":
    main()
