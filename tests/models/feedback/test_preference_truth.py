"""The preference's known truth: utility, annotators, labels, and the measures against it."""

import numpy as np
import pytest
import torch

from corpus.prompt_suite import build_suite
from corpus.world import Scene, SceneObject
from models.feedback import metrics as M
from models.feedback.labels import cell_errors
from models.feedback.utility import (
    UtilityConfig,
    annotate,
    annotator_agreement,
    bayes_ceiling,
    choice_probability,
    fit_tau,
    terms,
    utility,
)

CLEAN = [0.0] * 9


def label(conditions, cell_error=CLEAN):
    return {"conditions": conditions, "cell_error": cell_error}


def test_utility_adds_alignment_plausibility_and_the_whole_prompt_bonus():
    cfg = UtilityConfig(w_alignment=1.0, w_plausibility=1.0, w_composition=0.5, error_cap=0.2)
    assert utility(label([True, True]), cfg) == pytest.approx(1 + 1 + 0.5)
    assert utility(label([True, False]), cfg) == pytest.approx(0.5 + 1)
    # one cell half the cap away, one far beyond it (capped): P = 1 - (0.5 + 1) / 9
    messy = [0.1, 0.9] + [0.0] * 7
    assert terms(label([True], messy), 0.2)["plausibility"] == pytest.approx(1 - 1.5 / 9)
    # getting all of a prompt beats getting most of it by more than one condition's worth
    two_of_two = utility(label([True, True]), cfg)
    one_of_two = utility(label([True, False]), cfg)
    assert two_of_two - one_of_two > 0.5


def test_a_term_left_out_no_longer_moves_the_utility():
    cfg = UtilityConfig().without("plausibility")
    assert utility(label([True], [0.0] * 9), cfg) == utility(label([True], [1.0] * 9), cfg)
    with pytest.raises(ValueError, match="unknown utility term"):
        UtilityConfig().without("beauty")


def test_tau_makes_annotators_agree_as_often_as_asked_and_the_ceiling_is_exact():
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 0.5, 5000)
    tau = fit_tau(delta, 0.781)
    p = choice_probability(delta, 0.0, tau)
    assert annotator_agreement(p) == pytest.approx(0.781, abs=1e-6)
    # the ceiling: p where p > 1/2; above two annotators' agreement, below 1
    assert 0.781 < bayes_ceiling(p) < 1
    # annotators' choices follow p: on the pairs an annotator prefers a 90% of the time
    sure = choice_probability(np.full(20000, 1.0), 0.0, 1.0 / np.log(9))
    assert annotate(sure, seed=1).mean() == pytest.approx(0.9, abs=0.01)


def test_an_agreement_that_ties_cannot_reach_is_refused():
    delta = np.array([0.0, 0.0, 0.0, 1.0])  # three coin flips: at most 0.625 agreement
    with pytest.raises(ValueError, match="cannot be reached"):
        fit_tau(delta, 0.781)


def test_agreement_with_annotators_is_p_where_the_scorer_follows_them():
    p = np.array([0.9, 0.8, 0.6])
    s_a, s_b = np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5])
    # right on the first (0.9), wrong on the second (0.2), a tie on the third (0.5)
    assert M.pair_agreement(s_a, s_b, p) == pytest.approx((0.9 + 0.2 + 0.5) / 3)
    assert M.choice_accuracy(s_a, s_b, np.array([1, 1, 0])) == pytest.approx((1 + 0 + 0.5) / 3)
    # a scorer that ranks by p's side reaches the ceiling exactly
    assert M.pair_agreement(p - 0.5, 0 * p, p) == pytest.approx(bayes_ceiling(p))


def test_ranking_agreement_counts_inverted_pairs_within_prompts():
    truth = np.array([3.0, 2.0, 1.0, 5.0, 5.0, 1.0])
    prompt_of = np.array([0, 0, 0, 1, 1, 1])
    assert M.ranking_agreement(truth, truth, prompt_of) == 1.0
    # prompt 0 fully reversed (3 of 3 pairs inverted); prompt 1: the truth's tie never counts
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 0.0])
    assert M.ranking_agreement(scores, truth, prompt_of) == pytest.approx((0 + 1) / 2)
    # scores are compared only within a prompt: an offset per prompt changes nothing
    shifted = scores + np.array([0, 0, 0, 100, 100, 100])
    assert M.ranking_agreement(shifted, truth, prompt_of) == M.ranking_agreement(
        scores, truth, prompt_of
    )
    assert M.spearman(truth, truth, prompt_of) == pytest.approx(1.0)
    assert M.spearman(-truth, truth, prompt_of) == pytest.approx(-1.0)


