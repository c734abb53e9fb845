"""A tiny trained captioner shared by the model tests (a few steps per phase: the tests
check mechanics, the quality targets are measured by `make run` and docs/captioning.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corpus.raw_dataset import build_raw_dataset
from models.captioning.train import CaptionerTrainConfig
from tests.conftest import small_raw_params

TINY_PHASE = {"max_steps": 3, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1}


def tiny_captioner_config(**overrides) -> CaptionerTrainConfig:
    d = {
        "lm": {"config": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 160}},
        "vocab_size": 300,
        "clip": TINY_PHASE,
        "concepts": TINY_PHASE,
        # The tower frozen after `concepts`, as in params.yaml: the captioner keeps its heads.
        "pretrain": {**TINY_PHASE, "visual_lr_scale": 0.0},
        "ssc": {**TINY_PHASE, "visual_lr_scale": 0.0},
        "dsc": {**TINY_PHASE, "visual_lr_scale": 0.0},
        "generation": {"mode": "greedy", "max_new_tokens": 12},
        "ssc_max_new_tokens": 6,
        "eval_images": 16,
    }
    d.update(overrides)
    return CaptionerTrainConfig.from_dict(d)


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory) -> Path:
    """A judge trained for 300 steps (about 100 s on 2 cores): enough to read clean
    renders; the default config (params.yaml) trains longer and is held to 0.98."""
    from models.evaluation.world_judge import JudgeConfig, train_judge

    out = tmp_path_factory.mktemp("judge")
    cfg = JudgeConfig(train_images=8000, eval_images=400, max_steps=300, batch_size=128)
    metrics = train_judge(cfg, out, progress=False)
    assert set(metrics["accuracy"]) == {
        "shape", "colour", "size", "position", "count", "word", "background"
    }  # fmt: skip
    assert set(metrics["robustness"]) == {"blur_0.5px", "blur_1px", "shift_2px"}
    return out


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "raw"
    params = small_raw_params(num_images=240, shard_size=40, human_fraction=0.5, eval_fraction=0.1)
    build_raw_dataset(params, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_captioner(tiny_raw, tmp_path_factory) -> Path:
    from models.captioning.train import train_captioner

    out = tmp_path_factory.mktemp("captioner") / "captioner"
    train_captioner(tiny_captioner_config(), tiny_raw, out)
    return out
