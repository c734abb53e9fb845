"""Texts derived from a scene: web-like alt-text, short and descriptive captions.

The alt-text noise model mimics what the DALL-E 3 report says web alt-text gets wrong.
Each image draws exactly one noise kind with the configured probabilities:

| kind            | what the alt-text says                                         |
|-----------------|----------------------------------------------------------------|
| plain           | a terse but true naming of the objects ("red circle and blue square") |
| partial         | one object only, often without its colour                      |
| tangential      | mood or use, no content ("perfect for any room")               |
| advertising     | shop talk: "buy now", a price, a shop name, maybe one object   |
| wrong_attribute | one object with a wrong colour or shape                        |
| filename        | a camera or export file name ("IMG_2041.png", "red_circle_v2.png") |
| empty           | nothing                                                         |

The short caption (the report's SSC) names the main subject only; the descriptive
caption (DSC) names every object with its colour, size, count and place, the spatial
relations, the background and the rendered word, in varied phrasings.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from corpus.world import CELL_NAMES, COLORS, SHAPES, Scene, SceneObject

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
NOISE_KINDS: tuple[str, ...] = (
    "plain",
    "partial",
    "tangential",
    "advertising",
    "wrong_attribute",
    "filename",
    "empty",
)
_TANGENTIAL = (
    "perfect for any room",
    "my favourite one so far",
    "a great gift idea",
    "inspiration for your next project",
    "love this",
    "minimalist vibes",
    "the best thing I saw today",
    "wall decor ideas",
)
_SHOPS = ("ShapeMart", "PrintHub", "DecoWorld", "ArtBarn", "PosterLand")


@dataclass(frozen=True)
class NoiseRates:
    plain: float = 0.20
    partial: float = 0.30
    tangential: float = 0.15
    advertising: float = 0.10
    wrong_attribute: float = 0.10
    filename: float = 0.10
    empty: float = 0.05

    def __post_init__(self) -> None:
        rates = self.as_dict()
        bad = {k: v for k, v in rates.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"noise rates must lie in [0, 1]: {bad}")
        total = sum(rates.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"noise rates must sum to 1, got {total:.4f}: {rates}")

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in NOISE_KINDS}


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(o: SceneObject, with_size: bool = True, with_color: bool = True) -> str:
    words = ([o.size] if with_size else []) + ([o.color] if with_color else []) + [o.shape]
    text = " ".join(words)
    return f"{_article(text)} {text}"


def _groups(scene: Scene) -> list[tuple[SceneObject, list[SceneObject]]]:
    """Objects grouped by (shape, colour, size), in scene order."""
    groups: dict[tuple[str, str, str], list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault((o.shape, o.color, o.size), []).append(o)
    return [(members[0], members) for members in groups.values()]


def _group_phrase(first: SceneObject, members: list[SceneObject], with_size: bool = True) -> str:
    if len(members) == 1:
        return object_phrase(first, with_size=with_size)
    words = ([first.size] if with_size else []) + [first.color, plural(first.shape)]
    return f"{NUMBER_WORDS[len(members)]} {' '.join(words)}"


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def short_caption(scene: Scene) -> str:
    """The main subject only (SSC): the main object's colour and shape, with how many of
    that colour and shape there are (sizes aside, as the caption does not name them)."""
    main = scene.objects[0]
    members = [o for o in scene.objects if (o.color, o.shape) == (main.color, main.shape)]
    return _group_phrase(main, members, with_size=False)


def descriptive_caption(scene: Scene, rng: random.Random) -> str:
    """Every object with attributes and place, relations, background and word (DSC)."""
    groups = _groups(scene)
    located = []
    for first, members in groups:
        where = _join(["the " + m.cell for m in members])
        located.append(f"{_group_phrase(first, members)} in {where}")
    objects_text = _join(located)
    opening = rng.choice(
        (
            "{objs}, on a {bg} background.",
            "A {bg} background with {objs}.",
            "The image shows {objs} against a {bg} background.",
            "On a plain {bg} background there {be} {objs}.",
        )
    )
    be = "is" if len(groups) == 1 and len(groups[0][1]) == 1 else "are"
    sentences = [opening.format(objs=objects_text, bg=scene.background, be=be)]
    sentences[0] = sentences[0][0].upper() + sentences[0][1:]
    rels = _relation_sentences(scene)
    if rels:
        sentences.append(_join(rels) + ".")
        sentences[-1] = sentences[-1][0].upper() + sentences[-1][1:]
    if scene.word:
        sentences.append(
            rng.choice(
                (
                    'The word "{w}" is written in the {cell}.',
                    'The text "{w}" appears in the {cell}.',
                    'In the {cell} it says "{w}".',
                )
            ).format(w=scene.word, cell=scene_word_cell(scene))
        )
    return " ".join(sentences)


def scene_word_cell(scene: Scene) -> str:
    return CELL_NAMES[(scene.word_row, scene.word_col)]


def main_subject_relations(scene: Scene) -> dict[int, list[str]]:
    """Per other object (by index), how the main subject (the first object) stands to it:
    "left of", "right of", "above", "below", as the descriptive caption's relation
    sentences say. None for one group or a scene of identical copies."""
    groups = _groups(scene)
    if len(groups) < 2 or len(groups) != len(scene.objects):
        return {}
    by_other: dict[int, list[str]] = {}
    for i, rel, j in scene.relations():
        if i == 0:
            by_other.setdefault(j, []).append(rel)
        elif j == 0:
            by_other.setdefault(i, []).append("right of" if rel == "left of" else "below")
    return dict(sorted(by_other.items()))


def _relation_sentences(scene: Scene) -> list[str]:
    """Where the other objects lie relative to the main subject ("the red circle is to the
    left of and above the blue square"). Scenes of identical copies name cells only."""
    main, words = scene.objects[0] if scene.objects else None, {"left of", "right of"}
    out = []
    for j, rels in main_subject_relations(scene).items():
        b = scene.objects[j]
        said = " and ".join(f"to the {r}" if r in words else r for r in rels)
        out.append(f"the {main.color} {main.shape} is {said} the {b.color} {b.shape}")
    return out


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")
# A caption names both relations of a pair in a fixed order (`_relation_sentences`):
# after swapping left and right, two of the four combinations need their order restored.
_REORDER = {
    "to the right of and above": "above and to the right of",
    "above and to the left of": "to the left of and above",
}


def mirror_caption(caption: str) -> str | None:
    """The caption of the left-right mirror image: "left" and "right" swapped (cells and
    relations), in the order a caption of the mirrored scene would use. None when the
    caption quotes a rendered word: mirrored letters are not that word."""
    if '"' in caption:
        return None
    out = _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)
    for old, new in _REORDER.items():
        out = out.replace(old, new)
    return out


