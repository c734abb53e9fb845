"""Exact labels of a generated image, from the world: what holds and how well it is drawn.

The world judge reads the scene an image shows. From that scene:
- `conditions`: per condition the prompt's text states (`stated_conditions`: what an
  annotator who reads it checks), whether it holds (GenEval's rule);
- `cell_error`: per grid cell (row-major, 3 x 3), the mean absolute difference (0-1)
  between the image and a clean render of the judged scene, that is of what the judge
  says is there: a well-formed object (or bare background) scores near 0, a blob the judge
  reads as a star scores high;
- `scene`: the judged scene itself.
"""

from __future__ import annotations

import torch

from corpus.prompt_suite import Prompt, condition_holds, stated_conditions
from corpus.world import Scene
from models.evaluation.world_judge import WorldJudge, render_scenes

GRID = 3
# How `conditions` are chosen; the pool labels its kept images again when this changes.
LABELS_RULE = "stated conditions"


def cell_errors(images_uint8: torch.Tensor, clean_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 9) mean absolute difference per grid cell, on a 0-1 scale."""
    if images_uint8.shape != clean_uint8.shape:
        raise ValueError(
            f"images {tuple(images_uint8.shape)} vs renders {tuple(clean_uint8.shape)}"
        )
    diff = (images_uint8.float() - clean_uint8.float()).abs().mean(1) / 255.0  # (N, H, W)
    h, w = diff.shape[-2:]
    rows = [round(i * h / GRID) for i in range(GRID + 1)]
    cols = [round(j * w / GRID) for j in range(GRID + 1)]
    cells = [
        diff[:, rows[r] : rows[r + 1], cols[c] : cols[c + 1]].mean((1, 2))
        for r in range(GRID)
        for c in range(GRID)
    ]
    return torch.stack(cells, 1)


def label_images(
    images_uint8: torch.Tensor, prompts: list[Prompt], forms: list[str], judge: WorldJudge
) -> list[dict]:
    """One label per image; image i was asked to show `prompts[i]` in form `forms[i]`."""
    if not len(images_uint8) == len(prompts) == len(forms):
        n = (len(images_uint8), len(prompts), len(forms))
        raise ValueError("{} images but {} prompts and {} forms".format(*n))
    scenes: list[Scene] = judge.predict(images_uint8)
    clean = render_scenes(scenes, images_uint8.shape[-1])
    errors = cell_errors(images_uint8, clean)
    return [
        {
            "conditions": [condition_holds(c, scene) for c in stated_conditions(prompt, form)],
            "cell_error": [round(float(e), 5) for e in err],
            "object_cells": sorted(o.row * GRID + o.col for o in scene.objects),
            "scene": scene.to_dict(),
        }
        for prompt, form, scene, err in zip(prompts, forms, scenes, errors, strict=True)
    ]
