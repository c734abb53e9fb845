"""The UNet given the caption as a map: built from params, kept through EMA, saving and
loading, and reading the caption per place."""

from __future__ import annotations

import pytest
import torch

from corpus.config import build_config
from models.diffusion.model import DiffusionConfig, LatentDiffusion, UNetConfig, build_unet
from models.diffusion.text_map import TextMapUNet2DConditionModel, load_unet

SMALL = {"block_out_channels": [16, 32, 32], "norm_num_groups": 8}


def _unet(channels: int, queries: str = "mlp"):
    torch.manual_seed(0)
    cfg = UNetConfig(text_map_channels=channels, text_map_queries=queries, overrides=SMALL)
    return build_unet(cfg, text_hidden=16, text_pooled=16, latent_shape=(4, 8, 8))


def test_the_text_map_is_an_option_of_the_unet_and_the_latent_keeps_its_channels():
    assert type(_unet(0)).__name__ == "UNet2DConditionModel"
    unet = _unet(6)
    assert isinstance(unet, TextMapUNet2DConditionModel)
    # What samplers read to draw the noise stays the latent's; the map comes on top.
    assert unet.config.in_channels == 4 and unet.conv_in.in_channels == 4 + 6
    states = torch.randn(2, 5, 16)
    where = unet.text_map(states)
    assert where.shape == (2, 6, 8, 8)
    # Each place asks its own question of the caption, and the caption answers.
    assert not torch.allclose(where[:, :, 0, 0], where[:, :, 7, 7])
    assert not torch.allclose(where[0], unet.text_map(states.flip(0))[0])


def _saved_and_loaded(unet, folder):
    """`unet` saved to `folder` and loaded back; asserts the copy draws the same output."""
    unet.save_pretrained(folder, safe_serialization=True)
    loaded = load_unet(folder).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    states, pooled = torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=states, class_labels=pooled).sample
        got = loaded(x, t, encoder_hidden_states=states, class_labels=pooled).sample
    torch.testing.assert_close(got, expected)
    return loaded


@pytest.mark.parametrize("queries", ["mlp", "sine"])
def test_the_ema_copy_and_a_saved_unet_keep_the_map(tmp_path, queries):
    unet = _unet(6, queries)
    before = unet.text_map.out.weight.detach().clone()
    module = LatentDiffusion(unet, DiffusionConfig())
    with torch.no_grad():
        for p in unet.text_map.parameters():
            p.add_(1.0)  # the live weights move; the EMA has not stepped since
    ema = module.ema_unet()
    assert type(ema) is TextMapUNet2DConditionModel
    assert ema.config.text_map_queries == queries
    torch.testing.assert_close(ema.text_map.out.weight, before)
    assert _saved_and_loaded(ema, tmp_path / "unet").config.text_map_queries == queries


def _two_corners() -> tuple[torch.Tensor, torch.Tensor]:
    """(token states, clean latents) of two captions, each stating an object in its own
    corner of the latent."""
    torch.manual_seed(1)
    latents = torch.zeros(2, 4, 8, 8)
    latents[0, :, :3, :3] = 1.0
    latents[1, :, 5:, 5:] = 1.0
    return torch.randn(2, 5, 16), latents


def _each_in_its_corner(module: LatentDiffusion, states: torch.Tensor) -> bool:
    """The map alone draws each caption's object in its own corner, not the other's."""
    with torch.no_grad():
        drawn = module.map_head(module.unet.text_map(states)).mean(1)
    first = drawn[0, :3, :3].mean() > 0.7 and drawn[0, 5:, 5:].mean().abs() < 0.3
    second = drawn[1, 5:, 5:].mean() > 0.7 and drawn[1, :3, :3].mean().abs() < 0.3
    return bool(first and second)


