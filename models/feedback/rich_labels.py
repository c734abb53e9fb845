"""Exact rich labels, RAHF style: which words of a prompt an image missed, where it is
wrong, where it is malformed, and four scores.

Given the prompt, the scene an image shows (the world judge's reading, or the known scene
of a corrupted render) and a clean render of that scene:
- `keywords`: the prompt's words behind each failed condition, by why it failed
  (`corpus.prompt_suite`'s reasons): the shape (and colour) of an object that is missing,
  the colour of one drawn in the wrong colour, the number of a wrong count, the relation
  of objects in the wrong places, the word of a wrong rendered word;
- `misalignment` (H x W, 0/1): the cells of what is drawn wrong: the objects of the asked
  shape in a wrong colour or count, the two objects of a relation in the wrong places, a
  wrong rendered word. A missing object has no place to mark; its words say it;
- `implausibility` (H x W, 0-1): per pixel, its distance from the clean render, capped at
  the utility's `error_cap` (1 = wholly off);
- `scores`: plausibility P, alignment A and the utility's composition C (this world has no
  aesthetics; C stands in its column), and overall = U / (sum of the weights), all in [0, 1].

Controlled corruptions (`corrupt`) damage one object or the word of a clean render in a
known way, so their implausibility truth is known without any judge.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# Private helpers of the suite's rule: made public, they would change corpus/, on which
# every DVC stage depends, and rebuild the whole lineage for a rename.
from corpus.prompt_suite import Condition, Prompt, _condition_reason, _matches, condition_holds
from corpus.scene_text import NUMBER_WORDS, plural
from corpus.world import Scene
from models.feedback.utility import TERMS, UtilityConfig, terms

GRID = 3
CORRUPTIONS = ("melted", "split", "colour_bleed", "clipped", "distorted_word")


def _cell_box(row: int, col: int, h: int, w: int) -> tuple[slice, slice]:
    r0, r1 = round(row * h / GRID), round((row + 1) * h / GRID)
    c0, c1 = round(col * w / GRID), round((col + 1) * w / GRID)
    return slice(r0, r1), slice(c0, c1)


def _words_of(c: Condition, reason: str) -> set[str]:
    if reason == "wrong_word":
        return {c.word.lower()}
    if reason == "wrong_colour":
        return {x for x in (c.colour, c.other_colour) if x}
    if reason == "wrong_count":
        return {NUMBER_WORDS[c.n], plural(c.shape)}
    if reason == "wrong_place":
        return set(c.relation.split())
    words = {c.shape, c.colour} if c.kind != "count" else {NUMBER_WORDS[c.n], plural(c.shape)}
    if c.kind == "relation":
        words |= {c.other_shape, c.other_colour}
    return {w for w in words if w}


def _wrong_cells(c: Condition, reason: str, scene: Scene) -> list[tuple[int, int]]:
    objs = scene.objects
    if reason == "wrong_word":
        return [(scene.word_row, scene.word_col)] if scene.word else []
    if reason == "wrong_colour":
        shapes = {c.shape, c.other_shape} - {None}
        return [(o.row, o.col) for o in objs if o.shape in shapes]
    if reason == "wrong_count":
        return [(o.row, o.col) for o in objs if o.shape == c.shape]
    if reason == "wrong_place":
        return [
            (o.row, o.col)
            for o in objs
            if _matches(o, c.shape, c.colour) or _matches(o, c.other_shape, c.other_colour)
        ]
    return []  # no_object, wrong_shape: nothing of it is drawn


def missed_words(prompt: Prompt, scene: Scene) -> set[str]:
    """The prompt's words behind each of its conditions that fails in `scene`."""
    return {
        word
        for c in prompt.conditions
        if not condition_holds(c, scene)
        for word in _words_of(c, _condition_reason(c, scene))
    }


