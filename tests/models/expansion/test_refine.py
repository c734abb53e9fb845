"""Re-fine-tuning the expander on what the generator draws well: the queries are unseen,
only pairs whose images pass every condition are kept, and the fine-tune and comparison
run end to end with a generator and judge whose verdicts are known."""

import json

import pytest
import torch
from safetensors.torch import load_file

from corpus.prompt_suite import build_suite, load_suite, write_suite
from corpus.world import Scene
from models.expansion import refine as R
from models.expansion.model import LMConfig, new_expander


def test_training_queries_leave_out_every_query_the_eval_suite_holds():
    eval_suite = build_suite(4, seed=11)
    cfg = R.RefineConfig(queries_per_category=4, seed=11)  # the very same prompts
    queries, left_out = R.training_queries(cfg, eval_suite)
    assert queries == [] and left_out == len(eval_suite)
    queries, left_out = R.training_queries(R.RefineConfig(queries_per_category=4), eval_suite)
    assert queries and not {p.short for p in queries} & {p.short for p in eval_suite}
    assert len(queries) + left_out == 4 * len({p.category for p in eval_suite})


def test_a_pair_is_kept_only_when_enough_of_its_images_pass():
    prompts = build_suite(1, seed=3)[:2]
    expansions = [["e0", "e1"], ["e2"]]
    passed = [[True, True], [True, False], [False, False]]
    kept = R.passing_pairs(prompts, expansions, passed, min_pass=1.0)
    assert [(p.prefix, p.query, p.prompt) for p in kept] == [("<rft>", prompts[0].short, "e0")]
    half = R.passing_pairs(prompts, expansions, passed, min_pass=0.5)
    assert [p.prompt for p in half] == ["e0", "e1"]
    with pytest.raises(ValueError, match="verdict lists"):
        R.passing_pairs(prompts, expansions, passed[:2], min_pass=1.0)


class _World:
    """A generator and judge with known verdicts: an image carries the index of its text,
    and reads as the reference scene of the prompt whose descriptive form was drawn when
    that prompt is in `good`, as an empty scene otherwise."""

    def __init__(self, prompts, good: set[str]):
        self.texts: list[str] = []
        self.scene_of = {p.descriptive: p.scene for p in prompts if p.category in good}

    def draw(self, texts: list[str], seed: int) -> torch.Tensor:
        ids = torch.arange(len(self.texts), len(self.texts) + len(texts))
        self.texts += texts
        images = torch.zeros(len(texts), 3, 4, 4, dtype=torch.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
        return images

    def read(self, images: torch.Tensor) -> list[Scene]:
        ids = images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()
        empty = Scene((), "white")
        return [self.scene_of.get(self.texts[i], empty) for i in ids.tolist()]


def test_refine_fine_tunes_on_the_passing_pairs_and_compares_with_the_base(tmp_path, monkeypatch):
    suite = tmp_path / "suite.json"  # a small eval suite: one prompt per category
    write_suite(build_suite(1, seed=5), suite, 1, 5)
    cfg = R.RefineConfig(
        queries_per_category=2, candidates=2, images=1, max_steps=3, batch_size=4,
        eval_images=1, upsample_candidates=1, n_boot=50, suite=str(suite),
    )  # fmt: skip
    queries, _ = R.training_queries(cfg, load_suite(suite))
    by_short = {p.short: p for p in queries}
    # The expander writes each query's descriptive form, faithful by construction.
    monkeypatch.setattr(
        R, "expand", lambda model, tok, qs, n, **kw: [[by_short[q].descriptive] * n for q in qs]
    )
    model, tok = new_expander(
        LMConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=300),
        [p.descriptive for p in queries],
        0,
    )
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    world = _World(queries, good={"colour"})

    metrics = R.refine(cfg, tmp_path / "base", world.draw, world.read, tmp_path / "rft")

    colour = {p.short for p in queries if p.category == "colour"}
    kept = [
        json.loads(line) for line in (tmp_path / "rft" / "pairs.jsonl").read_text().splitlines()
    ]
    assert {k["query"] for k in kept} == colour
    assert metrics["kept"] == 2 * len(colour) and metrics["faithful"] == 2 * len(queries)
    assert metrics["by_category"]["colour"]["kept"] == metrics["kept"]
    assert metrics["trained_steps"] == 3
    before = load_file(tmp_path / "base" / "model.safetensors")
    after = load_file(tmp_path / "rft" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    forms = metrics["comparison"]["forms"]
    assert set(forms) == {"short", "base", "rft"}
    assert [(d["a"], d["b"]) for d in metrics["comparison"]["differences"]] == [
        ("base", "short"), ("rft", "short"), ("rft", "base"),
    ]  # fmt: skip
    assert "| upsampled by rft |" in R.table(metrics)


def test_refine_settings_are_checked():
    with pytest.raises(ValueError, match="min_pass"):
        R.RefineConfig(min_pass=0)
    with pytest.raises(ValueError, match=r"refine\.max_stepz: unknown key"):
        R.RefineConfig.from_dict({"max_stepz": 3})
