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

from corpus.caption_metrics import KINDS, false_claims_by_kind
from corpus.world import CELL_NAMES, Scene

PENALTY = 1000.0
_CLAUSE_ENDS = (",", ".")  # a clause is over: its last word cannot grow
_CLAUSE_KINDS = tuple(k for k in KINDS if k not in ("background", "count"))
_ENDED_KINDS = (*_CLAUSE_KINDS, "count")
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
    text = text[: max(text.rfind(" "), 0)]
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
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, scenes: list[Scene], num_beams: int):
        self.tokenizer, self.scenes, self.num_beams = tokenizer, scenes, num_beams
        # (image, text) -> false claims per kind: beams share their prefixes step after step.
        self._parsed: dict[tuple[int, str], dict[str, int]] = {}

    def _false_by_kind(self, image: int, text: str) -> dict[str, int]:
        if (image, text) not in self._parsed:
            self._parsed[image, text] = false_claims_by_kind(text, self.scenes[image])
        return self._parsed[image, text]

    def _false(self, image: int, text: str) -> int:
        """False claims in what `text` has settled: every kind but background (no head
        predicts it) and counts, which are judged in finished sentences only."""
        text = settled(text)
        false = self._false_by_kind(image, text)
        done = self._false_by_kind(image, text[: text.rfind(".") + 1])
        return sum(false[k] for k in _CLAUSE_KINDS) + done["count"]

    def _false_ended(self, image: int, text: str) -> int:
        """False claims in all of `text`, as a finished caption."""
        false = self._false_by_kind(image, text)
        return sum(false[k] for k in _ENDED_KINDS)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == 0:
            return scores
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        parents = self.tokenizer.batch_decode(input_ids[:, :-1], skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        # Ending is judged only where the search could pick it: among a row's 2 x beams
        # best tokens, as many as beam search looks at.
        k = min(2 * self.num_beams, scores.shape[-1])
        may_end = (scores[:, eos] >= scores.topk(k, dim=-1).values[:, -1]).tolist()
        for row, (text, parent) in enumerate(zip(texts, parents, strict=True)):
            image = row // self.num_beams
            text, parent = text.strip(), parent.strip()
            settled_false = self._false(image, text)
            added = settled_false - self._false(image, parent)
            if added > 0:
                scores[row] -= PENALTY * added
            if may_end[row]:
                unsettled = self._false_ended(image, text) - settled_false
                if unsettled > 0:
                    scores[row, eos] -= PENALTY * unsettled
        return scores
