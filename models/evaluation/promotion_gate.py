"""The regression gate: is the challenger worse than the champion beyond noise?

Both models are scored on the same prompt suite; each prompt's score is the share of its
images that pass every condition. The gate bootstraps the mean paired difference
(challenger - champion) over prompts: the challenger is worse beyond noise when the whole
confidence interval lies below zero, and is promoted otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean of `values`, resampled with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def promotion_decision(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Per-prompt scores {prompt key: score} of both models -> the gate's decision.

    With no champion the challenger is promoted. Prompts present for only one model are
    an error: the two were not scored on the same suite."""
    if champion is None:
        return {"promote": True, "reason": "no champion yet", "n_prompts": len(challenger)}
    if set(challenger) != set(champion):
        only = sorted(set(challenger) ^ set(champion))
        raise ValueError(
            f"challenger and champion were scored on different prompts ({len(only)} differ, "
            f"e.g. {only[:3]}); re-score the champion on this suite"
        )
    keys = sorted(challenger)
    diff = np.array([challenger[k] - champion[k] for k in keys], dtype=np.float64)
    low, high = bootstrap_ci(diff, n_boot, level, seed)
    worse = high < 0
    return {
        "promote": not worse,
        "reason": (
            f"worse beyond noise: mean difference {diff.mean():+.3f}, "
            f"{level:.0%} CI [{low:+.3f}, {high:+.3f}] below 0"
            if worse
            else f"not worse beyond noise: mean difference {diff.mean():+.3f}, "
            f"{level:.0%} CI [{low:+.3f}, {high:+.3f}]"
        ),
        "mean_difference": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
        "level": level,
        "n_prompts": len(keys),
        "challenger_mean": float(np.mean([challenger[k] for k in keys])),
        "champion_mean": float(np.mean([champion[k] for k in keys])),
    }
