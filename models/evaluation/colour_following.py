"""Single-object colour following: does "a red star" give a red star?

Prompts are single-object scenes of the synthetic world (seeded apart from the corpus),
written the way the model was trained to read them (short or descriptive), with every
object colour equally often. A generated image passes when its dominant object colour
(corpus/palette.py) is the prompt's; chance is 1/8. The eval report's world judge
(models/evaluation/world_judge.py) measures shapes, counts and positions; this is the
training-time curve.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from corpus.palette import OBJECT_COLOURS, dominant_object_colour
from corpus.scene_text import descriptive_caption, short_caption
from corpus.world import BACKGROUNDS, CELL_NAMES, SHAPES, SIZES, Scene, SceneObject

CHANCE = 1 / len(OBJECT_COLOURS)


@dataclass(frozen=True)
class ColourPrompt:
    text: str
    colour: str
    scene: Scene


def colour_prompts(n: int, style: str = "descriptive", seed: int = 1_000_003) -> list[ColourPrompt]:
    """n single-object prompts cycling through the colours; the seed is disjoint from the
    corpus seeds so no prompt is a training caption by construction of its randomness."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        colour = OBJECT_COLOURS[i % len(OBJECT_COLOURS)]
        row, col = rng.choice(sorted(CELL_NAMES))
        obj = SceneObject(rng.choice(SHAPES), colour, rng.choice(SIZES), row, col)
        scene = Scene((obj,), rng.choice(tuple(BACKGROUNDS)))
        text = descriptive_caption(scene, rng) if style == "descriptive" else short_caption(scene)
        out.append(ColourPrompt(text, colour, scene))
    return out


def score_colours(images_uint8: torch.Tensor, prompts: list[ColourPrompt]) -> dict:
    """Accuracy (share of images whose dominant object colour is the prompt's), the share
    with no recognisable object, and accuracy per colour."""
    found = dominant_object_colour(images_uint8.permute(0, 2, 3, 1).numpy())
    hits = np.array([f == p.colour for f, p in zip(found, prompts, strict=True)])
    per_colour = {
        c: float(hits[[p.colour == c for p in prompts]].mean())
        for c in OBJECT_COLOURS
        if any(p.colour == c for p in prompts)
    }
    return {
        "colour_following": float(hits.mean()),
        "no_object": float(np.mean([f is None for f in found])),
        "per_colour": per_colour,
        "chance": CHANCE,
        "n": len(prompts),
    }
