"""The rich-feedback model's shapes, losses and keyword tags."""

import open_clip
import pytest
import torch

from models.common.clip import create_clip
from models.feedback.rich_model import (
    RichFeedbackNet,
    predicted_keywords,
    prompt_words,
    rich_loss,
    token_tags,
    word_tokens,
)
from models.feedback.rich_train import RichConfig

NAME = "recapflow-tiny-reference-clip"
TEXT = 'a red star left of the word "CAT".'


def test_tokens_are_built_word_by_word_and_tags_land_on_their_words():
    tok = open_clip.get_tokenizer(NAME)
    words = prompt_words(TEXT)
    assert words == ["a", "red", "star", "left", "of", "the", "word", "cat"]
    ids, owner = word_tokens(tok, TEXT, 16)
    assert ids[0] == tok.sot_token_id and len(ids) == 16
    assert ids[owner.tolist().index(-1, 1)] == tok.eot_token_id  # the end after the words
    assert sorted(set(owner.tolist()) - {-1}) == list(range(len(words)))
    tags = token_tags(owner, words, {"red", "cat"})
    assert tags[owner == 1].eq(1).all() and tags[owner == 7].eq(1).all()
    assert tags[(owner != 1) & (owner != 7)].eq(0).all()
    logits = (tags * 2 - 1) * 5  # confident where tagged
    assert predicted_keywords(logits, owner, words) == {"red", "cat"}


def test_the_net_predicts_maps_scores_and_tags_and_learns_a_batch():
    torch.manual_seed(0)
    net = RichFeedbackNet(create_clip(NAME))
    tok = open_clip.get_tokenizer(NAME)
    ids, owner = zip(*[word_tokens(tok, TEXT, 24)] * 2, strict=True)
    ids, owner = torch.stack(ids), torch.stack(owner)
    images = torch.randn(2, 3, 32, 32)
    out = net(images, ids)
    assert out["heatmaps"].shape == (2, 2, 32, 32)
    assert out["scores"].shape == (2, 4) and out["tags"].shape == (2, 24)
    words = prompt_words(TEXT)
    batch = {
        "heatmaps": torch.zeros(2, 2, 32, 32),
        "scores": torch.full((2, 4), 0.8),
        "tags": torch.stack([token_tags(o, words, {"red"}) for o in owner]),
        "owner": owner,
    }
    first = rich_loss(out, batch)["total"].item()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(20):
        loss = rich_loss(net(images, ids), batch)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_dropout_key_reaches_the_joint_layers(dropout):
    """rich_feedback_model.dropout: at the default 0 a training-mode pass repeats; above 0
    the joint layers drop."""
    assert RichConfig().dropout == 0.0
    cfg = RichConfig.from_dict({"dropout": dropout})
    torch.manual_seed(0)
    net = RichFeedbackNet(create_clip(NAME), dropout=cfg.dropout).train()
    ids = word_tokens(open_clip.get_tokenizer(NAME), TEXT, 16)[0][None]
    images = torch.randn(1, 3, 32, 32)
    first, second = net(images, ids)["scores"], net(images, ids)["scores"]
    assert torch.equal(first, second) == (dropout == 0.0)
