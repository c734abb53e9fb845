"""The expander's faithfulness DPO: the loss on fabricated log-probabilities, pairs built
from hand-made expansions, queries that never hold an eval-suite prompt, a round that
moves a tiny expander towards the faithful expansion, and the step inside training."""

from __future__ import annotations

import math

import pytest
import torch

from corpus.prompt_suite import load_suite
from models.expansion.dpo import (
    DPOConfig,
    dpo_loss,
    dpo_queries,
    dpo_round,
    preference_pairs,
    sequence_logp,
)
from models.expansion.model import new_expander
from models.expansion.queries import Pair
from models.expansion.train import LMConfig, train_expander, unprefixed_batch
from tests.models.expansion.test_expansion import CAPTION, _recaptioned, tiny_expander_config

QUERY = "a star above a square"
KEPT = (
    "A large red star in the top left and a small blue square in the bottom left, on a "
    "black background. The red star is above the blue square."
)
TURNED = (
    "A large red square in the top left and a small blue star in the bottom left, on a "
    "black background. The red square is above the blue star."
)
TWO_IN_ONE_CELL = (
    "A large red star in the top left and a small blue square in the top left, on a "
    "black background. The red star is above the blue square."
)


def test_dpo_loss_is_log_2_at_the_reference_and_falls_as_the_faithful_one_gains():
    ref_c, ref_r = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    loss, ranked = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert ranked.item() == 0.0  # a margin of exactly 0 ranks nothing first
    # the faithful expansion 5 nats more likely, the unfaithful 5 less: margin 10 each
    loss, ranked = dpo_loss(ref_c + 5, ref_r - 5, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert ranked.item() == 1.0
    worse, _ = dpo_loss(ref_c - 5, ref_r + 5, ref_c, ref_r, beta=0.1)
    assert worse.item() > math.log(2) > loss.item()


def test_each_unfaithful_expansion_is_paired_with_a_faithful_coherent_one():
    triples, shares = preference_pairs(
        [QUERY, "a red circle"],
        [
            [KEPT, TURNED, TWO_IN_ONE_CELL, TURNED],
            ["A small blue circle in the center, on a white background."],
        ],
    )
    # the relation turned round twice; the two objects in one cell are faithful but
    # incoherent, so neither chosen nor rejected; "a red circle" has nothing faithful
    assert triples == [(QUERY, KEPT, TURNED), (QUERY, KEPT, TURNED)]
    assert shares == {"unfaithful": pytest.approx(3 / 5), "incoherent": pytest.approx(1 / 5)}


def test_optimised_queries_never_hold_a_short_prompt_of_the_eval_suite():
    short = [p.short for p in load_suite()]
    train = [Pair("<abst>", q, CAPTION) for q in (short[0], "two red circles", "a blue square")]
    train.append(Pair("<mstp>", "a red circle in the top left", CAPTION))
    cfg = DPOConfig(rounds=1, queries=10, suite_per_category=20)
    queries, left_out = dpo_queries(train, short, cfg)
    assert not set(queries) & set(short)
    assert {"two red circles", "a blue square"} <= set(queries)
    assert "a red circle in the top left" not in queries  # <mstp> is not a short query
    assert left_out > 0  # the suite drawn from the step's seed overlaps the eval suite
    assert dpo_queries(train, short, DPOConfig(rounds=0)) == ([], 0)


def test_a_round_makes_the_faithful_expansion_likelier_than_the_unfaithful_one():
    lm = LMConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=300)
    model, tok = new_expander(lm, [KEPT, TURNED, QUERY] * 5, seed=0)

    def batch(pairs):
        return unprefixed_batch(pairs, tok, lm.max_length)

    def margin() -> float:
        with torch.no_grad():
            logp, _ = sequence_logp(model, *batch([(QUERY, KEPT), (QUERY, TURNED)]))
        return (logp[0] - logp[1]).item()

    before = margin()
    cfg = DPOConfig(rounds=1, steps=20, batch_size=2, lr=3e-3, beta=0.5)
    stats = dpo_round(model, [(QUERY, KEPT, TURNED)], cfg, batch, progress=False)
    assert margin() > before + 1.0
    assert stats["dpo_ranked"] == 1.0 and stats["dpo_loss"] < math.log(2)


def test_training_runs_the_rounds_it_is_given_and_records_them(tmp_path):
    captions = [CAPTION, "A large red circle in the top left, on a white background."] * 20
    dpo = {"rounds": 2, "queries": 3, "suite_per_category": 1, "samples": 2, "steps": 2}
    cfg = tiny_expander_config(dpo={**dpo, "batch_size": 2})
    metrics = train_expander(
        cfg, _recaptioned(tmp_path / "rec", captions), tmp_path / "x", progress=False
    )
    rounds = metrics["dpo"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert metrics["dpo"]["queries"] > 0
    assert all(0 <= r["sampled_unfaithful"] <= 1 for r in rounds)
    assert metrics["seconds"]["dpo"] >= 0
    off = train_expander(
        tiny_expander_config(),
        _recaptioned(tmp_path / "r2", captions),
        tmp_path / "y",
        progress=False,
    )
    assert off["dpo"] == {"queries": 0, "left_out_as_in_eval_suite": 0, "rounds": []}


def test_dpo_settings_outside_their_range_are_refused():
    with pytest.raises(ValueError, match="samples >= 2"):
        DPOConfig(rounds=1, samples=1)
