"""The ablation's intervals on fabricated per-seed scores: known differences are found,
equal variants are not told apart, and seeds widen the interval."""

import numpy as np
import pytest

from models.evaluation.ablation_report import bootstrap_interval, compare, score

CATEGORIES = [c for c in ("single", "two", "colour", "position") for _ in range(16)]


def _runs(base: np.ndarray, seed_offsets: list[float], rng, noise: float = 0.05) -> np.ndarray:
    runs = [base + o + rng.normal(0, noise, base.shape) for o in seed_offsets]
    return np.clip(np.array(runs), 0, 1)


def test_a_real_difference_is_resolved_near_its_size():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, len(CATEGORIES))
    a, b = _runs(base + 0.2, [0, 0, 0], rng), _runs(base, [0, 0, 0], rng)
    d, lo, hi = bootstrap_interval(a, CATEGORIES, b, n_boot=1000)
    assert 0.15 < d < 0.25
    assert 0 < lo < d < hi


def test_equal_variants_are_not_told_apart():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, len(CATEGORIES))
    a, b = _runs(base, [0.02, -0.01, 0.0], rng), _runs(base, [0.01, 0.0, -0.02], rng)
    stats = compare({"alt_text": {"short": b}, "descriptive_95": {"short": a}}, CATEGORIES, 1000)
    (diff,) = stats["differences"]
    assert (diff["a"], diff["b"]) == ("descriptive_95", "alt_text")
    assert diff["low"] < 0 < diff["high"] and not diff["resolved"]


def test_seed_to_seed_spread_widens_the_interval():
    # Seed effects shift every prompt of a run alike: averaging over seeds hides them
    # from a bootstrap over prompts alone, not from one that also resamples seeds.
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.8, len(CATEGORIES))
    b = _runs(base, [0, 0, 0], rng)
    calm = _runs(base + 0.05, [0, 0, 0], np.random.default_rng(3))
    spread = _runs(base + 0.05, [-0.12, 0.0, 0.12], np.random.default_rng(3))
    _, lo_calm, hi_calm = bootstrap_interval(calm, CATEGORIES, b, n_boot=1000)
    _, lo_spread, hi_spread = bootstrap_interval(spread, CATEGORIES, b, n_boot=1000)
    assert hi_spread - lo_spread > 1.5 * (hi_calm - lo_calm)


def test_overall_is_the_mean_over_categories():
    cats = ["a", "a", "a", "b"]
    runs = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert score(runs, cats) == pytest.approx(0.5)  # not 0.75, the mean over prompts


def test_per_seed_scores_and_their_mean_are_reported():
    runs = np.array([[1.0, 0.0] * 32, [0.0, 0.0] * 32])
    stats = compare({"alt_text": {"descriptive": runs}}, CATEGORIES, 200)
    v = stats["variants"]["alt_text"]["descriptive"]
    assert v["per_seed"] == [pytest.approx(0.5), pytest.approx(0.0)]
    assert v["mean"] == pytest.approx(0.25) and v["low"] <= 0.25 <= v["high"]


def test_a_difference_over_other_prompts_is_refused():
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap_interval(np.zeros((2, 64)), CATEGORIES, np.zeros((2, 63)))
