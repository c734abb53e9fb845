"""RAHF's metrics on fabricated maps, scores and keywords, whose answers are known."""

import math

import numpy as np
import pytest

from models.feedback import rich_metrics as R


def _truth():
    t = np.zeros((8, 8))
    t[2:4, 2:4] = 1.0  # four fixations
    return t


def test_a_map_equal_to_the_truth_scores_perfectly_and_a_flat_one_at_chance():
    t = _truth()
    assert R.cc(t, t) == pytest.approx(1.0)
    assert R.kld(t, t) == pytest.approx(0.0, abs=1e-9)
    assert R.auc_judd(t, t) == pytest.approx(1.0)
    flat = np.ones_like(t)
    assert R.cc(flat, t) == 0.0
    # every pixel ties at the threshold: the ROC is the diagonal
    assert R.auc_judd(flat, t) == pytest.approx(0.5)
    assert R.nss(flat, t) == pytest.approx(0.0)


def test_nss_is_the_standardised_prediction_at_the_fixations():
    t = _truth()
    p = t.copy()  # 4 of 64 pixels at 1: mean 1/16, std sqrt(1/16 * 15/16)
    assert R.nss(p, t) == pytest.approx((1 - 1 / 16) / np.sqrt(15 / 256))


def test_a_map_pointing_elsewhere_is_below_chance():
    t = _truth()
    wrong = np.zeros_like(t)
    wrong[5:7, 5:7] = 1.0
    assert R.cc(wrong, t) < 0
    # a ramp that ranks most other pixels above the fixations: the ROC sags below chance
    ramp = np.linspace(1, 0, 64).reshape(8, 8)[::-1].copy()
    assert R.auc_judd(ramp, t) < 0.5 < R.auc_judd(ramp[::-1].copy(), t)
    assert R.kld(wrong, t) > R.kld(np.ones_like(t), t)


def test_heatmap_metrics_skip_images_with_nothing_to_find():
    t = _truth()
    out = R.heatmap_metrics([t, t], [t, np.zeros_like(t)])
    assert out["images"] == 1 and out["cc"] == pytest.approx(1.0)
    assert R.heatmap_metrics([t], [np.zeros_like(t)]) == {"images": 0}


def test_scores_and_keywords():
    assert R.plcc([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert R.srcc([1, 2, 3], [1, 10, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert R.plcc([1, 2, 3], [1, 10, 100]) < 1.0
    got = R.keyword_metrics([{"red", "star"}, set()], [{"red"}, {"circle"}])
    assert got["precision"] == pytest.approx(0.5)
    assert got["recall"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(0.5)


def test_keyword_f1_is_undefined_when_nothing_was_missed_or_nothing_claimed() -> None:
    assert math.isnan(R.keyword_metrics([set()], [set()])["f1"])
    assert math.isnan(R.keyword_metrics([{"red"}], [set()])["f1"])
    assert R.keyword_metrics([{"red"}], [{"star"}])["f1"] == 0.0
