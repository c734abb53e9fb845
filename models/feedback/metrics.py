"""How well a scorer's numbers agree with the annotators and with the utility they hold.

Scores compare only images of the same prompt (HPS v2's rule), so every measure works
within prompts:
- `pair_agreement`: over pairs, the expected share of an annotator's choices the scorer
  matches (p where it ranks a over b, 1 - p where b over a, a half on a tie); exact, given
  the choice probabilities, so no annotator noise is added on top;
- `choice_accuracy`: the same against the one choice drawn per pair (what HPD v2 can
  measure);
- `ranking_agreement`: HPS v2's benchmark number, 1 - inverted pairs / all pairs of each
  prompt's images, ranked by score against the truth (here the utility), averaged over
  prompts; pairs tied in the truth never count as inverted;
- `spearman`: Spearman correlation of score and utility within each prompt, averaged.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def pair_agreement(s_a: np.ndarray, s_b: np.ndarray, p: np.ndarray) -> float:
    order = np.sign(np.asarray(s_a) - np.asarray(s_b))
    p = np.asarray(p, dtype=float)
    return float(np.mean(np.where(order > 0, p, np.where(order < 0, 1 - p, 0.5))))


def choice_accuracy(s_a: np.ndarray, s_b: np.ndarray, choice: np.ndarray) -> float:
    order = np.sign(np.asarray(s_a) - np.asarray(s_b))
    right = np.where(np.asarray(choice) == 1, order > 0, order < 0)
    return float(np.mean(np.where(order == 0, 0.5, right)))


def inversion_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """1 - (pairs ordered one way by `predicted` and the other by `truth`) / all pairs."""
    n = len(predicted)
    if n < 2:
        raise ValueError("a ranking needs at least two items")
    i, j = np.triu_indices(n, 1)
    dp = np.sign(predicted[i] - predicted[j])
    dt = np.sign(truth[i] - truth[j])
    return float(1 - np.mean(dp * dt < 0))


def _groups(prompt_of: np.ndarray) -> list[np.ndarray]:
    members: dict[int, list[int]] = defaultdict(list)
    for k, q in enumerate(prompt_of):
        members[int(q)].append(k)
    return [np.array(m) for m in members.values() if len(m) > 1]


def ranking_agreement(scores: np.ndarray, truth: np.ndarray, prompt_of: np.ndarray) -> float:
    scores, truth = np.asarray(scores), np.asarray(truth)
    return float(np.mean([inversion_score(scores[g], truth[g]) for g in _groups(prompt_of)]))


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def spearman(scores: np.ndarray, truth: np.ndarray, prompt_of: np.ndarray) -> float:
    """Mean within-prompt Spearman rho (prompts whose truth is all equal are skipped)."""
    scores, truth = np.asarray(scores), np.asarray(truth)
    rhos = [
        np.corrcoef(ranks(scores[g]), ranks(truth[g]))[0, 1]
        for g in _groups(prompt_of)
        if np.ptp(truth[g]) > 0 and np.ptp(scores[g]) > 0
    ]
    return float(np.mean(rhos)) if rhos else float("nan")
