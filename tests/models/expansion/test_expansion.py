"""Prompt expansion: queries derived from hand-made captions, faithfulness scoring of
known-bad expansions, the prefix-dropout schedule, training on a small recaptioned set,
and the full-profile path on a tiny random GPT-2 saved locally (no hub here)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from corpus.caption_metrics import extract_claims
from models.common.tokenizer import train_bpe_tokenizer
from models.expansion.faithfulness import check, coherent, diversity, faithful, keep_faithful
from models.expansion.model import (
    SEP,
    WORD,
    MissingExpanderError,
    add_special_tokens,
    expand,
    load_expander,
    new_expander,
    word_slot,
)
from models.expansion.queries import (
    Pair,
    derive_query,
    inversion_pairs,
    relation_query,
    unusable,
)
from models.expansion.train import ExpanderConfig, prefix_dropout, tokenize_pairs, train_expander

CAPTION = (
    "The image shows two small red circles in the top left and the center and a large "
    "blue square in the bottom right against a white background. "
    'The word "CAT" is written in the top right.'
)
ON_WHITE = ", on a white background."
OK_EXPANSION = "A small red circle in the bottom right" + ON_WHITE


def test_each_level_drops_what_it_names_and_keeps_the_rest():
    claims = extract_claims(CAPTION)
    mstp = derive_query(claims, "<mstp>", random.Random(0))
    assert mstp == (
        "two small red circles in the top left and the center and "
        "a large blue square in the bottom right"
    )
    dtl = {derive_query(claims, "<dtl>", random.Random(s)) for s in range(40)}
    objects = {"two small red circles and a large blue square", "two red circles and a blue square"}
    assert dtl == objects | {f'{q} and the word "CAT"' for q in objects}
    abst = {derive_query(claims, "<abst>", random.Random(s)) for s in range(40)}
    assert abst == {"two red circles", "two circles", 'the word "CAT"'}
    for query in {mstp} | dtl | abst:
        assert faithful(query, CAPTION), query
        assert "background" not in query and "top right" not in query


def test_a_relation_query_is_in_the_suites_short_form_either_way_round():
    caption = "A red star in the top left and a blue square in the center" + ON_WHITE
    caption += " The red star is to the left of and above the blue square."
    claims = extract_claims(caption)
    queries = {relation_query(claims, False, random.Random(s)) for s in range(20)}
    assert queries == {"a star left of a square", "a square right of a star"}
    assert all(faithful(q, caption) for q in queries)
    assert not faithful("a star right of a square", caption)
    # placed so, though no sentence says it
    assert faithful(
        "a square below a star", "A star in the top left and a square in the center" + ON_WHITE
    )


def test_relation_share_sets_how_many_queries_ask_for_the_relation():
    caption = "A red star in the top left and a blue square in the center" + ON_WHITE
    claims = extract_claims(caption + " The red star is to the left of and above the blue square.")
    relation = {"a star left of a square", "a square right of a star"}
    for share, expected in ((1.0, True), (0.0, False)):
        queries = [derive_query(claims, "<abst>", random.Random(s), share) for s in range(20)]
        assert all((q in relation) == expected for q in queries), (share, queries)


def test_an_uncoloured_query_counts_every_object_of_its_shape():
    caption = "A large red circle in the top left and a small blue circle in the center" + ON_WHITE
    abst = {derive_query(extract_claims(caption), "<abst>", random.Random(s)) for s in range(20)}
    assert abst == {"a red circle", "two circles"}


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("A large red circle in the top left" + ON_WHITE[:-1], "truncated"),
        (
            "A red circle in the top left and a blue star in the top left" + ON_WHITE,
            "cell_stated_twice",
        ),
        ("Three red circles in the top left and the center" + ON_WHITE, "count_not_placed"),
        ("A red circle in the top left.", "not_one_background"),
        ("perfect for any room.", "no_placed_object"),
        (
            "A red star in the top left" + ON_WHITE + " The red star is above the blue square.",
            "relation_names_unplaced_object",
        ),
        ("A red circle in the top left" + ON_WHITE + ' It says "CAT.', "broken_word"),
    ],
)
def test_a_caption_that_does_not_hang_together_is_skipped_by_reason(caption, reason):
    assert unusable(caption, extract_claims(caption)) == reason
    pairs, skipped = inversion_pairs([caption, CAPTION], seed=0)
    assert skipped == {reason: 1}
    assert {p.prefix for p in pairs} == {"<abst>", "<dtl>", "<mstp>"}
    assert {p.prompt for p in pairs} == {CAPTION}


@pytest.mark.parametrize(
    ("query", "expansion", "dropped", "contradicted"),
    [
        ("a red circle", "A blue circle in the center" + ON_WHITE, ["colour red circle"], []),
        ("a star", "A blue circle in the center" + ON_WHITE, ["object star"], []),
        (
            "two red circles",
            "A red circle in the top left" + ON_WHITE,
            [],
            ["count ('red', 'circle'): 2 -> 1"],
        ),
        (
            "two circles",
            "Three red circles in the center, the top left and the top right" + ON_WHITE,
            [],
            ["count circle: 2 -> 3"],
        ),
        (
            "a red circle on a black background",
            "A red circle in the center" + ON_WHITE,
            [],
            ["background black"],
        ),
        (
            "a red circle in the top left",
            "A red circle in the center" + ON_WHITE,
            ["position red circle top left"],
            [],
        ),
        ('a red circle, it says "CAT"', "A red circle in the center" + ON_WHITE, ["word CAT"], []),
    ],
)
def test_known_bad_expansions_are_caught(query, expansion, dropped, contradicted):
    assert check(query, expansion) == {"dropped": dropped, "contradicted": contradicted}
    assert not faithful(query, expansion)


def test_filling_in_what_the_query_leaves_free_is_faithful_and_counts_as_diversity():
    query = "a red circle"
    expansions = [
        "A small red circle in the center, on a white background.",
        "A large red circle in the top left and a blue star in the center, on a black background.",
    ]
    assert all(faithful(query, e) for e in expansions)
    # another circle of another colour is not the red one's count
    assert faithful(
        query,
        "A red circle in the center and a blue circle in the top left, on a white background.",
    )
    div = diversity(expansions)
    assert div["background"] == pytest.approx(1.0) and div["sizes"] == pytest.approx(1.0)
    assert div["word"] == 0 and div["distinct_texts"] == 1.0
    assert diversity([expansions[0]] * 3)["distinct_texts"] == pytest.approx(1 / 3)


def test_only_faithful_expansions_that_hang_together_are_kept():
    two_in_one_cell = "A red circle in the center and a blue star in the center" + ON_WHITE
    sampled = [["A blue circle in the top left" + ON_WHITE, two_in_one_cell, *[OK_EXPANSION] * 3]]
    kept = keep_faithful(["a circle"], sampled, n=2)
    assert kept == [[sampled[0][0], OK_EXPANSION]]
    assert faithful("a circle", two_in_one_cell) and not coherent(two_in_one_cell)


def test_prefix_dropout_rises_from_the_first_step_to_the_last():
    cfg = ExpanderConfig(max_steps=11, prefix_dropout=(0.4, 1.0))
    assert [round(prefix_dropout(cfg, s), 2) for s in (0, 5, 10)] == [0.4, 0.7, 1.0]
    with pytest.raises(ValueError, match="prefix_dropout"):
        ExpanderConfig(prefix_dropout=(0.9, 0.4))
    with pytest.raises(ValueError, match=r"prompt_expander\.max_stepz: unknown key"):
        ExpanderConfig.from_dict({"max_stepz": 3})


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_lm_dropout_key_reaches_the_tiny_gpt2(dropout):
    """prompt_expander.lm.dropout sets GPT-2's three dropouts (default 0.1, GPT-2's): at 0
    a training-mode pass repeats; above 0 it drops."""
    assert ExpanderConfig().lm.dropout == 0.1
    cfg = ExpanderConfig.from_dict({"lm": {"n_layer": 1, "n_embd": 16, "n_head": 2,
                                           "vocab_size": 300, "dropout": dropout}})  # fmt: skip
    model, tok = new_expander(cfg.lm, [CAPTION] * 4, 0)
    config = model.config
    assert config.embd_pdrop == config.resid_pdrop == config.attn_pdrop == dropout
    ids = torch.tensor([tok(CAPTION)["input_ids"]])
    model.train()
    assert torch.equal(model(ids).logits, model(ids).logits) == (dropout == 0.0)


def _recaptioned(folder: Path, captions: list[str]) -> Path:
    folder.mkdir(parents=True)
    n = len(captions)
    pd.DataFrame(
        {"descriptive_caption": captions, "split": ["train"] * (n - 2) + ["eval"] * 2}
    ).to_parquet(folder / "00000.parquet")
    return folder


def tiny_expander_config(**overrides) -> ExpanderConfig:
    """A 1-layer, 32-wide expander trained for a few steps and measured on a few queries."""
    sizes = {"lm": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 300}}
    steps = {"max_steps": 4, "batch_size": 8, "warmup_steps": 1}
    measured = {"expansions": 2, "candidates": 3, "eval_queries": 2}
    return ExpanderConfig.from_dict({**sizes, **steps, **measured, **overrides})


def test_training_writes_a_loadable_expander_and_measures_it(tmp_path):
    captions = [CAPTION, "A large red circle in the top left, on a white background."] * 20
    captions.append("A large red circle in the top left, on a white background")  # truncated
    cfg = tiny_expander_config()
    out = tmp_path / "expander"
    metrics = train_expander(cfg, _recaptioned(tmp_path / "rec", captions), out, progress=False)
    assert metrics["skipped_captions"] == {"truncated": 1}
    assert metrics["suite_short"]["queries"] == 112
    assert 0 <= metrics["suite_short"]["short_of_faithful"] <= 1
    for name in ("held_out_abst", "held_out_dtl", "held_out_mstp", "held_out_no_prefix"):
        assert 0 <= metrics[name]["unfaithful"] <= 1
    assert json.loads((out / "metrics.json").read_text())["pairs"] == metrics["pairs"]
    assert (out / "model.safetensors").is_file()
    model, tok = load_expander(out)
    texts = expand(model, tok, ["a red circle", "two stars"], n=3, prefix="<dtl>", max_new_tokens=8)
    assert [len(t) for t in texts] == [3, 3]
    assert texts == expand(
        model, tok, ["a red circle", "two stars"], n=3, prefix="<dtl>", max_new_tokens=8
    )
    with pytest.raises(ValueError, match="unknown prefix"):
        expand(model, tok, ["a star"], n=1, prefix="<hast>")


def test_without_a_usable_caption_nothing_is_learnt_and_the_metrics_say_so(tmp_path):
    garbage = ["the the the", "a a red red", "perfect for any room."]
    cfg = ExpanderConfig.from_dict(
        {
            "lm": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 280},
            "max_steps": 3,
            "expansions": 1,
            "candidates": 1,
        }
    )
    out = tmp_path / "expander"
    metrics = train_expander(cfg, _recaptioned(tmp_path / "rec", garbage), out, progress=False)
    assert metrics["pairs"] == 0 and metrics["trained_steps"] == 0
    assert metrics["final_loss"] is None
    assert metrics["skipped_captions"] == {"no_placed_object": 3}
    assert metrics["held_out_abst"]["queries"] == 0
    assert math.isnan(metrics["held_out_abst"]["unfaithful"])
    assert load_expander(out)[0] is not None
    # the asset's tables show an empty query set as "-"
    from assets.prompt_expander import diversity_table, faithfulness_table

    assert "| held_out_abst | 0 | - | - | - | - | - |" in faithfulness_table(metrics).value
    assert "| held_out_abst | - |" in diversity_table(metrics).value


def test_a_pretrained_causal_lm_gets_the_prefixes_and_is_sampled(tmp_path):
    """The full profile's path: any causal LM folder, here a tiny random GPT-2."""
    tok = train_bpe_tokenizer([CAPTION] * 10, vocab_size=280)
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, loaded = load_expander(folder)
    assert SEP in loaded.get_vocab() and "<mstp>" in loaded.get_vocab()
    assert model.get_input_embeddings().num_embeddings == len(loaded)
    assert len(expand(model, loaded, ["a red circle"], n=2, max_new_tokens=5)[0]) == 2


