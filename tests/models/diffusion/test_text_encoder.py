"""The tiny text encoder's contrastive pretraining and its shape-swapped hard negatives."""

from __future__ import annotations

import random

import numpy as np
import torch

from corpus.scene_text import plural
from corpus.world import SHAPES, Scene, SceneObject, render
from models.diffusion.text_encoder import (
    TextEncoderConfig,
    TextPretrainConfig,
    load_text_encoder,
    pretrain_text_encoder,
    swap_one_shape,
)


def test_a_hard_negative_names_another_shape_in_one_place_and_keeps_the_rest():
    rng = random.Random(0)
    text = "A large red star in the top left and two small blue crosses in the center."
    for _ in range(50):
        swapped = swap_one_shape(text, rng)
        changed = [(a, b) for a, b in zip(text.split(), swapped.split(), strict=True) if a != b]
        assert len(changed) == 1
        old, new = changed[0]
        if old == "star":
            assert new in SHAPES and new != "star"
        else:  # plural stays plural
            assert old == "crosses" and new in {plural(s) for s in SHAPES if s != "cross"}
    assert swap_one_shape("a red thing crossing the road", rng) is None
    assert swap_one_shape("", rng) is None


def test_pretraining_with_hard_negatives_reports_how_often_the_true_shape_wins(tmp_path):
    rng = random.Random(1)
    scenes = [
        Scene((SceneObject(rng.choice(SHAPES), "red", "large", 1, 1),), "white") for _ in range(64)
    ]
    texts = [f"a large red {s.objects[0].shape} in the center" for s in scenes]
    images = torch.stack(
        [torch.from_numpy(np.asarray(render(s, 32))).permute(2, 0, 1) for s in scenes]
    )
    cfg = TextEncoderConfig(
        context_length=16,
        vocab_size=300,
        pretrain=TextPretrainConfig(
            max_steps=4, batch_size=16, warmup_steps=1, hard_negatives=True
        ),
    )
    metrics = pretrain_text_encoder(cfg, images, texts, tmp_path / "enc")
    assert 0.0 <= metrics["text_encoder/hard_negative_acc"] <= 1.0
    encoder = load_text_encoder(tmp_path / "enc", 16)
    states, pooled = encoder(texts[:2])
    assert states.shape[:2] == (2, 16)
    assert pooled.shape == (2, encoder.pooled_size)
    plain_cfg = TextEncoderConfig(
        context_length=16,
        vocab_size=300,
        pretrain=TextPretrainConfig(max_steps=2, batch_size=16, warmup_steps=1),
    )
    plain = pretrain_text_encoder(plain_cfg, images, texts, tmp_path / "plain")
    assert "text_encoder/hard_negative_acc" not in plain
