"""Per-pixel colour measurements against the synthetic world's palette.

Until the trained world judge exists (the eval report), these are how the autoencoder's
reconstructions and the diffusion model's colour following are measured: the world
draws objects in 8 flat colours far apart in RGB, on 4 background colours.
"""

from __future__ import annotations

import math

import numpy as np

from corpus.world import BACKGROUNDS, COLORS

OBJECT_COLOURS: tuple[str, ...] = tuple(COLORS)
# Objects first: an index below len(OBJECT_COLOURS) is an object colour.
PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)


def palette_index(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest palette colour, distance to it) per pixel of uint8
    (N, H, W, 3) images."""
    px = images.astype(np.float32)
    d = ((px[..., None, :] - PALETTE) ** 2).sum(-1)
    idx = d.argmin(-1)
    return idx, np.sqrt(np.take_along_axis(d, idx[..., None], -1)[..., 0])


def colour_kept(original: np.ndarray, recon: np.ndarray, tol: float = 40.0) -> float:
    """Share of interior object pixels (an object colour within `tol`, as are their four
    neighbours) whose reconstruction is nearest to the same object colour."""
    idx_o, dist = palette_index(original)
    idx_r, _ = palette_index(recon)
    obj = (dist < tol) & (idx_o < len(OBJECT_COLOURS))
    interior = np.zeros_like(obj)
    c = idx_o[:, 1:-1, 1:-1]
    interior[:, 1:-1, 1:-1] = (
        obj[:, 1:-1, 1:-1]
        & (c == idx_o[:, :-2, 1:-1])
        & (c == idx_o[:, 2:, 1:-1])
        & (c == idx_o[:, 1:-1, :-2])
        & (c == idx_o[:, 1:-1, 2:])
    )
    n = int(interior.sum())
    return float((idx_r[interior] == idx_o[interior]).sum() / n) if n else math.nan


def dominant_object_colour(
    images: np.ndarray, tol: float = 60.0, min_pixels: int = 4
) -> list[str | None]:
    """The object colour covering most pixels of each uint8 (N, H, W, 3) image (pixels
    within `tol` of it), or None when fewer than `min_pixels` pixels are any object
    colour (nothing recognisable was drawn)."""
    idx, dist = palette_index(images)
    out: list[str | None] = []
    for i in range(len(images)):
        sel = idx[i][(dist[i] < tol) & (idx[i] < len(OBJECT_COLOURS))]
        counts = np.bincount(sel, minlength=len(OBJECT_COLOURS))
        out.append(OBJECT_COLOURS[counts.argmax()] if counts.max() >= min_pixels else None)
    return out
