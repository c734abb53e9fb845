"""The inversion dataset of prompt expansion (Datta et al. 2023): prompts are the
recaptioned dataset's descriptive captions, and queries are derived from them by dropping
what they state, one level per control prefix:

- `<abst>`: the main subject only, the short caption or its shape alone ("two circles");
- `<dtl>`: every object with its colour and count, sizes half the time ("a red circle
  and a blue square");
- `<mstp>`: every object and its places; background, relations and word dropped (a
  multi-step expansion feeds an expansion back in at this level);
- `<rft>`: any level; the pairs that re-fine-tuning kept because the generator drew them.

The paper's ABST, DTL, MSTP and RFT play these parts; with prefix dropout the model
learns to pick the level from the query itself. A caption is parsed with the project's
caption metrics (`corpus.caption_metrics`); one whose claims do not hang together (a
truncated or looping captioner output) is not a prompt to learn, and is counted by reason.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from corpus.caption_metrics import Claims, extract_claims
from corpus.scene_text import NUMBER_WORDS, plural

PREFIXES: tuple[str, ...] = ("<abst>", "<dtl>", "<mstp>", "<rft>")
LEVELS: tuple[str, ...] = PREFIXES[:3]  # the levels a query is derived at; <rft> is earned


def noun_phrase(n: int, words: list[str], shape: str) -> str:
    """ "a small red circle", "two red circles": n objects described by `words`."""
    if n == 1:
        text = " ".join([*words, shape])
        return ("an " if text[0] in "aeiou" else "a ") + text
    return " ".join([NUMBER_WORDS[n], *words, plural(shape)])


@dataclass(frozen=True)
class Group:
    """Objects a caption states alike: how many, their size, colour, shape and cells."""

    size: str | None
    colour: str | None
    shape: str
    cells: tuple[str, ...]

    def phrase(self, with_size: bool = True, with_colour: bool = True) -> str:
        words = ([self.size] if with_size and self.size else []) + (
            [self.colour] if with_colour and self.colour else []
        )
        return noun_phrase(len(self.cells), words, self.shape)

    def placed(self) -> str:
        cells = [f"the {c}" for c in self.cells]
        where = cells[0] if len(cells) == 1 else ", ".join(cells[:-1]) + " and " + cells[-1]
        return f"{self.phrase()} in {where}"


def groups(claims: Claims) -> list[Group]:
    """The caption's placed objects grouped by (size, colour, shape), in caption order."""
    cells: dict[tuple[str | None, str | None, str], list[str]] = {}
    for size, colour, shape, cell in claims.placed:
        cells.setdefault((size, colour, shape), []).append(cell)
    return [Group(size, colour, shape, tuple(c)) for (size, colour, shape), c in cells.items()]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relation_query(claims: Claims, with_colour: bool, rng: random.Random) -> str:
    """The caption's first relation in the prompt suite's short form ("a star above a
    square"), either way round."""
    (c1, s1), rel, (c2, s2) = claims.relations[0]
    a = noun_phrase(1, [c1] if with_colour and c1 else [], s1)
    b = noun_phrase(1, [c2] if with_colour and c2 else [], s2)
    if rng.random() < 0.5:
        return f"{a} {rel} {b}"
    return f"{b} {'right of' if rel == 'left of' else 'below'} {a}"


def derive_query(
    claims: Claims, level: str, rng: random.Random, relation_share: float = 0.5
) -> str:
    """The query of a caption's claims at `level` (one of LEVELS). At `<abst>` and `<dtl>`,
    `relation_share` of the queries of a caption with a relation ask for it, and half of
    those with a word keep it (the suite asks for both)."""
    if level in ("<abst>", "<dtl>"):
        query = _objects_query(claims, level, rng)
        if claims.relations and rng.random() < relation_share:
            query = relation_query(claims, level == "<dtl>", rng)
        if claims.words and rng.random() < 0.5:
            word = f'the word "{claims.words[0]}"'
            query = word if level == "<abst>" else f"{query} and {word}"
        return query
    if level == "<mstp>":
        return _join([g.placed() for g in groups(claims)])
    raise ValueError(f"unknown query level {level!r}; expected one of {LEVELS}")


def _objects_query(claims: Claims, level: str, rng: random.Random) -> str:
    gs = groups(claims)
    if level == "<abst>":
        main = gs[0]
        coloured = main.colour is not None and rng.random() < 0.5
        # "two circles" counts every circle; "two red circles" the red ones
        same = [
            g for g in gs if g.shape == main.shape and (not coloured or g.colour == main.colour)
        ]
        colour = [main.colour] if coloured else []
        return noun_phrase(sum(len(g.cells) for g in same), colour, main.shape)
    with_size = rng.random() < 0.5
    return _join([g.phrase(with_size=with_size) for g in gs])


def unusable(caption: str, claims: Claims) -> str | None:
    """Why a caption is not a prompt to learn from, or None when it is."""
    if not claims.placed:
        return "no_placed_object"
    if not caption.rstrip().endswith("."):
        return "truncated"
    if len(claims.background) != 1:
        return "not_one_background"
    placed = Counter((colour, shape) for _, colour, shape, _ in claims.placed)
    if any(placed[pair] != n for pair, n in claims.counts.items()):
        return "count_not_placed"
    named = {
        (colour, shape) for colour, shape in (d for a, _, b in claims.relations for d in (a, b))
    }
    if named - set(placed):
        return "relation_names_unplaced_object"
    occupied = Counter(cell for *_, cell in claims.placed)
    if max(occupied.values()) > 1:
        return "cell_stated_twice"
    if len(claims.words) > 1 or caption.count('"') % 2:
        return "broken_word"
    return None


@dataclass(frozen=True)
class Pair:
    prefix: str
    query: str
    prompt: str


def inversion_pairs(
    captions: list[str], seed: int, levels: tuple[str, ...] = LEVELS, relation_share: float = 0.5
) -> tuple[list[Pair], Counter]:
    """One (prefix, query, prompt) pair per usable caption and level, and the count of
    captions skipped, by reason (`relation_share`: `derive_query`'s)."""
    rng = random.Random(seed)
    pairs, skipped = [], Counter()
    for caption in captions:
        claims = extract_claims(caption)
        reason = unusable(caption, claims)
        if reason:
            skipped[reason] += 1
            continue
        pairs += [
            Pair(lv, derive_query(claims, lv, rng, relation_share), caption.strip())
            for lv in levels
        ]
    return pairs, skipped