def test_the_map_loss_teaches_the_map_where_each_caption_puts_its_object():
    states, latents = _two_corners()
    batch = {"latents": latents, "states": states, "pooled": torch.randn(2, 16)}
    cfg = DiffusionConfig(
        prediction_type="sample", map_loss=1.0, foreground_weight=4.0,
        lr=1e-2, warmup_steps=1, max_steps=150,
    )  # fmt: skip
    module = LatentDiffusion(_unet(6), cfg)
    head_before = module.map_head.weight.detach().clone()
    opt = module.configure_optimizers()["optimizer"]
    for _ in range(150):
        module.diffusion_loss(batch).backward()
        opt.step()
        opt.zero_grad()
    assert _each_in_its_corner(module, states)
    assert not torch.allclose(module.map_head.weight, head_before)  # the head learns too
    # Training only: the exported UNet carries no drawing head.
    assert not any("map_head" in k for k in module.ema_unet().state_dict())


def test_the_map_pretrained_alone_places_each_caption_and_leaves_the_unet_as_it_was():
    states, latents = _two_corners()
    # The diffusion lr would not place them in 150 steps: the map's own lr is used.
    cfg = DiffusionConfig(
        map_pretrain_steps=150, map_pretrain_lr=1e-2, foreground_weight=4.0, lr=1e-6,
        warmup_steps=1,
    )  # fmt: skip
    module = LatentDiffusion(_unet(6), cfg)
    body = {k: v.clone() for k, v in module.unet.state_dict().items() if "text_map" not in k}
    assert not _each_in_its_corner(module, states)
    module.pretrain_map(latents, states, batch_size=2)
    assert _each_in_its_corner(module, states)
    after = module.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in body.items())  # only the map trained
    # The EMA starts from the trained map: the exported UNet draws with it.
    torch.testing.assert_close(
        module.ema_unet().text_map.out.weight, module.unet.text_map.out.weight
    )
    # Then the UNet trains and the map stays as it was trained.
    optimized = {
        id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]
    }
    assert {id(p) for p in module.unet.conv_in.parameters()} <= optimized
    assert not optimized & {id(p) for p in module.unet.text_map.parameters()}
    assert not optimized & {id(p) for p in module.map_head.parameters()}


def test_the_map_pretrained_on_the_blend_hedges_for_a_caption_that_names_no_place():
    placed, latents = _two_corners()
    vague = torch.randn(1, 5, 16).expand(2, -1, -1)  # an alt text: the same for both scenes
    states = torch.stack([placed, vague])
    # Each row gets its placed caption in one epoch and the vague one in the other.
    variants = torch.tensor([[0, 1], [1, 0]])
    cfg = DiffusionConfig(
        map_pretrain_steps=200, map_pretrain_lr=1e-2, foreground_weight=1.0, warmup_steps=1
    )
    module = LatentDiffusion(_unet(6), cfg)
    module.pretrain_map(latents, states, batch_size=2, variants=variants)
    assert _each_in_its_corner(module, placed)
    with torch.no_grad():
        drawn = module.map_head(module.unet.text_map(vague[:1])).mean(1)[0]
    # Half the scenes behind the vague caption have the object in each corner.
    for corner in (drawn[:3, :3].mean(), drawn[5:, 5:].mean()):
        assert 0.3 < corner < 0.7
    with pytest.raises(ValueError, match=r"map_pretrain_captions: 'alt' is not one of"):
        build_config(DiffusionConfig, {"map_pretrain_captions": "alt"}, "diffusion")


def test_with_the_map_loss_the_pretrained_map_goes_on_training_with_the_unet():
    cfg = DiffusionConfig(map_pretrain_steps=5, map_loss=1.0)
    module = LatentDiffusion(_unet(6), cfg)
    optimized = {
        id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]
    }
    assert {id(p) for p in module.unet.text_map.parameters()} <= optimized


def test_the_map_loss_needs_a_map():
    for cfg in (DiffusionConfig(map_loss=1.0), DiffusionConfig(map_pretrain_steps=10)):
        with pytest.raises(ValueError, match="need a text map"):
            LatentDiffusion(_unet(0), cfg)


def test_unknown_map_queries_are_refused():
    with pytest.raises(ValueError, match="unknown text map queries 'grid'"):
        _unet(6, "grid")


