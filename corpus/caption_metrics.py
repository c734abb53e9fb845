"""Caption quality measured exactly against the ground-truth scene.

A caption is parsed into *claims* (what it states) and compared with the *facts* of the
scene it describes (what is true). Per kind, precision = true claims / claims and
recall = facts stated by at least one true claim / facts. Both are micro-averaged over
captions; precision is NaN for a kind with no claims, recall NaN for a kind with no facts.
A caption is *hallucinated* when any claim of any kind is false.

Parsing (captions from the templates in ``corpus.scene_text``, a captioner imitating
them, or noisy web alt-text):

- Text is lowercased, '_' and '-' read as spaces ("red_circle_v2.png" states "red
  circle"). Rendered words are found in the original case and removed before the rest
  is parsed.
- Noun phrase: optional determiner/count ("a", "an", "one".."four", digits 1-4), optional
  size (small/large), optional colour (a key of COLORS), then a shape, singular or plural.
  Each noun phrase claims its shape (object), its (colour, shape) if coloured and its
  (size, colour or None, shape) if sized. A phrase right after "the" is a definite
  reference ("the red circle is ...") and claims nothing by itself.
- Count: a number word gives that count; "a"/"an"/"one" + singular gives 1; a bare noun
  (no determiner) gives none. The claimed count of a (colour, shape) pair is the sum over
  its mentions, only when every mention of the pair has a count.
- Position: "<noun phrase> in the <cell>[, the <cell>][ and the <cell>]" claims
  (colour or None, shape, cell) per cell (cells are the CELL_NAMES values).
- Relation: "the <C1 S1> is <rel> [and <rel>] the <C2 S2>", rel one of "to the left of",
  "to the right of", "above", "below"; stored as ((C1, S1), 'left of' | 'above', (C2, S2)),
  "right of" and "below" reversed. Colour may be missing (None).
- Background: "<bg> background", bg a key of BACKGROUNDS.
- Word: text in double quotes, or an all-caps token that is one of WORDS.

Truth:

- object: facts = distinct shapes present; a claim is true if the shape is present.
- colour: facts = distinct (colour, shape) pairs; true if such an object exists.
- size: facts = distinct (size, colour, shape); true if an object of that size, shape
  (and colour, if stated) exists.
- count: facts = each distinct (colour, shape) with its number of objects; true if the
  claimed total equals it (so a claim for an absent pair is false).
- position: facts = each object's (colour, shape, cell); true if an object of that shape
  (and colour, if stated) lies in that cell.
- relation: facts = the relations the descriptive template states: when there are >= 2
  objects, all in distinct (shape, colour, size) groups, every relation in
  ``Scene.relations()`` between object 0 and another object. A claim is true if any two
  distinct objects matching its descriptions satisfy it on the grid (smaller col = left
  of, smaller row = above), whether or not it is one of the facts.
- background: fact = scene.background; word: fact = scene.word, if any. Words compare
  case-sensitively.

A claim *states* a fact when every attribute it gives equals the fact's; a missing colour
matches any colour. Claims are counted per mention, so a repeated false claim counts twice.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corpus.scene_text import NUMBER_WORDS, plural
from corpus.world import BACKGROUNDS, CELL_NAMES, COLORS, SHAPES, SIZES, WORDS, Scene, SceneObject

KINDS: tuple[str, ...] = (
    "object",
    "colour",
    "count",
    "position",
    "relation",
    "word",
    "size",
    "background",
)

Desc = tuple[str | None, str]  # (colour or None, shape)
Relation = tuple[Desc, str, Desc]

_SHAPE_OF: dict[str, str] = {s: s for s in SHAPES} | {plural(s): s for s in SHAPES}
_COUNT_OF: dict[str, int] = {w: n for n, w in NUMBER_WORDS.items()} | {
    str(n): n for n in NUMBER_WORDS
}
_ARTICLES = ("a", "an")
# Longest first so "center left" wins over "center".
_CELLS: tuple[tuple[str, ...], ...] = tuple(
    sorted((tuple(c.split()) for c in CELL_NAMES.values()), key=len, reverse=True)
)
_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')
_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")

_NP = (
    rf"the (?:(?:{'|'.join(SIZES)}) )?(?:({'|'.join(COLORS)}) )?"
    rf"({'|'.join(sorted(_SHAPE_OF, key=len, reverse=True))})\b"
)
_REL = r"(?:to the left of|to the right of|left of|right of|above|below)"
_RELATION = re.compile(rf"{_NP} (?:is|are) ({_REL}(?: and {_REL})*) {_NP}")
_BACKGROUND = re.compile(rf"\b({'|'.join(BACKGROUNDS)}) background\b")


@dataclass
class Claims:
    """What one caption states (see the module docstring for how it is parsed)."""

    shapes: list[str] = field(default_factory=list)
    colors: list[tuple[str, str]] = field(default_factory=list)
    sizes: list[tuple[str, str | None, str]] = field(default_factory=list)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    # The count of each coloured mention of a (colour, shape) pair, None where a mention
    # states none: what `counts` is summed from (`claimed_counts`).
    mentions: dict[tuple[str, str], list[int | None]] = field(default_factory=dict)
    # (size, colour, shape, cell) of every placed noun phrase: what a phrase says of one cell.
    placed: list[tuple[str | None, str | None, str, str]] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    background: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)

    @property
    def positions(self) -> list[tuple[str | None, str, str]]:
        """(colour, shape, cell) of every placement: what the position score checks."""
        return [(colour, shape, cell) for _, colour, shape, cell in self.placed]


# --- parsing -------------------------------------------------------------------------


_NOT_LETTERS = re.compile(r"[^A-Za-z]+")
_AS_SPACE = str.maketrans("_-", "  ")


def _split_words(caption: str) -> tuple[list[str], str]:
    """Rendered words stated, and the caption with quoted text blanked out."""
    # The checks before each pattern skip work that cannot find anything (a beam search
    # parses thousands of partial sentences).
    quoted, rest = [], caption
    if '"' in caption or "“" in caption:
        quoted = [a or b for a, b in _QUOTED.findall(caption)]
        rest = _QUOTED.sub(" | ", caption)
    caps = []
    if not rest.islower():
        caps = [t for t in _NOT_LETTERS.split(rest) if t.isupper() and t in WORDS]
    return [q.strip() for q in quoted] + caps, rest


def _normalise(text: str) -> str:
    return " ".join(text.lower().translate(_AS_SPACE).split())


def _cell_at(tokens: list[str], i: int) -> tuple[str, int] | None:
    """The cell name starting at tokens[i] and the index after it, if any."""
    for cell in _CELLS:
        if tuple(tokens[i : i + len(cell)]) == cell:
            return " ".join(cell), i + len(cell)
    return None


def _cells_after(tokens: list[str], i: int) -> list[str]:
    """Cells of "in the <cell>[, the <cell>][ and the <cell>]" starting at tokens[i]."""
    if tokens[i : i + 2] != ["in", "the"]:
        return []
    found = _cell_at(tokens, i + 2)
    cells = []
    while found:
        cell, i = found
        cells.append(cell)
        j = i + (tokens[i : i + 1] == [","])
        j += tokens[j : j + 1] == ["and"]
        if j == i or tokens[j : j + 1] != ["the"]:
            break
        found = _cell_at(tokens, j + 1)
    return cells


@dataclass
class _Phrase:
    shape: str
    color: str | None
    size: str | None
    count: int | None
    end: int  # index of the token after the shape


def _phrase_ending_at(tokens: list[str], k: int) -> _Phrase | None:
    """The noun phrase whose shape word is tokens[k]; None for a definite reference."""
    word, j = tokens[k], k - 1
    color = tokens[j] if j >= 0 and tokens[j] in COLORS else None
    j -= color is not None
    size = tokens[j] if j >= 0 and tokens[j] in SIZES else None
    j -= size is not None
    det = tokens[j] if j >= 0 and (tokens[j] in _COUNT_OF or tokens[j] in _ARTICLES) else None
    j -= det is not None
    if j >= 0 and tokens[j] == "the":
        return None
    singular = word in SHAPES
    count = _COUNT_OF.get(det) if det else None
    if det in _ARTICLES:
        count = 1 if singular else None
    return _Phrase(_SHAPE_OF[word], color, size, count, k + 1)


def _noun_phrases(tokens: list[str]) -> list[_Phrase]:
    phrases = (_phrase_ending_at(tokens, k) for k, t in enumerate(tokens) if t in _SHAPE_OF)
    return [p for p in phrases if p is not None]


def _mentions(phrases: list[_Phrase]) -> dict[tuple[str, str], list[int | None]]:
    mentions: dict[tuple[str, str], list[int | None]] = {}
    for p in phrases:
        if p.color is not None:
            mentions.setdefault((p.color, p.shape), []).append(p.count)
    return mentions


def claimed_counts(mentions: dict[tuple[str, str], list[int | None]]) -> dict[tuple[str, str], int]:
    """The count claimed for each (colour, shape): the sum over its mentions, when every
    mention states one. Mentions of several texts (the sentences of a caption) may be
    joined first: this is how a caption's counts add up across its sentences."""
    counts = {}
    for pair, ns in mentions.items():
        known = [n for n in ns if n is not None]
        if len(known) == len(ns):
            counts[pair] = sum(known)
    return counts


