"""The layout UNet: scenes to tokens and back, the map it draws from, a layout model that
learns what a caption lays out, and saving, loading and sampling through diffusers."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.layout import (
    SEQ,
    LayoutUNet2DConditionModel,
    guided_logits,
    train_layout_model,
)
from models.diffusion.model import UNetConfig, build_unet, load_unet

SMALL = {"block_out_channels": [16, 32, 32], "norm_num_groups": 8}
SCENE = {
    "background": "black",
    "objects": [
        {"shape": "star", "color": "red", "size": "large", "row": 0, "col": 2},
        {"shape": "circle", "color": "blue", "size": "small", "row": 2, "col": 1},
    ],
    "word": "CAT",
    "word_cell": [1, 1],
}


def _unet(**kw) -> LayoutUNet2DConditionModel:
    torch.manual_seed(0)
    cfg = UNetConfig(layout=True, overrides=SMALL, layout_width=32, layout_layers=1, **kw)
    return build_unet(cfg, text_hidden=16, text_pooled=16, latent_shape=(4, 9, 9))


def test_a_scene_round_trips_through_its_tokens():
    unet = _unet()
    tokens = unet.scene_tokens(SCENE)
    assert len(tokens) == SEQ
    assert unet.tokens_scene(tokens) == SCENE
    empty = {"background": "white", "objects": [], "word": None, "word_cell": None}
    assert unet.tokens_scene(unet.scene_tokens(empty)) == empty


def test_the_map_puts_each_object_in_its_cell_and_no_layout_is_all_zeros():
    unet = _unet()
    assert unet.config.in_channels == 4  # samplers draw the latent's noise
    tokens = torch.tensor([unet.scene_tokens(SCENE), [-1] * SEQ])
    m = unet.layout_map(tokens)
    assert m.shape == (2, unet.layout_channels, 9, 9)
    assert m[1].abs().sum() == 0
    classes = unet.config.layout_classes
    star = 1 + classes["shape"].index("star")
    red = len(classes["shape"]) + 1 + classes["colour"].index("red")
    # 9 x 9 latent: cell (0, 2) is rows 0-2, columns 6-8
    assert m[0, star, 0:3, 6:9].eq(1).all() and m[0, star].sum() == 9
    assert m[0, red, 0:3, 6:9].eq(1).all() and m[0, red].sum() == 9
    # every place says its cell's shape (or empty) and the background
    n_shape = len(classes["shape"]) + 1
    assert m[0, :n_shape].sum(0).eq(1).all()
    assert m[0, -len(classes["background"]) :].sum(0).eq(1).all()


def test_the_text_map_and_the_layout_are_not_combined():
    with pytest.raises(ValueError, match="replaces the text map"):
        _unet(text_map_channels=8)


def test_the_layout_model_learns_what_a_caption_lays_out_and_samples_it():
    """Two captions (token states told apart by their first token), each always with its
    own layout: after training, sampling a caption gives its layout."""
    unet = _unet()
    other = dict(SCENE, background="white", objects=SCENE["objects"][:1], word=None, word_cell=None)
    layouts = torch.tensor([unet.scene_tokens(SCENE), unet.scene_tokens(other)])
    states = torch.zeros(1, 2, 4, 16)
    states[0, 0, 0, 0], states[0, 1, 0, 1] = 3.0, 3.0
    masks = torch.ones(1, 2, 4, dtype=torch.bool)
    variants = torch.zeros(1, 2, dtype=torch.long)
    loss = train_layout_model(
        unet.layout_model, states, masks, variants, layouts, 300, 16, 1e-2, seed=0
    )
    assert loss < 0.05
    g = torch.Generator().manual_seed(0)
    drawn = unet.plan(states[0].repeat(2, 1, 1), masks[0].repeat(2, 1), g)
    assert drawn.tolist() == [layouts[0].tolist(), layouts[1].tolist()] * 2


def test_the_layout_loss_is_the_mean_cross_entropy_of_each_positions_logits():
    """The loss scores each position with the vocabulary it draws from (background, cell,
    word), as the per-position logits that sampling reads do."""
    model = _unet().layout_model
    torch.manual_seed(1)
    states, mask = torch.randn(6, 5, 16), torch.ones(6, 5, dtype=torch.bool)
    v = model.vocab
    tokens = torch.cat(
        [
            torch.randint(0, v[0], (6, 1)),
            torch.randint(0, v[1], (6, 9)),
            torch.randint(0, v[2], (6, 1)),
        ],
        1,
    )
    logits = model(states, mask, tokens)
    assert [lg.shape[1] for lg in logits] == [model.vocab[0], *[model.vocab[1]] * 9, model.vocab[2]]
    each = torch.stack(
        [torch.nn.functional.cross_entropy(lg, tokens[:, i]) for i, lg in enumerate(logits)]
    )
    assert torch.allclose(model.loss(states, mask, tokens), each.mean(), atol=1e-6)
    # A prefix (what sampling feeds) gives the same logits as the full sequence there.
    prefix = model(states, mask, tokens[:, :4])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(prefix, logits[:4], strict=False))


def test_layout_guidance_sharpens_what_stands_and_keeps_whether_anything_does():
    """A cell's token 0 is "empty": guidance keeps its conditional probability and
    reshapes only the objects; the background position (no "nothing" token) is guided
    whole. Scale 1 is the conditional distribution."""
    torch.manual_seed(0)
    cond, uncond = torch.randn(5, 8), torch.randn(5, 8)
    for keep in (True, False):
        same = guided_logits(cond, uncond, 1.0, keep_first=keep).softmax(-1)
        torch.testing.assert_close(same, cond.softmax(-1))
    p = guided_logits(cond, uncond, 3.0, keep_first=True).softmax(-1)
    torch.testing.assert_close(p[:, 0], cond.softmax(-1)[:, 0])
    whole = (uncond + 3.0 * (cond - uncond)).softmax(-1)
    share = p[:, 1:] / p[:, 1:].sum(1, keepdim=True)
    torch.testing.assert_close(share, whole[:, 1:] / whole[:, 1:].sum(1, keepdim=True))
    whole_guided = guided_logits(cond, uncond, 3.0, keep_first=False).softmax(-1)
    torch.testing.assert_close(whole_guided, whole)


def test_layout_guidance_draws_the_captions_object_and_leaves_a_cell_empty_as_often():
    """One cell. The named caption: a star 3 of 5 times, a circle 1, nothing 1; the empty
    caption: star, circle, nothing, nothing. Sampled plainly, the named caption gives the
    circle about one time in five; guided against the empty caption, almost never, while
    the cell stays empty as often as without guidance (the empty caption's "nothing" is
    likelier, and guiding it too would fill the cell more)."""
    unet = _unet()
    star = dict(SCENE, objects=SCENE["objects"][:1], word=None, word_cell=None)
    circle = dict(star, objects=[dict(SCENE["objects"][0], shape="circle")])
    nothing = dict(star, objects=[])
    rows = [star] * 3 + [circle, nothing] + [star, circle, nothing, nothing]
    layouts = torch.tensor([unet.scene_tokens(r) for r in rows])
    states = torch.zeros(1, len(rows), 4, 16)
    states[0, :5, 0, 0] = 3.0  # the named caption; the other rows: the empty one
    masks = torch.ones(1, len(rows), 4, dtype=torch.bool)
    variants = torch.zeros(1, len(rows), dtype=torch.long)
    train_layout_model(unet.layout_model, states, masks, variants, layouts, 400, 32, 1e-2, 0)
    n, cell = 400, 1 + 0 * 3 + 2
    named, mask = states[0, :1].expand(n, -1, -1), masks[0, :1].expand(n, -1)
    empty = (states[0, 5:6], masks[0, 5:6])
    plain = unet.plan(named, mask, torch.Generator().manual_seed(0))[:, cell]
    guided = unet.plan(named, mask, torch.Generator().manual_seed(1), guidance=4.0, empty=empty)
    guided = guided[:, cell]
    is_circle = unet.scene_tokens(circle)[cell]
    assert 0.1 < (plain == is_circle).float().mean() < 0.3
    assert (guided == is_circle).float().mean() < 0.05
    assert 0.1 < (plain == 0).float().mean() < 0.3
    assert abs((guided == 0).float().mean() - (plain == 0).float().mean()) < 0.07
    with pytest.raises(ValueError, match="empty caption"):
        unet.plan(named, mask, guidance=4.0)


def test_a_saved_layout_unet_loads_back_and_draws_the_same(tmp_path):
    unet = _unet().eval()
    unet.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_unet(tmp_path).eval()
    assert type(loaded) is LayoutUNet2DConditionModel
    x, t = torch.randn(2, 4, 9, 9), torch.tensor([10, 900])
    states, pooled = torch.randn(2, 5, 16), torch.randn(2, 16)
    layout = torch.tensor([unet.scene_tokens(SCENE), [-1] * SEQ])
    with torch.no_grad():
        kw = {"encoder_hidden_states": states, "class_labels": pooled, "layout": layout}
        expected = unet(x, t, **kw).sample
        got = loaded(x, t, **kw).sample
        # the layout reaches the output
        assert not torch.allclose(expected, unet(x, t, **{**kw, "layout": None}).sample)
    torch.testing.assert_close(got, expected)
