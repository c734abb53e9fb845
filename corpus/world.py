"""The synthetic world: seeded scenes of coloured shapes with known ground truth.

A scene is 1-4 objects on a 3x3 grid, each with a shape, a colour and a size, on a
background colour, with an optional rendered word. Everything recapflow measures exactly
(caption quality, prompt following) is measured against these scenes.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
# Object colours are far apart in RGB so a small judge can separate them; none is used
# as a background colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (35, 60, 210),
    "purple": (140, 50, 180),
    "pink": (245, 130, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "beige": (225, 210, 175),
}
SIZES: tuple[str, ...] = ("small", "large")
# Grid cells as (row, col); names read like a person would place them.
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top center",
    (0, 2): "top right",
    (1, 0): "center left",
    (1, 1): "center",
    (1, 2): "center right",
    (2, 0): "bottom left",
    (2, 1): "bottom center",
    (2, 2): "bottom right",
}
WORDS: tuple[str, ...] = ("CAT", "DOG", "SUN", "BUY", "ART", "TOY", "ZOO", "MAP", "BOX", "HI")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def cell(self) -> str:
        return CELL_NAMES[(self.row, self.col)]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    word: str | None = None
    word_row: int | None = None
    word_col: int | None = None

    def to_dict(self) -> dict:
        return {
            "objects": [asdict(o) for o in self.objects],
            "background": self.background,
            "word": self.word,
            "word_cell": None if self.word is None else [self.word_row, self.word_col],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        word_cell = d.get("word_cell") or [None, None]
        return cls(
            objects=tuple(SceneObject(**o) for o in d["objects"]),
            background=d["background"],
            word=d.get("word"),
            word_row=word_cell[0],
            word_col=word_cell[1],
        )

    def relations(self) -> list[tuple[int, str, int]]:
        """Pairwise spatial relations (i, 'left of' | 'above', j) implied by the grid."""
        rels = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i == j:
                    continue
                if a.col < b.col:
                    rels.append((i, "left of", j))
                if a.row < b.row:
                    rels.append((i, "above", j))
        return rels


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    max_objects: int = 4
    # Share of scenes whose objects are all the same shape and colour: counting prompts
    # ("three red circles") need such scenes to exist in the corpus.
    same_object_prob: float = 0.3
    word_prob: float = 0.2
    shapes: tuple[str, ...] = field(default=SHAPES)
    colors: tuple[str, ...] = field(default=tuple(COLORS))

    def __post_init__(self) -> None:
        if not 1 <= self.max_objects <= 4:
            raise ValueError(f"max_objects must be in 1..4, got {self.max_objects}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 px, got {self.image_size}")
        unknown = [s for s in self.shapes if s not in SHAPES] + [
            c for c in self.colors if c not in COLORS
        ]
        if unknown:
            raise ValueError(f"unknown shapes/colours in WorldConfig: {unknown}")


def sample_scene(rng: random.Random, cfg: WorldConfig) -> Scene:
    """Draw one scene. The first object is the main subject (the largest when sizes differ)."""
    n = rng.randint(1, cfg.max_objects)
    cells = rng.sample(sorted(CELL_NAMES), n + 1)  # one spare cell for the word
    same = n > 1 and rng.random() < cfg.same_object_prob
    shape, color, size = rng.choice(cfg.shapes), rng.choice(cfg.colors), rng.choice(SIZES)
    objects = []
    for r, c in cells[:n]:
        if not same:
            shape, color, size = rng.choice(cfg.shapes), rng.choice(cfg.colors), rng.choice(SIZES)
        objects.append(SceneObject(shape, color, size, r, c))
    # Large objects first: the main subject of a short caption is the most prominent one.
    objects.sort(key=lambda o: o.size != "large")
    background = rng.choice(tuple(BACKGROUNDS))
    word = rng.choice(WORDS) if rng.random() < cfg.word_prob else None
    wr, wc = cells[n] if word else (None, None)
    return Scene(tuple(objects), background, word, wr, wc)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        k = r * 0.85
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "hexagon":
        return [
            (cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k))
            for k in range(6)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi / 5 * k
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene to an RGB image of size x size pixels."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene.objects:
        cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = cell * (0.45 if o.size == "large" else 0.27)
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[o.color])
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=COLORS[o.color])
    if scene.word:
        # Text contrasts with the background so the word stays legible at 64 px.
        ink = (0, 0, 0) if scene.background in ("white", "beige") else (255, 255, 255)
        font = _font(max(8, round(size * 0.16)))
        cx, cy = (scene.word_col + 0.5) * cell, (scene.word_row + 0.5) * cell
        draw.text((cx, cy), scene.word, fill=ink, font=font, anchor="mm")
    return img


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: synthetic renders are flat colour, so fast zlib loses little.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