def rich_labels(
    prompt: Prompt,
    scene: Scene,
    image_uint8: torch.Tensor,
    clean_uint8: torch.Tensor,
    utility: UtilityConfig,
) -> dict:
    """The rich labels of one image (3, H, W) showing `scene`, asked for `prompt`."""
    h, w = image_uint8.shape[-2:]
    misalignment = np.zeros((h, w), np.float32)
    held = [condition_holds(c, scene) for c in prompt.conditions]
    for c, ok in zip(prompt.conditions, held, strict=True):
        if not ok:
            for row, col in _wrong_cells(c, _condition_reason(c, scene), scene):
                misalignment[_cell_box(row, col, h, w)] = 1.0
    diff = (image_uint8.float() - clean_uint8.float()).abs().mean(0).numpy() / 255.0
    implausibility = np.minimum(diff / utility.error_cap, 1.0).astype(np.float32)
    cell_error = [float(diff[_cell_box(r, c, h, w)].mean()) for r in range(3) for c in range(3)]
    t = terms({"conditions": held, "cell_error": cell_error}, utility.error_cap)
    weights = {k: getattr(utility, f"w_{k}") for k in TERMS}
    overall = sum(weights[k] * t[k] for k in TERMS) / sum(weights.values())
    return {
        "keywords": sorted(missed_words(prompt, scene)),
        "misalignment": misalignment,
        "implausibility": implausibility,
        "scores": {
            "plausibility": t["plausibility"],
            "alignment": t["alignment"],
            "composition": t["composition"],
            "overall": overall,
        },
    }


def corrupt(clean_uint8: torch.Tensor, scene: Scene, kind: str, seed: int) -> torch.Tensor:
    """A clean render (3, H, W) with one object (or the word) damaged in a known way:
    `melted` (box-blurred), `split` (its halves pushed apart), `colour_bleed` (its colour
    smeared into its cell's background), `clipped` (a half painted over with background),
    `distorted_word` (the word's cell sheared)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    rng = random.Random(seed)
    x = clean_uint8.clone().float()
    h, w = x.shape[-2:]
    if kind == "distorted_word":
        if not scene.word:
            raise ValueError("distorted_word needs a scene with a rendered word")
        rs, cs = _cell_box(scene.word_row, scene.word_col, h, w)
        cell = x[:, rs, cs]
        for i in range(cell.shape[1]):  # a shear: each row shifted by its distance from the top
            cell[:, i] = torch.roll(cell[:, i], shifts=i // 2, dims=-1)
        x[:, rs, cs] = cell
        return x.round().clamp(0, 255).to(torch.uint8)
    if not scene.objects:
        raise ValueError(f"{kind} needs a scene with an object")
    o = rng.choice(scene.objects)
    rs, cs = _cell_box(o.row, o.col, h, w)
    cell = x[:, rs, cs]
    background = cell[:, 0, 0].clone().view(3, 1, 1)  # a cell's corner is background
    if kind == "melted":
        k = 5
        padded = torch.nn.functional.pad(cell[None], (k // 2,) * 4, mode="replicate")
        cell = torch.nn.functional.avg_pool2d(padded, k, stride=1)[0]
    elif kind == "split":
        mid, gap = cell.shape[1] // 2, 2
        top = cell[:, :mid].clone()
        cell[:, :mid] = torch.roll(top, shifts=-gap, dims=1)
        cell[:, mid - gap : mid] = background
    elif kind == "colour_bleed":
        ink = (cell - background).abs().sum(0) > 30
        grown = torch.nn.functional.max_pool2d(ink[None, None].float(), 5, 1, 2)[0, 0] > 0
        colour = cell[:, ink].mean(1).view(3, 1) if ink.any() else background.view(3, 1)
        cell[:, grown & ~ink] = 0.6 * colour + 0.4 * cell[:, grown & ~ink]
    elif kind == "clipped":
        side = rng.choice(("top", "bottom", "left", "right"))
        hh, ww = cell.shape[1:]
        box = {
            "top": (slice(0, hh // 2), slice(None)),
            "bottom": (slice(hh // 2, None), slice(None)),
            "left": (slice(None), slice(0, ww // 2)),
            "right": (slice(None), slice(ww // 2, None)),
        }[side]
        cell[:, box[0], box[1]] = background
    x[:, rs, cs] = cell
    return x.round().clamp(0, 255).to(torch.uint8)