def test_cell_errors_place_a_difference_in_its_grid_cell():
    clean = torch.zeros(1, 3, 30, 30, dtype=torch.uint8)
    drawn = clean.clone()
    drawn[0, :, 10:20, 20:30] = 255  # the middle row, right column: cell 5
    err = cell_errors(drawn, clean)
    assert err.shape == (1, 9)
    assert err[0, 5] == pytest.approx(1.0)
    assert err[0].sum() == pytest.approx(1.0)


def test_labels_read_conditions_from_the_judged_scene():
    from models.feedback.labels import label_images

    prompt = next(p for p in build_suite(2) if p.category == "two_objects")
    wanted = [c for c in prompt.conditions if c.kind == "object"]
    first = wanted[0]
    colour = first.colour or prompt.scene.objects[0].color
    scene = Scene((SceneObject(first.shape, colour, "large", 1, 1),), prompt.scene.background)

    class Judge:  # reads the scene we say the image shows
        def predict(self, images):
            return [scene] * len(images)

    from models.evaluation.world_judge import render_scenes

    image = render_scenes([scene], 32)
    (row,) = label_images(image, [prompt], ["short"], Judge())
    assert row["conditions"][0] is True
    assert row["conditions"] == [c == first for c in prompt.conditions]
    assert row["object_cells"] == [4]
    assert max(row["cell_error"]) < 0.02  # the image is the clean render of what is read


# --- the loss and the uses, on fabricated scores ---------------------------------------


def test_the_loss_is_the_two_way_softmax_of_hps_v2_and_follows_the_choice():
    from models.feedback.preference import PreferenceConfig, PreferenceModule

    class Scores(torch.nn.Module):  # a reading stands for its own score
        def encode_text(self, ids):
            return None, None

        def alignment_score(self, reading, text, mask):
            return reading

        def plausibility_score(self, reading):
            return torch.zeros_like(reading)

    # No scene to add an unnamed object to: the pairs' loss alone.
    module = PreferenceModule(Scores(), PreferenceConfig(unnamed_invariance=0.0))
    module.log_dict = lambda *a, **k: None
    batch = {
        "a": torch.tensor([0.55, 0.45]),
        "b": torch.tensor([0.45, 0.55]),
        "ids": None,
        "choice": torch.tensor([1, 0]),
    }
    loss = module.training_step(batch, 0)
    # both pairs chose the side with the higher score: -log softmax(0.1)
    expected = torch.nn.functional.softplus(torch.tensor(-0.1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    flipped = module.training_step({**batch, "choice": torch.tensor([0, 1])}, 0)
    assert flipped.item() > loss.item()


def _fake_pool(scores_by_image, passed, splits=("test",)):
    """A pool of one prompt per split entry, one generator, the images given."""
    from models.feedback.pool import Pool, PoolConfig

    n = len(passed)
    labels = [
        {"generator": "g", "prompt": 0, "sample": i, "conditions": [passed[i]], "cell_error": CLEAN}
        for i in range(n)
    ]
    cfg = PoolConfig(images_per_generator=n)
    prompts = [{"text": "p", "split": s} for s in splits]
    return Pool(
        torch.zeros(n, 3, 4, 4, dtype=torch.uint8), labels, ["p"] * n, {}, prompts, 1.0, cfg
    )


def test_best_of_n_picks_the_top_score_and_compares_with_the_mean_of_the_n():
    from models.feedback.preference import best_of_n, generator_table

    passed = [False, True, False, False]
    pool = _fake_pool(None, passed)
    utilities = np.array([0.0, 2.0, 0.5, 0.0])
    good = best_of_n(np.array([0.1, 0.9, 0.2, 0.3]), pool, utilities, n_boot=50)
    assert good["n"] == 4
    assert good["all_conditions"]["best_of_n"] == 1.0
    assert good["all_conditions"]["random"] == pytest.approx(0.25)
    assert good["utility"]["difference"] == pytest.approx(2.0 - 2.5 / 4)
    bad = best_of_n(np.array([0.9, 0.1, 0.2, 0.3]), pool, utilities, n_boot=50)
    assert bad["all_conditions"]["difference"] == pytest.approx(-0.25)
    (row,) = generator_table(np.array([0.1, 0.9, 0.2, 0.3]), pool, utilities)
    assert row["all_conditions"] == pytest.approx(0.25)
    assert row["preference"] == pytest.approx(0.375)
