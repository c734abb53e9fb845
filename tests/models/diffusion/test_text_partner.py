"""The captioner's concept tower as the locked partner of the text tower's pretraining,
alone or summed with a CNN trained beside it, and the scale of the saved pooled vector."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from corpus.config import ConfigError
from corpus.world import SHAPES, Scene, SceneObject, render
from models.captioning.concepts import CELL_CLASSES, CELL_HEADS_FILE
from models.common.clip import create_clip, save_clip, visual_features
from models.diffusion.text_encoder import (
    ImageTower,
    TextEncoderConfig,
    TextPretrainConfig,
    load_text_encoder,
    pretrain_text_encoder,
)
from models.diffusion.text_partner import (
    LockedConceptTower,
    MissingConceptTowerError,
    SummedTowers,
    captioner_partner,
)
from models.diffusion.text_tower import text_encoder_tag
from models.diffusion.train import DiffusionTrainConfig

CLIP = "recapflow-tiny-cell-clip"


def _concepts(folder):
    """A random concept tower and cell heads saved as the captioner's `concepts` phase
    saves them."""
    torch.manual_seed(0)
    model = create_clip(CLIP)
    save_clip(model, CLIP, folder)
    model.visual.output_tokens = True
    _, grid = visual_features(model.visual, torch.zeros(1, 3, 48, 48))
    heads = {}
    for name, classes in CELL_CLASSES.items():
        heads[f"{name}.weight"] = torch.randn(len(classes), grid.shape[1])
        heads[f"{name}.bias"] = torch.zeros(len(classes))
    save_file(heads, str(folder / CELL_HEADS_FILE))
    return folder


def _pairs(n=48):
    rng = random.Random(0)
    scenes = [
        Scene((SceneObject(rng.choice(SHAPES), "red", "large", 1, 1),), "white") for _ in range(n)
    ]
    images = torch.stack(
        [torch.from_numpy(np.asarray(render(s, 32))).permute(2, 0, 1) for s in scenes]
    )
    return images, [f"a large red {s.objects[0].shape} in the center" for s in scenes]


def _cfg(**pretrain):
    return TextEncoderConfig(
        context_length=16,
        vocab_size=300,
        pretrain=TextPretrainConfig(max_steps=3, batch_size=16, warmup_steps=1, **pretrain),
    )


def test_the_captioners_concept_tower_stays_locked_while_the_text_tower_learns(tmp_path):
    concepts = _concepts(tmp_path / "captioner" / "concepts")
    built = []

    def partner(dim):
        built.append(LockedConceptTower(concepts, dim))
        return built[0]

    images, texts = _pairs()
    reference = LockedConceptTower(concepts, 8)
    pretrain_text_encoder(
        _cfg(partner="captioner"), images, texts, tmp_path / "enc", image_tower=partner
    )
    tower = built[0]
    assert not tower.visual.training  # batch norms and dropout as the captioner left them
    for (name, after), before in zip(
        tower.visual.state_dict().items(), reference.visual.state_dict().values(), strict=True
    ):
        assert torch.equal(after, before), name
    for name, head in tower.heads.items():
        assert torch.equal(head.weight, reference.heads[name].weight)
    assert tower.proj.weight.requires_grad
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias"}


def test_the_summed_partner_trains_its_cnn_beside_the_locked_concept_tower(tmp_path):
    captioner = tmp_path / "captioner"
    _concepts(captioner / "concepts")
    built, cnn_before = [], {}

    def partner(dim):
        built.append(captioner_partner("captioner+cnn", captioner / "concepts", 8)(dim))
        cnn_before.update({k: v.clone() for k, v in built[0].towers[1].state_dict().items()})
        return built[0]

    images, texts = _pairs()
    reference = captioner_partner("captioner+cnn", captioner / "concepts", 8)(8)
    pretrain_text_encoder(
        _cfg(partner="captioner+cnn", image_width=8),
        images,
        texts,
        tmp_path / "enc",
        image_tower=partner,
    )
    summed = built[0]
    assert isinstance(summed, SummedTowers)
    concept, cnn = summed.towers
    assert isinstance(concept, LockedConceptTower) and isinstance(cnn, ImageTower)
    for (name, after), before in zip(
        concept.visual.state_dict().items(),
        reference.towers[0].visual.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(after, before), name
    assert not concept.visual.training
    assert not torch.equal(cnn.net[0].weight, cnn_before["net.0.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(summed(x), concept(x) + cnn(x))


def test_the_saved_pooled_vector_is_scaled_and_the_token_states_are_not(tmp_path):
    images, texts = _pairs()
    pretrain_text_encoder(_cfg(), images, texts, tmp_path / "one")
    pretrain_text_encoder(_cfg(pooled_scale=10.0), images, texts, tmp_path / "ten")
    states1, pooled1 = load_text_encoder(tmp_path / "one", 16)(texts[:4])
    states10, pooled10 = load_text_encoder(tmp_path / "ten", 16)(texts[:4])
    torch.testing.assert_close(states10, states1)
    torch.testing.assert_close(pooled10, 10 * pooled1)


def test_a_missing_concept_tower_is_named_with_how_to_provide_it(tmp_path):
    with pytest.raises(MissingConceptTowerError, match="materialize the `captioner`"):
        LockedConceptTower(tmp_path / "nowhere", 8)


def test_the_captioner_partner_needs_the_captioner_and_its_weights_key_the_encoder(tmp_path):
    with pytest.raises(ConfigError, match="partner: captioner needs"):
        DiffusionTrainConfig.from_dict(
            {"captioner": None, "text_encoder": {"pretrain": {"partner": "captioner"}}}
        )
    with pytest.raises(ConfigError, match=r"partner: captioner\+cnn needs"):
        DiffusionTrainConfig.from_dict(
            {"captioner": None, "text_encoder": {"pretrain": {"partner": "captioner+cnn"}}}
        )
    with pytest.raises(ValueError, match="partner: 'judge' is not one of"):
        DiffusionTrainConfig.from_dict({"text_encoder": {"pretrain": {"partner": "judge"}}})
    captioner = tmp_path / "captioner"
    _concepts(captioner / "concepts")
    cfg = DiffusionTrainConfig.from_dict(
        {"captioner": str(captioner), "text_encoder": {"pretrain": {"partner": "captioner"}}}
    )
    texts = ["a red circle in the top left"]
    before = text_encoder_tag(cfg.text_encoder, texts, 0, cfg.captioner)
    assert before == text_encoder_tag(cfg.text_encoder, texts, 0, cfg.captioner)
    save_file(
        {f"{n}.weight": torch.zeros(len(c), 128) for n, c in CELL_CLASSES.items()}
        | {f"{n}.bias": torch.zeros(len(c)) for n, c in CELL_CLASSES.items()},
        str(captioner / "concepts" / CELL_HEADS_FILE),
    )  # a retrained captioner: another partner, another text encoder
    assert text_encoder_tag(cfg.text_encoder, texts, 0, cfg.captioner) != before