def test_a_drawing_map_is_the_output_the_unet_adds_to_and_is_saved_with_it(tmp_path):
    torch.manual_seed(0)
    cfg = UNetConfig(text_map_channels=6, text_map_draws=True, overrides=SMALL)
    unet = build_unet(cfg, text_hidden=16, text_pooled=16, latent_shape=(4, 8, 8)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    states, pooled = torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
        drawn = unet.map_draw(unet.text_map(states))
        out = unet(x, t, encoder_hidden_states=states, class_labels=pooled).sample
    torch.testing.assert_close(out, drawn)  # the UNet adds nothing yet: the map's drawing
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    loaded = load_unet(tmp_path / "unet").eval()
    with torch.no_grad():
        got = loaded(x, t, encoder_hidden_states=states, class_labels=pooled).sample
    torch.testing.assert_close(got, out)
    # What it draws is what the map pretraining trains, and it only fits x0 prediction.
    module = LatentDiffusion(unet, DiffusionConfig(map_pretrain_steps=5, prediction_type="sample"))
    assert not hasattr(module, "map_head")
    with pytest.raises(ValueError, match="needs prediction_type 'sample'"):
        LatentDiffusion(unet, DiffusionConfig(prediction_type="epsilon"))


def test_position_channels_tell_each_place_where_it_is_and_survive_saving(tmp_path):
    torch.manual_seed(0)
    cfg = UNetConfig(text_map_channels=6, position_channels=8, overrides=SMALL)
    unet = build_unet(cfg, text_hidden=16, text_pooled=16, latent_shape=(4, 8, 8)).eval()
    assert unet.config.in_channels == 4 and unet.conv_in.in_channels == 4 + 6 + 8
    where = unet.position_features
    assert where.shape == (8, 8, 8)
    # Every place of the grid has its own features.
    places = where.flatten(1).T
    assert len({tuple(p.round(decimals=4).tolist()) for p in places}) == 64
    assert _saved_and_loaded(unet, tmp_path / "unet").config.position_channels == 8


def test_position_channels_need_the_text_map_and_a_multiple_of_four():
    with pytest.raises(
        ValueError, match="position_channels and text_binder_layers need the text map"
    ):
        build_unet(UNetConfig(position_channels=8, overrides=SMALL), 16, 16, (4, 8, 8))
    with pytest.raises(ValueError, match="multiple of 4, not 6"):
        build_unet(
            UNetConfig(text_map_channels=6, position_channels=6, overrides=SMALL), 16, 16, (4, 8, 8)
        )


def test_the_text_binder_lets_a_word_read_the_words_after_it_and_survives_saving(tmp_path):
    torch.manual_seed(0)
    cfg = UNetConfig(text_map_channels=6, text_binder_layers=1, overrides=SMALL)
    unet = build_unet(cfg, text_hidden=16, text_pooled=16, latent_shape=(4, 8, 8)).eval()
    states = torch.randn(1, 5, 16)
    later_changed = states.clone()
    later_changed[0, 4] = torch.randn(16)
    with torch.no_grad():
        bound, bound_changed = unet.text_binder(states), unet.text_binder(later_changed)
    # A causal tower's first token cannot see the last one; after the binder it does.
    assert not torch.allclose(bound[0, 0], bound_changed[0, 0])
    assert _saved_and_loaded(unet, tmp_path / "unet").config.text_binder_layers == 1


def test_map_pretraining_trains_the_binder_with_the_map_then_freezes_both():
    cfg = UNetConfig(text_map_channels=6, text_binder_layers=1, overrides=SMALL)
    unet = build_unet(cfg, text_hidden=16, text_pooled=16, latent_shape=(4, 8, 8))
    module = LatentDiffusion(
        unet, DiffusionConfig(prediction_type="sample", map_pretrain_steps=5, foreground_weight=10)
    )
    states, latents = _two_corners()
    before = [p.detach().clone() for p in unet.text_binder.parameters()]
    module.pretrain_map(latents, states, batch_size=2)
    after = list(unet.text_binder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert not any(p.requires_grad for p in after)
    assert all(p.requires_grad for p in unet.conv_in.parameters())
