"""The text encoder's linear probes and the masked-token text encoder: the probes read
what a caption states, and the T5 pretrained on the world's text loads back through the
same code as a hub T5."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import T5EncoderModel

from corpus.scene_text import descriptive_caption
from corpus.world import Scene, SceneObject
from models.diffusion.masked_text import pretrain_masked_text_encoder, world_texts
from models.diffusion.text_encoder import TextEncoderConfig, load_text_encoder
from models.diffusion.text_probes import (
    _PHRASE,
    POOLED_KINDS,
    TOKEN_KINDS,
    linear_probe,
    probe_data,
    probe_text_encoder,
)


def test_object_phrases_are_found_with_their_attributes_and_cells():
    scene = Scene(
        (
            SceneObject("hexagon", "orange", "large", 0, 1),
            SceneObject("square", "cyan", "small", 1, 0),
        ),
        "gray",
    )
    caption = descriptive_caption(scene, random.Random(0))
    found = {m.groups() for m in _PHRASE.finditer(caption)}
    assert found == {
        ("large", "orange", "hexagon", "top center"),
        ("small", "cyan", "square", "center left"),
    }


def test_probe_targets_line_up_with_their_captions():
    data = probe_data(50)
    assert len(data.captions) == 50
    assert all(len(v) == 50 for v in data.pooled_targets.values())
    assert set(data.pooled_targets) == set(POOLED_KINDS)
    assert all(len(v) == len(data.token_rows) for v in data.token_targets.values())
    assert len(data.token_rows) >= 50  # most scenes name at least one object alone


def test_linear_probe_reads_a_separable_attribute_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g).numpy()
    x = torch.randn(400, 16, generator=g)
    x[:, 0] += torch.from_numpy(y).float() * 10  # the label, written in one feature
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) >= 0.98
    assert linear_probe(x[:300], y[:300], x[300:300], y[300:300]) is None  # nothing held out
    noise = torch.randn(400, 16, generator=g)
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:]) < 0.5


def test_masked_text_encoder_loads_as_a_t5_and_is_probed(tmp_path):
    texts = world_texts(50)
    assert len(texts) == 50 and any(t.startswith(("A ", "On ", "The ")) for t in texts)
    cfg = TextEncoderConfig.from_dict(
        {
            "objective": "masked",
            "config": "recapflow-tiny-t5-encoder",
            "vocab_size": 300,
            "context_length": 48,
            "pretrain": {"max_steps": 3, "batch_size": 16, "texts": 200},
        }
    )
    metrics = pretrain_masked_text_encoder(cfg, tmp_path / "enc")
    assert metrics["texts"] == 200 and "text_encoder_loss" in metrics
    encoder = load_text_encoder(tmp_path / "enc", 48)
    assert isinstance(encoder.model, T5EncoderModel)
    states, pooled = encoder(["a red circle", ""])
    assert states.shape == (2, 48, 64) and pooled.shape == (2, 64)
    result = probe_text_encoder(encoder, n=120)
    assert set(result["pooled"]) == set(POOLED_KINDS)
    assert set(result["tokens"]) == {"noun", "phrase_end"}
    assert all(set(t) == set(TOKEN_KINDS) for t in result["tokens"].values())
    accuracies = [*result["pooled"].values()]
    accuracies += [v for t in result["tokens"].values() for v in t.values()]
    assert all(0.0 <= v <= 1.0 for v in accuracies)
    assert np.isfinite(result["objects"])


def test_an_unknown_objective_is_refused_by_its_dotted_name():
    with pytest.raises(ValueError, match=r"text_encoder\.objective.*'maskd'"):
        TextEncoderConfig.from_dict({"objective": "maskd"})
