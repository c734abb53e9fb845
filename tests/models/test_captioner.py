from __future__ import annotations

import json
import time

import pytest
import torch

from models.captioner import GenerationConfig, PrefixCaptioner
from models.captioner_train import train_captioner
from models.data import load_images
from tests.models.conftest import tiny_captioner_config


def test_every_phase_leaves_a_safetensors_checkpoint_and_quality(tiny_captioner):
    for phase in ("clip", "pretrain", "ssc", "dsc"):
        assert (tiny_captioner / phase / "model.safetensors").exists(), phase
        assert not list((tiny_captioner / phase).glob("*.ckpt")) and not list(
            (tiny_captioner / phase).glob("*.pt")
        )
    metrics = json.loads((tiny_captioner / "metrics.json").read_text())
    assert set(metrics["quality"]) == {"alt_text", "short_caption", "descriptive_caption"}
    for name, kinds in metrics["quality"].items():
        assert 0.0 <= kinds["overall"]["hallucination_rate"] <= 1.0, name
    assert len(metrics["samples"]["descriptive_caption"]) == 16


def test_checkpoint_round_trip_gives_the_same_captions(tiny_captioner, tiny_raw):
    import pandas as pd

    index = pd.read_parquet(tiny_raw / "index.parquet").head(8)
    images = load_images(tiny_raw, list(index["key"]), list(index["shard"]), 64)
    a = PrefixCaptioner.load(tiny_captioner / "dsc")
    b = PrefixCaptioner.load(tiny_captioner / "dsc")
    gen = GenerationConfig(mode="greedy", max_new_tokens=10)
    assert a.generate(images, gen) == b.generate(images, gen)
    for mode in ("beam", "nucleus"):
        caps = a.generate(images, GenerationConfig(mode=mode, max_new_tokens=10, num_beams=2))
        assert len(caps) == 8 and all(isinstance(c, str) for c in caps)
    # Batched and one-at-a-time greedy decoding agree.
    one_by_one = [a.generate(images[i : i + 1], gen)[0] for i in range(4)]
    assert one_by_one == a.generate(images[:4], gen)


def test_finished_phases_are_skipped_on_rerun(tiny_captioner, tiny_raw):
    stamps = {
        p: (tiny_captioner / p / "model.safetensors").stat().st_mtime_ns
        for p in ("clip", "pretrain", "ssc", "dsc")
    }
    t0 = time.time()
    train_captioner(tiny_captioner_config(), tiny_raw, tiny_captioner)
    for p, st in stamps.items():
        assert (tiny_captioner / p / "model.safetensors").stat().st_mtime_ns == st, p
    assert time.time() - t0 < 60


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="generation mode"):
        GenerationConfig(mode="sampling")
    with pytest.raises(ValueError, match="unknown keys"):
        tiny_captioner_config(learning_rate=1.0)


def test_weights_files_are_not_pickles(tiny_captioner):
    from safetensors.torch import load_file

    state = load_file(tiny_captioner / "dsc" / "model.safetensors")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