def _relations(text: str) -> list[Relation]:
    out: list[Relation] = []
    for c1, s1, rels, c2, s2 in _RELATION.findall(text):
        a, b = (c1 or None, _SHAPE_OF[s1]), (c2 or None, _SHAPE_OF[s2])
        for rel in re.findall(_REL, rels):
            if rel.endswith("left of"):
                out.append((a, "left of", b))
            elif rel.endswith("right of"):
                out.append((b, "left of", a))
            elif rel == "above":
                out.append((a, "above", b))
            else:
                out.append((b, "above", a))
    return out


def word_cells(caption: str) -> list[tuple[str, str]]:
    """(word, cell) of each sentence that quotes exactly one rendered word of the world and
    says "the <cell>" ('The word "CAT" is written in the top left'); other quoted text is
    ignored. Used to teach the tiny tower where words are (models/captioning/concepts.py)."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", caption):
        quoted = [(a or b).strip() for a, b in _QUOTED.findall(sentence)]
        quoted = [w for w in quoted if w in WORDS]
        tokens = _TOKEN.findall(_normalise(_QUOTED.sub(" | ", sentence)))
        cells = [
            found[0]
            for i in range(len(tokens))
            if tokens[i] == "the" and (found := _cell_at(tokens, i + 1))
        ]
        if len(quoted) == 1 and cells:
            out.append((quoted[0], cells[0]))
    return out


def extract_claims(caption: str) -> Claims:
    """Parse one caption into the claims it makes (rules in the module docstring)."""
    words, rest = _split_words(caption)
    text = _normalise(rest)
    tokens = _TOKEN.findall(text)
    phrases = _noun_phrases(tokens)
    mentions = _mentions(phrases)
    relations = _relations(text) if " is " in text or " are " in text else []
    claims = Claims(
        words=words, counts=claimed_counts(mentions), mentions=mentions, relations=relations
    )
    claims.background = _BACKGROUND.findall(text) if "background" in text else []
    for p in phrases:
        claims.shapes.append(p.shape)
        if p.color is not None:
            claims.colors.append((p.color, p.shape))
        if p.size is not None:
            claims.sizes.append((p.size, p.color, p.shape))
        claims.placed += [(p.size, p.color, p.shape, c) for c in _cells_after(tokens, p.end)]
    return claims


# --- scoring -------------------------------------------------------------------------


def _is(o: SceneObject, desc: Desc) -> bool:
    color, shape = desc
    return o.shape == shape and (color is None or o.color == color)


def _holds(a: SceneObject, rel: str, b: SceneObject) -> bool:
    return a.col < b.col if rel == "left of" else a.row < b.row


def _relation_facts(scene: Scene) -> list[tuple[SceneObject, str, SceneObject]]:
    objs = scene.objects
    groups = {(o.shape, o.color, o.size) for o in objs}
    if len(objs) < 2 or len(groups) != len(objs):
        return []
    return [(objs[i], rel, objs[j]) for i, rel, j in scene.relations() if 0 in (i, j)]


def _tally(
    claims: Sequence[Any],
    facts: Sequence[Any],
    is_true: Callable[[Any], bool],
    states: Callable[[Any, Any], bool],
) -> dict[str, int]:
    true_claims = [c for c in claims if is_true(c)]
    return {
        "n_claims": len(claims),
        "n_true": len(true_claims),
        "n_facts": len(facts),
        "n_facts_stated": sum(any(states(c, f) for c in true_claims) for f in facts),
    }


def _eq(claim: Any, fact: Any) -> bool:
    return claim == fact


def _judges(
    c: Claims, scene: Scene
) -> dict[str, tuple[Sequence[Any], Sequence[Any], Callable[[Any], bool], Callable]]:
    """Per kind: (the caption's claims, the scene's facts, is a claim true, does a claim
    state a fact)."""
    objs = scene.objects
    shapes = sorted({o.shape for o in objs})
    pairs = Counter((o.color, o.shape) for o in objs)
    sized = sorted({(o.size, o.color, o.shape) for o in objs})

    def placed(p: tuple[str | None, str, str], o: SceneObject) -> bool:
        return _is(o, p[:2]) and o.cell == p[2]

    def sized_as(s: tuple[str, str | None, str], o: SceneObject) -> bool:
        return o.size == s[0] and _is(o, (s[1], s[2]))

    def related(r: Relation, a: SceneObject, b: SceneObject) -> bool:
        return _is(a, r[0]) and _is(b, r[2]) and _holds(a, r[1], b)

    def relation_true(r: Relation) -> bool:
        return any(related(r, a, b) for a in objs for b in objs if a is not b)

    def relation_states(r: Relation, f: tuple[SceneObject, str, SceneObject]) -> bool:
        return r[1] == f[1] and _is(f[0], r[0]) and _is(f[2], r[2])

    return {
        "object": (c.shapes, shapes, lambda s: s in shapes, _eq),
        "colour": (c.colors, sorted(pairs), lambda p: p in pairs, _eq),
        "count": (
            sorted(c.counts.items()),
            sorted(pairs.items()),
            lambda k: pairs[k[0]] == k[1],
            _eq,
        ),
        "position": (c.positions, objs, lambda p: any(placed(p, o) for o in objs), placed),
        "relation": (c.relations, _relation_facts(scene), relation_true, relation_states),
        "word": (c.words, [scene.word] if scene.word else [], lambda w: w == scene.word, _eq),
        "size": (
            c.sizes,
            sized,
            lambda s: any(sized_as(s, o) for o in objs),
            lambda s, f: s[0] == f[0] and s[2] == f[2] and s[1] in (None, f[1]),
        ),
        "background": (
            c.background,
            [scene.background],
            lambda b: b == scene.background,
            _eq,
        ),
    }


def score_caption(caption: str, scene: Scene) -> dict:
    """Claim and fact tallies per kind for one caption, plus 'hallucinated'.

    Returns {kind: {"n_claims", "n_true", "n_facts", "n_facts_stated"}} for every kind in
    KINDS and "hallucinated": True when any claim is false.
    """
    out: dict[str, Any] = {
        k: _tally(*judge) for k, judge in _judges(extract_claims(caption), scene).items()
    }
    out["hallucinated"] = any(out[k]["n_true"] < out[k]["n_claims"] for k in KINDS)
    return out


def false_claims_by_kind(caption: str, scene: Scene) -> dict[str, int]:
    """How many of the caption's claims of each kind the scene contradicts: `score_caption`
    without the facts, for checking captions while they are written."""
    return false_claims(extract_claims(caption), SceneTruth.of(scene))


@dataclass(frozen=True)
class SceneTruth:
    """What makes each kind of claim true in one scene, as sets to look claims up in: the
    truth rules of `_judges`, computed once per scene for checks that judge many texts
    against it (a beam search judges thousands)."""

    shapes: frozenset[str]
    pairs: Counter
    placed: frozenset[tuple[str | None, str, str]]  # (colour or None, shape, cell)
    sized: frozenset[tuple[str, str | None, str]]  # (size, colour or None, shape)
    objects: tuple[SceneObject, ...]
    word: str | None
    background: str

    @classmethod
    def of(cls, scene: Scene) -> SceneTruth:
        objs = scene.objects
        return cls(
            shapes=frozenset(o.shape for o in objs),
            pairs=Counter((o.color, o.shape) for o in objs),
            placed=frozenset((c, o.shape, o.cell) for o in objs for c in (o.color, None)),
            sized=frozenset((o.size, c, o.shape) for o in objs for c in (o.color, None)),
            objects=objs,
            word=scene.word,
            background=scene.background,
        )

    def relation_holds(self, r: Relation) -> bool:
        return any(
            _is(a, r[0]) and _is(b, r[2]) and _holds(a, r[1], b)
            for a in self.objects
            for b in self.objects
            if a is not b
        )


def false_claims(claims: Claims, truth: SceneTruth) -> dict[str, int]:
    """`false_claims_by_kind` of claims already parsed, against a scene's truth."""
    pairs = truth.pairs
    return {
        "object": sum(s not in truth.shapes for s in claims.shapes),
        "colour": sum(p not in pairs for p in claims.colors),
        "count": sum(pairs[p] != n for p, n in claims.counts.items()),
        "position": sum(p not in truth.placed for p in claims.positions),
        "relation": sum(not truth.relation_holds(r) for r in claims.relations),
        "word": sum(w != truth.word for w in claims.words),
        "size": sum(z not in truth.sized for z in claims.sizes),
        "background": sum(b != truth.background for b in claims.background),
    }


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def caption_quality(
    captions: Sequence[str], scenes: Sequence[Scene]
) -> dict[str, dict[str, float]]:
    """Micro-averaged precision and recall per kind over paired captions and scenes.

    Returns {kind: {"precision", "recall", "claims", "facts"}} for every kind in KINDS and
    {"overall": {"hallucination_rate", "captions"}}.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes; expected one each")
    scores = [score_caption(c, s) for c, s in zip(captions, scenes, strict=True)]
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        tot: Counter[str] = Counter()
        for sc in scores:
            tot.update(sc[kind])
        out[kind] = {
            "precision": _ratio(tot["n_true"], tot["n_claims"]),
            "recall": _ratio(tot["n_facts_stated"], tot["n_facts"]),
            "claims": tot["n_claims"],
            "facts": tot["n_facts"],
        }
    n_bad = sum(sc["hallucinated"] for sc in scores)
    out["overall"] = {"hallucination_rate": _ratio(n_bad, len(scores)), "captions": len(scores)}
    return out


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def quality_table_markdown(results: dict[str, dict[str, dict]]) -> str:
    """A Markdown table of precision (P) and recall (R) per kind for each caption set.

    ``results`` maps a caption-set name to its ``caption_quality`` result; the last row is
    the hallucination rate (under the P column). NaN renders as "-".
    """
    names = list(results)
    header = ["kind"] + [f"{n} {m}" for n in names for m in ("P", "R")]
    rows = [header, ["---"] * len(header)]
    for kind in KINDS:
        cells = [_fmt(results[n][kind][m]) for n in names for m in ("precision", "recall")]
        rows.append([kind, *cells])
    rate = [[_fmt(results[n]["overall"]["hallucination_rate"]), ""] for n in names]
    rows.append(["hallucination rate"] + [x for pair in rate for x in pair])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
