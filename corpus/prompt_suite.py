"""The prompt suite: held-out prompts by category, and the rule that judges them.

Categories follow GenEval and T2I-CompBench: single object, two objects, counting,
colour, colour binding (two objects, two colours), position and rendered word. Every
prompt has a short form (alt-text style, the conditions only) and a descriptive form
(the descriptive caption of a reference scene that meets them), and a list of
conditions. A generated image passes only when every condition holds in the scene the
world judge reads from it (GenEval's rule).

The suite is versioned in the repo (`prompts/suite-v1.json`); this module wrote it:

    python -m corpus.prompt_suite --out prompts/suite-v1.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from corpus.atomic import write_text_atomic
from corpus.scene_text import NUMBER_WORDS, descriptive_caption, main_subject_relations, plural
from corpus.world import BACKGROUNDS, CELL_NAMES, COLORS, SHAPES, SIZES, WORDS, Scene, SceneObject

CATEGORIES = (
    "single_object",
    "two_objects",
    "counting",
    "colour",
    "colour_binding",
    "position",
    "word",
)
FORMS = ("short", "descriptive")
RELATIONS = ("left of", "right of", "above", "below")
# Apart from the corpus seeds (small ints in params.yaml) and the world judge's.
SUITE_SEED = 3_000_017
SUITE_VERSION = "v1"
DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "prompts" / f"suite-{SUITE_VERSION}.json"


@dataclass(frozen=True)
class Condition:
    """One thing an image must show.

    kind "object": at least one object of `shape` (and `colour` when given);
    kind "count": exactly `n` objects of `shape`;
    kind "relation": an object of `shape` (and `colour`) stands `relation` an object of
    `other_shape` (and `other_colour`), by grid cell;
    kind "word": the word `word` is rendered.
    """

    kind: str
    shape: str | None = None
    colour: str | None = None
    n: int | None = None
    relation: str | None = None
    other_shape: str | None = None
    other_colour: str | None = None
    word: str | None = None

    def describe(self) -> str:
        def obj(shape, colour):
            return " ".join(x for x in (colour, shape) if x)

        if self.kind == "object":
            return f"has a {obj(self.shape, self.colour)}"
        if self.kind == "count":
            return f"exactly {self.n} {plural(self.shape)}"
        if self.kind == "relation":
            a, b = obj(self.shape, self.colour), obj(self.other_shape, self.other_colour)
            return f"a {a} {self.relation} a {b}"
        return f'the word "{self.word}"'


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    short: str
    descriptive: str
    conditions: tuple[Condition, ...]
    scene: Scene  # the reference scene the descriptive form describes

    def text(self, form: str) -> str:
        if form not in FORMS:
            raise ValueError(f"unknown prompt form {form!r}; expected one of {FORMS}")
        return self.short if form == "short" else self.descriptive

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "category": self.category,
            "short": self.short,
            "descriptive": self.descriptive,
            "conditions": [
                {k: v for k, v in asdict(c).items() if v is not None} for c in self.conditions
            ],
            "scene": self.scene.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Prompt:
        return cls(
            d["id"],
            d["category"],
            d["short"],
            d["descriptive"],
            tuple(Condition(**c) for c in d["conditions"]),
            Scene.from_dict(d["scene"]),
        )


# --- the rule ---------------------------------------------------------------------------


def _matches(o: SceneObject, shape: str | None, colour: str | None) -> bool:
    return (shape is None or o.shape == shape) and (colour is None or o.color == colour)


def _stands(a: SceneObject, relation: str, b: SceneObject) -> bool:
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def condition_holds(c: Condition, scene: Scene) -> bool:
    objs = scene.objects
    if c.kind == "object":
        return any(_matches(o, c.shape, c.colour) for o in objs)
    if c.kind == "count":
        return sum(o.shape == c.shape for o in objs) == c.n
    if c.kind == "relation":
        return any(
            _matches(a, c.shape, c.colour)
            and _matches(b, c.other_shape, c.other_colour)
            and _stands(a, c.relation, b)
            for i, a in enumerate(objs)
            for j, b in enumerate(objs)
            if i != j
        )
    if c.kind == "word":
        return scene.word == c.word
    raise ValueError(f"unknown condition kind {c.kind!r}")


def judge_prompt(prompt: Prompt, scene: Scene) -> dict:
    """{"passed": every condition holds, "conditions": [(description, held), ...]}."""
    held = [(c.describe(), condition_holds(c, scene)) for c in prompt.conditions]
    return {"passed": all(h for _, h in held), "conditions": held}


def stated_conditions(prompt: Prompt, form: str) -> tuple[Condition, ...]:
    """What the prompt's text in `form` claims, as conditions: what a reader of that text
    checks (the feedback pool's annotators). Short form: the prompt's conditions, all it
    says. Descriptive form: every object with its colour (identical copies also by their
    count), each relation its relation sentence states, and the word; its sizes, cells and
    background are not conditions, as they are not for the suite's rule. The suite's rule
    judges a descriptive prompt by its category's conditions only, which its text does
    not tell apart: "a red circle and a blue square, the circle left of the square" is
    the descriptive form of a two-objects, a colour-binding and a position prompt."""
    if form not in FORMS:
        raise ValueError(f"unknown prompt form {form!r}; expected one of {FORMS}")
    if form == "short":
        return prompt.conditions
    scene, conds = prompt.scene, []
    copies = Counter((o.shape, o.color, o.size) for o in scene.objects)
    for (shape, colour, _), n in copies.items():
        if n > 1:
            conds.append(Condition("count", shape=shape, n=n))
        conds.append(Condition("object", shape=shape, colour=colour))
    main = scene.objects[0] if scene.objects else None
    for j, rels in main_subject_relations(scene).items():
        b = scene.objects[j]
        conds += [
            Condition("relation", main.shape, main.color, None, r, b.shape, b.color) for r in rels
        ]
    if scene.word:
        conds.append(Condition("word", word=scene.word))
    return tuple(dict.fromkeys(conds))


# --- partial progress: attributes and reasons for failing -------------------------------

ATTRIBUTES = ("shape", "colour", "size", "place", "count", "relation", "background", "word")
# In this order; an image's primary reason is the first of its reasons in this order.
REASONS = (
    "no_object",
    "wrong_shape",
    "wrong_colour",
    "wrong_count",
    "wrong_place",
    "extra_object",
    "wrong_word",
)


def _stated_objects(prompt: Prompt, form: str) -> list[tuple[str, str | None, str | None]]:
    """(shape, colour, size) of each object the prompt's text asks for, without repeats.
    Short form: the objects of its conditions (colour only where a condition gives one,
    no size). Descriptive form: the reference scene's objects, every attribute stated."""
    if form == "descriptive":
        return list(dict.fromkeys((o.shape, o.color, o.size) for o in prompt.scene.objects))
    specs = []
    for c in prompt.conditions:
        if c.kind in ("object", "count", "relation"):
            specs.append((c.shape, c.colour, None))
        if c.kind == "relation":
            specs.append((c.other_shape, c.other_colour, None))
    return list(dict.fromkeys(specs))


def _condition_reason(c: Condition, scene: Scene) -> str:
    """Why condition `c`, which fails in `scene`, fails."""
    objs = scene.objects
    if c.kind == "word":
        return "wrong_word"
    if not objs:
        return "no_object"
    wanted = [(c.shape, c.colour)]
    if c.kind == "relation":
        wanted.append((c.other_shape, c.other_colour))
    if not all(any(o.shape == s for o in objs) for s, _ in wanted):
        return "wrong_shape"
    if not all(any(_matches(o, s, col) for o in objs) for s, col in wanted):
        return "wrong_colour"
    return "wrong_count" if c.kind == "count" else "wrong_place"


def diagnose(prompt: Prompt, scene: Scene, form: str) -> dict:
    """How far the judged `scene` got towards `prompt` in `form`, beyond pass or fail.

    "attributes": for each kind of ATTRIBUTES, one bool per instance that could be
    judged in this image (an empty list: not judged here), each judged only given that
    what it is an attribute of exists. The stated objects are the conditions' objects in
    the short form and the reference scene's objects in the descriptive form (which
    states every object's shape, colour and size, and the background).
      shape: per stated object, judged when the scene has any object; holds when one
        has the stated shape.
      colour: per stated object with a colour, judged when an object of its shape
        exists; holds when one of them has the colour.
      size: descriptive form only; per stated object, judged when an object of its
        shape and colour exists; holds when one of them has the size.
      place: descriptive form only; per object of the reference scene, judged when an
        object of its shape and colour exists; holds when one of them stands in its cell.
      count: per "count" condition, judged when an object of its shape exists; holds
        when exactly n do.
      relation: per "relation" condition, judged when two distinct objects match its
        two sides (shape and colour); holds when the condition does.
      background: descriptive form only; always judged; holds when it is the
        reference scene's.
      word: per "word" condition, always judged; holds when the word is that word.
    Size, place and background are not conditions: they never make an image fail.

    "reasons": for a failed image, the reasons of REASONS, in that order, each once.
    Each failed condition gives one: a "word" condition wrong_word; any other
    no_object when the scene has no object at all, else wrong_shape when a shape it
    names is absent, else wrong_colour when an object of that shape exists but none in
    the colour, else wrong_count ("count") or wrong_place ("relation": both objects exist
    but do not stand so). extra_object is added when the scene has more objects than the
    reference scene. A passed image has no reasons. "primary": the first reason or None.
    """
    if form not in FORMS:
        raise ValueError(f"unknown prompt form {form!r}; expected one of {FORMS}")
    objs = scene.objects
    attrs: dict[str, list[bool]] = {k: [] for k in ATTRIBUTES}
    for shape, colour, size in _stated_objects(prompt, form):
        if objs:
            attrs["shape"].append(any(o.shape == shape for o in objs))
        same_shape = [o for o in objs if o.shape == shape]
        if colour is not None and same_shape:
            attrs["colour"].append(any(o.color == colour for o in same_shape))
        same = [o for o in same_shape if o.color == colour]
        if size is not None and same:
            attrs["size"].append(any(o.size == size for o in same))
    for c in prompt.conditions:
        if c.kind == "count" and any(o.shape == c.shape for o in objs):
            attrs["count"].append(condition_holds(c, scene))
        if c.kind == "relation" and any(
            _matches(a, c.shape, c.colour) and _matches(b, c.other_shape, c.other_colour)
            for i, a in enumerate(objs)
            for j, b in enumerate(objs)
            if i != j
        ):
            attrs["relation"].append(condition_holds(c, scene))
        if c.kind == "word":
            attrs["word"].append(scene.word == c.word)
    if form == "descriptive":
        for want in prompt.scene.objects:
            same = [o for o in objs if (o.shape, o.color) == (want.shape, want.color)]
            if same:
                attrs["place"].append(any((o.row, o.col) == (want.row, want.col) for o in same))
        attrs["background"].append(scene.background == prompt.scene.background)

    failed = [c for c in prompt.conditions if not condition_holds(c, scene)]
    found = {_condition_reason(c, scene) for c in failed}
    if failed and len(objs) > len(prompt.scene.objects):
        found.add("extra_object")
    reasons = [r for r in REASONS if r in found]
    return {
        "passed": not failed,
        "attributes": attrs,
        "reasons": reasons,
        "primary": reasons[0] if reasons else None,
    }


# --- the suite --------------------------------------------------------------------------


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _cells(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return rng.sample(sorted(CELL_NAMES), n)


def _obj(rng, shape, colour, cell) -> SceneObject:
    return SceneObject(shape, colour, rng.choice(SIZES), *cell)


def _relation_cells(rng: random.Random, relation: str) -> tuple[tuple[int, int], ...]:
    """Two cells in one row (left/right) or one column (above/below) in that order."""
    line = rng.randrange(3)
    i, j = sorted(rng.sample(range(3), 2))
    if relation in ("left of", "right of"):
        a, b = (line, i), (line, j)
    else:
        a, b = (i, line), (j, line)
    return (a, b) if relation in ("left of", "above") else (b, a)


def _make(category: str, rng: random.Random) -> tuple[str, tuple[Condition, ...], Scene]:
    bg = rng.choice(tuple(BACKGROUNDS))
    s1, s2 = rng.sample(SHAPES, 2)
    c1, c2 = rng.sample(tuple(COLORS), 2)
    if category == "single_object":
        objs = [_obj(rng, s1, c1, _cells(rng, 1)[0])]
        return _a(s1), (Condition("object", shape=s1),), Scene(tuple(objs), bg)
    if category == "two_objects":
        cells = _cells(rng, 2)
        objs = [_obj(rng, s1, c1, cells[0]), _obj(rng, s2, c2, cells[1])]
        conds = (Condition("object", shape=s1), Condition("object", shape=s2))
        return f"{_a(s1)} and {_a(s2)}", conds, Scene(tuple(objs), bg)
    if category == "counting":
        n = rng.choice((2, 3, 4))
        size = rng.choice(SIZES)
        objs = [SceneObject(s1, c1, size, *cell) for cell in _cells(rng, n)]
        return (
            f"{NUMBER_WORDS[n]} {plural(s1)}",
            (Condition("count", shape=s1, n=n),),
            Scene(tuple(objs), bg),
        )
    if category == "colour":
        objs = [_obj(rng, s1, c1, _cells(rng, 1)[0])]
        cond = Condition("object", shape=s1, colour=c1)
        return _a(f"{c1} {s1}"), (cond,), Scene(tuple(objs), bg)
    if category == "colour_binding":
        cells = _cells(rng, 2)
        objs = [_obj(rng, s1, c1, cells[0]), _obj(rng, s2, c2, cells[1])]
        conds = (
            Condition("object", shape=s1, colour=c1),
            Condition("object", shape=s2, colour=c2),
        )
        return f"{_a(f'{c1} {s1}')} and {_a(f'{c2} {s2}')}", conds, Scene(tuple(objs), bg)
    if category == "position":
        rel = rng.choice(RELATIONS)
        ca, cb = _relation_cells(rng, rel)
        objs = [_obj(rng, s1, c1, ca), _obj(rng, s2, c2, cb)]
        cond = Condition("relation", shape=s1, relation=rel, other_shape=s2)
        return f"{_a(s1)} {rel} {_a(s2)}", (cond,), Scene(tuple(objs), bg)
    if category == "word":
        word = rng.choice(WORDS)
        obj_cell, word_cell = _cells(rng, 2)
        objs = [_obj(rng, s1, c1, obj_cell)]
        scene = Scene(tuple(objs), bg, word, *word_cell)
        return f'the word "{word}"', (Condition("word", word=word),), scene
    raise ValueError(f"unknown prompt category {category!r}; expected one of {CATEGORIES}")


def build_suite(per_category: int = 16, seed: int = SUITE_SEED) -> list[Prompt]:
    """`per_category` prompts per category, the same for the same seed."""
    rng = random.Random(seed)
    prompts = []
    for category in CATEGORIES:
        for i in range(per_category):
            short, conds, scene = _make(category, rng)
            # Large objects first, as in the corpus: the main subject leads the caption.
            scene = Scene(
                tuple(sorted(scene.objects, key=lambda o: o.size != "large")),
                scene.background,
                scene.word,
                scene.word_row,
                scene.word_col,
            )
            prompts.append(
                Prompt(
                    f"{category}-{i:02d}",
                    category,
                    short,
                    descriptive_caption(scene, rng),
                    conds,
                    scene,
                )
            )
    _check_reference_scenes(prompts)
    return prompts


def _check_reference_scenes(prompts: list[Prompt]) -> None:
    """Every reference scene must pass its own prompt: the suite cannot ask the impossible."""
    bad = [p.id for p in prompts if not judge_prompt(p, p.scene)["passed"]]
    if bad:
        raise AssertionError(f"reference scenes fail their own conditions: {bad}")


def write_suite(prompts: list[Prompt], path: Path, per_category: int, seed: int) -> None:
    doc = {
        "version": SUITE_VERSION,
        "seed": seed,
        "per_category": per_category,
        "categories": list(CATEGORIES),
        "prompts": [p.to_dict() for p in prompts],
    }
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def load_suite(path: Path = DEFAULT_SUITE) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt suite {path} not found; write one with `python -m corpus.prompt_suite "
            f"--out {path}`"
        )
    doc = json.loads(path.read_text())
    prompts = [Prompt.from_dict(d) for d in doc["prompts"]]
    unknown = sorted({p.category for p in prompts} - set(CATEGORIES))
    if unknown:
        raise ValueError(f"{path}: unknown prompt categories {unknown}")
    _check_reference_scenes(prompts)
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the prompt suite.")
    ap.add_argument("--out", type=Path, default=DEFAULT_SUITE)
    ap.add_argument("--per-category", type=int, default=16)
    ap.add_argument("--seed", type=int, default=SUITE_SEED)
    a = ap.parse_args()
    write_suite(build_suite(a.per_category, a.seed), a.out, a.per_category, a.seed)
    print(a.out)


if __name__ == "__main__":
    main()