def test_the_quoted_word_is_copied_through_its_slot_not_generated():
    tok = train_bpe_tokenizer([CAPTION] * 10, vocab_size=280)
    add_special_tokens(tok)
    slot = word_slot(tok)
    prompt = 'A red star in the center, on a white background. The word "ZOO" is written.'
    worded, plain = tokenize_pairs(
        [Pair("<abst>", 'the word "ZOO"', prompt), Pair("<abst>", "a red star", prompt)], tok
    )
    # the word the query quotes is learnt as the slot, on both sides
    assert all(slot in ids for ids in worded)
    assert "ZOO" not in tok.decode(worded[2]) and '"<word>"' in tok.decode(worded[2])
    # a word the query leaves free is written as it stands
    assert slot not in plain[2] and '"ZOO"' in tok.decode(plain[2])

    class SlotWriter(GPT2LMHeadModel):
        """A model that has learnt to write nothing but the slot."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., slot] += 1e4
            return out

    torch.manual_seed(0)
    model = SlotWriter(
        GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    )
    texts = expand(model, tok, ['the word "MAP"', "a red star"], n=1, max_new_tokens=2)
    assert texts == [["MAPMAP"], [""]]
    assert WORD not in texts[0][0]


def test_a_missing_expander_says_what_to_provide(tmp_path):
    with pytest.raises(MissingExpanderError, match=r"prompt_expander\.pretrained"):
        load_expander(tmp_path / "nothing-here")
