"""Beam search that checks a caption against the scene the captioner's concept heads see
while it is written, instead of only reranking finished captions.

Why (docs/log/): reranking the best beams by their contradictions left much of DSC's
hallucination: for many images none of the beams was right, as the beams had all kept a
false claim made early (the first sentence names every object, its count and its cell).
Here a beam loses `PENALTY` log-probability per false claim as soon as the words making
it are settled (`settled`), so the beams that stay consistent outrank it at once and the
search spends its width on them. The penalty is far beyond any caption's log-likelihood:
the order is fewer contradictions first, then likelihood.

Checked at clause ends only, the search learned to put the check off: beams that never
wrote "," or "." rambled past the penalised ones (word precision fell; docs/log/).
So every settled word is checked, and ending a caption is charged for what the end settles.
Counts are judged in finished sentences: "a small red star in the top left, a large red star in
the center" states two red stars once its sentence is over, and one after its first clause.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from corpus.caption_metrics import (
    KINDS,
    Claims,
    SceneTruth,
    claimed_counts,
    extract_claims,
    false_claims,
)
from corpus.world import CELL_NAMES, Scene

PENALTY = 1000.0
_CLAUSE_ENDS = (",", ".")  # a clause is over: its last word cannot grow
_CLAUSE_KINDS = tuple(k for k in KINDS if k not in ("background", "count"))
# Cell names that a longer one continues ("center" -> "center left"): not settled yet.
_GROWING_CELLS = tuple(
    c for c in CELL_NAMES.values() if any(o.startswith(c + " ") for o in CELL_NAMES.values())
)


def settled(text: str) -> str:
    """The part of a caption being written whose claims can no longer change: all of it
    after a clause ends, else all but its last word (it may still grow: "cir" -> "circle",
    '"TO' -> '"TOY"'), and without a last cell name that a longer one continues ("center"
    -> "center left")."""
    if text.endswith(_CLAUSE_ENDS):
        return text
    return without_growing_cell(text[: max(text.rfind(" "), 0)])


def without_growing_cell(text: str) -> str:
    """`text` without a last cell name that a longer one continues ("center" -> "center
    left"): that claim is not made yet."""
    for cell in _GROWING_CELLS:
        if text.endswith(cell):
            return text[: -len(cell)].rstrip()
    return text


class ClauseCheck(LogitsProcessor):
    """Penalises a beam by the false claims its last token settled, and its end of caption
    by the false claims the end would settle (the last word, the counts of an unfinished
    sentence), so every finished caption was checked whole.

    Rows of `input_ids` are (image, beam) pairs, image-major, as transformers' beam search
    lays them out; with `inputs_embeds` they hold the generated tokens only.

    The work per step is kept to what the step changed. A row's text is its parent row's
    text (the same ids but the last, decoded at the step before) plus its last token's text.
    A caption's claims of every kind but count are claims of one sentence each (a noun
    phrase, its cell, a relation, a quoted word: the parser never reads across a "."), so
    the false ones of a text are those of its finished sentences, parsed once per
    (image, finished text) as beams share them, plus those of the sentence being written.
    Counts add mentions across sentences and are judged on finished sentences only, also
    once per (image, finished text).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, scenes: list[Scene], num_beams: int):
        self.tokenizer, self.scenes, self.num_beams = tokenizer, scenes, num_beams
        every_token = [[i] for i in range(len(tokenizer))]
        pieces = tokenizer.batch_decode(every_token, skip_special_tokens=True)
        # A byte of a multi-byte character decodes only together with its neighbours.
        self._pieces = [None if "\ufffd" in p else p for p in pieces]
        self._texts: dict[tuple[int, ...], str] = {(): ""}  # the last step's ids -> text
        self._claims: dict[str, Claims] = {}  # text -> what it states, whatever the image
        self._judged: dict[tuple[int, str], dict[str, int]] = {}  # false claims by kind
        self._clauses: dict[tuple[int, str], int] = {}  # false clause-kind claims
        # `_false` per (image, settled part): each row's is its next row's parent's.
        self._settled: dict[tuple[int, str], int] = {}
        self._ended: dict[tuple[int, str], int] = {}  # `_false_ended` per (image, text)
        self._truths = [SceneTruth.of(sc) for sc in scenes]

    def _parse(self, text: str) -> Claims:
        if text not in self._claims:
            self._claims[text] = extract_claims(text)
        return self._claims[text]

    def _false_by_kind(self, image: int, text: str) -> dict[str, int]:
        if (image, text) not in self._judged:
            self._judged[image, text] = false_claims(self._parse(text), self._truths[image])
        return self._judged[image, text]

    def _clause_total(self, image: int, text: str) -> int:
        """False claims of the clause kinds in `text`, parsed whole (one sentence, or
        finished sentences)."""
        if (image, text) not in self._clauses:
            false = self._false_by_kind(image, text)
            self._clauses[image, text] = sum(false[k] for k in _CLAUSE_KINDS)
        return self._clauses[image, text]

    def _clause_false(self, image: int, text: str) -> int:
        """False claims of the clause kinds in `text`: its finished sentences', then its
        last sentence's."""
        cut = text.rfind(".") + 1
        finished = self._clause_total(image, text[:cut]) if cut else 0
        return finished + self._clause_total(image, text[cut:])

    def _false(self, image: int, text: str) -> int:
        """False claims in what `text` has settled: every kind but background (no head
        predicts it) and counts, which are judged in finished sentences only."""
        return self._false_settled(image, settled(text))

    def _false_settled(self, image: int, part: str) -> int:
        # Keyed by the settled part: most tokens do not finish a word, so a row's settled
        # part is usually its parent's, already judged.
        if (image, part) not in self._settled:
            done = part[: part.rfind(".") + 1]
            count = self._false_by_kind(image, done)["count"]
            self._settled[image, part] = self._clause_false(image, part) + count
        return self._settled[image, part]

    def look_ahead(self, image: int, text: str, parent: str) -> int:
        """The false claims `text` adds to its parent's settled ones if its last word is
        complete (a cell name that a longer one continues is left out)."""
        part = without_growing_cell(text.strip())
        return max(self._false_settled(image, part) - self._false(image, parent.strip()), 0)

    def _false_ended(self, image: int, text: str) -> int:
        """False claims in all of `text`, as a finished caption: its counts add the mentions
        of its finished sentences and of its last one."""
        if (image, text) not in self._ended:
            self._ended[image, text] = self._count_ended(image, text)
        return self._ended[image, text]

    def _count_ended(self, image: int, text: str) -> int:
        cut = text.rfind(".") + 1
        mentions = {k: list(v) for k, v in self._parse(text[:cut]).mentions.items()}
        for pair, ns in self._parse(text[cut:]).mentions.items():
            mentions.setdefault(pair, []).extend(ns)
        pairs = self._truths[image].pairs
        false_counts = sum(pairs[p] != n for p, n in claimed_counts(mentions).items())
        return self._clause_false(image, text) + false_counts

    def extend(self, parent: str, ids: list[int]) -> str:
        """The text of `ids` given the text of all of them but the last, as `decode` would
        give it."""
        piece = self._pieces[ids[-1]]
        if piece is None or "\ufffd" in parent:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return parent + piece

    def _decode(self, rows: list[list[int]]) -> tuple[list[str], list[str]]:
        """(text, parent's text) per row, each as `batch_decode` would give it."""
        texts, parents, seen = [], [], {}
        for ids in rows:
            key = tuple(ids)
            parent = self._texts.get(key[:-1])
            if parent is None:  # not decoded at the last step (e.g. the first call)
                parent = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
            seen[key] = text = self.extend(parent, ids)
            texts.append(text)
            parents.append(parent)
        self._texts = seen
        return texts, parents

    def charge(self, images: list[int], texts: list[str], parents: list[str]) -> list[int]:
        """Per row (its image, its text and its parent row's text): the false claims its
        last token settled."""
        return [
            self._false(image, text.strip()) - self._false(image, parent.strip())
            for image, text, parent in zip(images, texts, parents, strict=True)
        ]

    def charge_end(self, images: list[int], texts: list[str], may_end: list[bool]) -> list[int]:
        """Per row: the false claims that ending it now would settle (0 where the search
        could not end it)."""
        return [
            self._false_ended(image, t.strip()) - self._false(image, t.strip()) if end else 0
            for image, t, end in zip(images, texts, may_end, strict=True)
        ]

    def may_end(self, scores: torch.Tensor) -> list[bool]:
        """Ending is judged only where the search could pick it: among a row's 2 x beams
        best tokens, as many as beam search looks at."""
        k = min(2 * self.num_beams, scores.shape[-1])
        eos = self.tokenizer.eos_token_id
        return (scores[:, eos] >= scores.topk(k, dim=-1).values[:, -1]).tolist()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == 0:
            return scores
        texts, parents = self._decode(input_ids.tolist())
        images = [row // self.num_beams for row in range(len(texts))]
        added = self.charge(images, texts, parents)
        at_end = self.charge_end(images, texts, self.may_end(scores))
        eos = self.tokenizer.eos_token_id
        for row, (a, e) in enumerate(zip(added, at_end, strict=True)):
            if a > 0:
                scores[row] -= PENALTY * a
            if e > 0:
                scores[row, eos] -= PENALTY * e
        return scores
