"""The preference a simulated annotator holds, and how often annotators agree.

In the synthetic world a preference can have a known truth. Every image of the feedback
pool carries exact labels (`models/feedback/labels.py`), and its utility is

    U = w_alignment * A + w_plausibility * P + w_composition * C

- A, alignment: the share of the conditions the prompt's text states that hold in the
  scene the world judge reads (GenEval's kinds of condition, each counted, not only all of
  them; `corpus.prompt_suite.stated_conditions`: an annotator judges what the prompt
  says, and a descriptive prompt says more than its category's conditions);
- P, plausibility: 1 minus the mean, over the 9 grid cells, of how far the cell's pixels
  are from a clean render of what the judge reads there (an object or bare background),
  each cell's error capped at `error_cap` (a cell that far off is wholly implausible);
- C, composition: 1 when every condition holds, else 0. People judge a picture as a
  whole: an image that gets all of the prompt beats one that gets most of it by more than
  the count of conditions says.

An annotator shown images a and b of one prompt prefers a with probability
sigmoid((U_a - U_b) / tau) (Bradley-Terry). tau is set so that two annotators agree on a
pair as often as HPD v2's do: a single human's ranking agreement there is 0.781 (HPS v2,
`../shared/REFERENCES.md`). With the choice probabilities known, the best any scorer can
do against an annotator's label is known too: mean(max(p, 1 - p)), the exact ceiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HPD_V2_HUMAN_AGREEMENT = 0.781
TERMS = ("alignment", "plausibility", "composition")


@dataclass(frozen=True)
class UtilityConfig:
    w_alignment: float = 1.0
    w_plausibility: float = 1.0
    w_composition: float = 0.5
    error_cap: float = 0.25  # mean absolute error (0-1 scale) of a wholly implausible cell
    human_agreement: float = HPD_V2_HUMAN_AGREEMENT

    def without(self, term: str) -> UtilityConfig:
        """The same utility with one term's weight set to 0 (the ablations)."""
        if term not in TERMS:
            raise ValueError(f"unknown utility term {term!r}; expected one of {TERMS}")
        return UtilityConfig(**{**self.__dict__, f"w_{term}": 0.0})


def terms(label: dict, error_cap: float) -> dict[str, float]:
    """A, P and C of one labelled image (a row of the pool's labels)."""
    held = label["conditions"]
    errors = np.minimum(np.asarray(label["cell_error"], dtype=float) / error_cap, 1.0)
    return {
        "alignment": float(np.mean(held)) if held else 1.0,
        "plausibility": float(1.0 - errors.mean()),
        "composition": float(all(held)),
    }


def utility(label: dict, cfg: UtilityConfig) -> float:
    t = terms(label, cfg.error_cap)
    return sum(getattr(cfg, f"w_{k}") * t[k] for k in TERMS)


def choice_probability(u_a: np.ndarray, u_b: np.ndarray, tau: float) -> np.ndarray:
    """P(an annotator prefers a over b)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(u_a) - np.asarray(u_b)) / tau))


def annotator_agreement(p: np.ndarray) -> float:
    """How often two independent annotators make the same choice, over the pairs."""
    p = np.asarray(p, dtype=float)
    return float(np.mean(p**2 + (1 - p) ** 2))


def bayes_ceiling(p: np.ndarray) -> float:
    """The best expected agreement of any scorer with one annotator's choices."""
    p = np.asarray(p, dtype=float)
    return float(np.mean(np.maximum(p, 1 - p)))


def fit_tau(delta_u: np.ndarray, target: float = HPD_V2_HUMAN_AGREEMENT) -> float:
    """The tau at which two annotators agree on `target` of the pairs (bisection in
    log tau: agreement falls as tau grows)."""
    delta_u = np.asarray(delta_u, dtype=float)
    if len(delta_u) == 0:
        raise ValueError("no pairs to fit tau on")
    # Ties (equal utility) are coin flips at any tau: they bound the agreement reachable.
    reachable = 0.5 * np.mean(delta_u == 0) + np.mean(delta_u != 0)
    if not 0.5 < target < reachable:
        raise ValueError(
            f"annotator agreement {target} cannot be reached on these pairs: it must lie "
            f"between 0.5 and {reachable:.3f} ({np.mean(delta_u == 0):.1%} of pairs have "
            "equal utility)"
        )
    lo, hi = math.log(1e-6), math.log(1e3)
    for _ in range(100):
        mid = (lo + hi) / 2
        agree = annotator_agreement(choice_probability(delta_u, 0.0, math.exp(mid)))
        lo, hi = (mid, hi) if agree > target else (lo, mid)
    return math.exp((lo + hi) / 2)


def annotate(p: np.ndarray, seed: int) -> np.ndarray:
    """One annotator's choice per pair: 1 where a is preferred, 0 where b is."""
    rng = np.random.default_rng(seed)
    return (rng.random(len(p)) < np.asarray(p)).astype(np.int64)
