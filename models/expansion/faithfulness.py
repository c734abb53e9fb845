"""Is an expansion faithful to its query, and how varied are a query's expansions?

Both texts are parsed with the caption metrics (`corpus.caption_metrics`). An expansion
*drops* a claim of the query when it states nothing equal to it (a missing colour in the
query matches any colour, as in caption scoring), and *contradicts* it when it states the
same thing otherwise: another count for a (colour, shape), or for a shape the query
names without colour, another background or another word. An expansion is faithful
when it does neither. What the query leaves free (sizes, places, background, word, more
objects) the expansion may fill in; their spread over a query's expansions is its
diversity.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

from corpus.caption_metrics import Claims, extract_claims
from corpus.scene_text import NUMBER_WORDS, plural
from corpus.world import CELL_NAMES, COLORS, SHAPES, SIZES
from models.expansion.queries import unusable

_SHAPE_WORDS = {s: s for s in SHAPES} | {plural(s): s for s in SHAPES}
_UNCOLOURED = re.compile(
    rf"\b(an?|one|two|three|four)\s+(?:(?:{'|'.join(SIZES)})\s+)?"
    rf"({'|'.join(sorted(_SHAPE_WORDS, key=len, reverse=True))})\b"
)
_NUMBERS = {"a": 1, "an": 1} | {w: n for n, w in NUMBER_WORDS.items()}


_PHRASE = (
    rf"an? (?:({'|'.join(COLORS)}) )?({'|'.join(sorted(_SHAPE_WORDS, key=len, reverse=True))})"
)
_QUERY_RELATION = re.compile(
    rf"\b{_PHRASE} (?:to the )?(left of|right of|above|below) {_PHRASE}\b", re.IGNORECASE
)
_ROW_COL = {name: rc for rc, name in CELL_NAMES.items()}


def query_relations(text: str) -> list[tuple]:
    """The relations a short query asks for ("a star above a square"), as caption metrics
    store them: ((colour or None, shape), "left of" | "above", (colour or None, shape))."""
    out = []
    for c1, s1, rel, c2, s2 in _QUERY_RELATION.findall(text.lower()):
        a, b = (c1 or None, _SHAPE_WORDS[s1]), (c2 or None, _SHAPE_WORDS[s2])
        if rel in ("right of", "below"):
            a, b, rel = b, a, "left of" if rel == "right of" else "above"
        out.append((a, rel, b))
    return out


def _relation_kept(rel: tuple, e: Claims) -> bool:
    """The expansion states the relation, or places two such objects so."""
    (c1, s1), kind, (c2, s2) = rel
    if any(_states((c1, s1, kind, c2, s2), [(*a, k, *b)]) for a, k, b in e.relations):
        return True
    axis = 1 if kind == "left of" else 0
    firsts = [_ROW_COL[cell] for _, c, s, cell in e.placed if s == s1 and c1 in (None, c)]
    seconds = [_ROW_COL[cell] for _, c, s, cell in e.placed if s == s2 and c2 in (None, c)]
    return any(a[axis] < b[axis] for a in firsts for b in seconds)


def uncoloured_counts(text: str, claims: Claims | None = None) -> dict[str, int]:
    """The number of objects of each shape a text states without a colour ("two
    circles", "a large star"); a coloured mention elsewhere leaves that shape out.
    `claims`: the text's, when already parsed."""
    counts: Counter = Counter()
    for det, word in _UNCOLOURED.findall(_QUERY_RELATION.sub(" ", text.lower())):
        counts[_SHAPE_WORDS[word]] += _NUMBERS[det]
    coloured = {shape for _, shape in (claims or extract_claims(text)).colors}
    return {s: n for s, n in counts.items() if s not in coloured}


@lru_cache(maxsize=4096)
def _query(query: str) -> tuple[Claims, list[tuple], dict, dict[str, int]]:
    """A query parsed once for all its candidate expansions: its claims, the relations
    of its short form, the counts it claims for coloured objects ("a red star above a
    square" asks where a red star is, not that there is only one) and uncoloured ones."""
    q = extract_claims(query)
    coloured = extract_claims(_QUERY_RELATION.sub(" ", query)).counts
    return q, q.relations + query_relations(query), coloured, uncoloured_counts(query, q)


def _states(claim: tuple, stated: list[tuple]) -> bool:
    return any(all(a is None or a == b for a, b in zip(claim, s, strict=True)) for s in stated)


def check(query: str, expansion: str) -> dict[str, list[str]]:
    """The query's claims the expansion drops and contradicts, as readable strings."""
    (q, relations, coloured, uncoloured), e = _query(query), extract_claims(expansion)
    dropped, contradicted = [], []
    for shape in q.shapes:
        if shape not in e.shapes:
            dropped.append(f"object {shape}")
    for colour, shape in q.colors:
        if (colour, shape) not in e.colors:
            dropped.append(f"colour {colour} {shape}")
    for size, colour, shape in q.sizes:
        if not _states((size, colour, shape), e.sizes):
            dropped.append(f"size {size} {colour or ''} {shape}".replace("  ", " "))
    for colour, shape, cell in q.positions:
        if not _states((colour, shape, cell), e.positions):
            dropped.append(f"position {colour or ''} {shape} {cell}".replace("  ", " "))
    for rel in relations:
        if not _relation_kept(rel, e):
            dropped.append(f"relation {rel}")
    # "two circles" claims the number of circles, which an expansion states by placing
    # them; "a red circle" only that of red ones
    placed = dict(Counter(shape for _, _, shape, _ in e.placed))
    for counts, other in ((coloured, e.counts), (uncoloured, placed)):
        for key, n in counts.items():
            if key in other and other[key] != n:
                contradicted.append(f"count {key}: {n} -> {other[key]}")
    for kind, qs, es in (("background", q.background, e.background), ("word", q.words, e.words)):
        for value in qs:
            if value not in es:
                (contradicted if es else dropped).append(f"{kind} {value}")
    return {"dropped": dropped, "contradicted": contradicted}


def faithful(query: str, expansion: str) -> bool:
    verdict = check(query, expansion)
    return not verdict["dropped"] and not verdict["contradicted"]


def coherent(expansion: str) -> bool:
    """The expansion hangs together as a training caption must (one background, one object
    per cell, counts its places add up to...: `queries.unusable`)."""
    return unusable(expansion, extract_claims(expansion)) is None


def keep_faithful(queries: list[str], sampled: list[list[str]], n: int) -> list[list[str]]:
    """Per query, the first `n` of its sampled expansions that are faithful to it and
    coherent: what a generator may be given."""
    return [
        [t for t in ts if faithful(q, t) and coherent(t)][:n]
        for q, ts in zip(queries, sampled, strict=True)
    ]


def _free_attributes(c: Claims) -> dict[str, str]:
    """What an expansion chose that a short query leaves open."""
    return {
        "background": ",".join(sorted(c.background)),
        "places": ",".join(sorted(cell for *_, cell in c.placed)),
        "sizes": ",".join(sorted(str(size) for size, *_ in c.placed)),
        "objects": str(len(c.placed)),
        "word": ",".join(c.words),
    }


def _entropy(values: list[str]) -> float:
    n = len(values)
    return -sum(k / n * math.log2(k / n) for k in Counter(values).values())


def diversity(expansions: list[str]) -> dict[str, float]:
    """Per free attribute, the entropy (bits) of its values over one query's expansions,
    and the share of distinct texts."""
    attrs = [_free_attributes(extract_claims(t)) for t in expansions]
    out = {k: _entropy([a[k] for a in attrs]) for k in attrs[0]} if attrs else {}
    out["distinct_texts"] = len(set(expansions)) / max(len(expansions), 1)
    return out