def alt_text(scene: Scene, kind: str, rng: random.Random) -> str:
    """Web-like alt-text of the given noise kind (see the module docstring)."""
    main = scene.objects[0]
    if kind == "plain":
        counts = Counter((o.color, o.shape) for o in scene.objects)
        parts = [
            f"{c} {s}" if n == 1 else f"{NUMBER_WORDS[n]} {c} {plural(s)}"
            for (c, s), n in counts.items()
        ]
        return _join(parts)
    if kind == "partial":
        o = rng.choice(scene.objects)
        return o.shape if rng.random() < 0.5 else f"{o.color} {o.shape}"
    if kind == "tangential":
        return rng.choice(_TANGENTIAL)
    if kind == "advertising":
        price = f"${rng.randint(5, 99)}.{rng.choice(('99', '95', '00'))}"
        item = f"{main.color} {main.shape} print" if rng.random() < 0.5 else "art print"
        return rng.choice(
            (
                f"Buy now! {item} only {price} at {rng.choice(_SHOPS)}",
                f"{rng.choice(_SHOPS)} | {item} | free shipping",
                f"SALE {price} - {item} - shop now",
            )
        )
    if kind == "wrong_attribute":
        if rng.random() < 0.5:
            color = rng.choice([c for c in COLORS if c != main.color])
            return f"{color} {main.shape}"
        shape = rng.choice([s for s in SHAPES if s != main.shape])
        return f"{main.color} {shape}"
    if kind == "filename":
        if rng.random() < 0.5:
            return (
                rng.choice(("IMG_", "DSC", "image-", "photo_")) + f"{rng.randint(0, 9999):04d}.png"
            )
        return f"{main.color}_{main.shape}_final_v{rng.randint(1, 5)}.png"
    if kind == "empty":
        return ""
    raise ValueError(f"unknown alt-text noise kind {kind!r}; expected one of {NOISE_KINDS}")


def draw_noise_kind(rng: random.Random, rates: NoiseRates) -> str:
    r, acc = rng.random(), 0.0
    for kind, p in rates.as_dict().items():
        acc += p
        if r < acc:
            return kind
    return NOISE_KINDS[-1]
