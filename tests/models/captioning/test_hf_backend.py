"""The transformers image-to-text backend, through exactly the code path a hub id takes,
on a tiny random BLIP saved locally (no hub is reachable from CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.captioning.backends import HFImageToTextBackend

WORDS = ["a", "picture", "of", "red", "blue", "circle", "square", "the", "on", "background"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path = tmp_path_factory.mktemp("blip") / "tiny-blip"
    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), bos_token="[DEC]")
    small = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    }
    cfg = BlipConfig(
        text_config={
            **small,
            "vocab_size": len(vocab),
            "bos_token_id": 5,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
            "max_position_embeddings": 64,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(path)
    proc = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    proc.save_pretrained(path)
    return path


def test_local_model_captions_a_batch(tiny_blip):
    backend = HFImageToTextBackend(
        str(tiny_blip),
        prompts={"short": None, "descriptive": "a picture of"},
        max_new_tokens={"short": 5, "descriptive": 8},
    )
    images = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    for kind in ("short", "descriptive"):
        caps = backend.caption(images, kind)
        assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
        assert all(set(c.split()) <= set(WORDS) for c in caps)  # decoded from the tiny vocab
    assert backend.id == f"hf:{tiny_blip}"
    # The version names what the captions depend on: the model and its decoding settings.
    same = HFImageToTextBackend(str(tiny_blip), backend.prompts, backend.max_new_tokens)
    beams = HFImageToTextBackend(str(tiny_blip), backend.prompts, backend.max_new_tokens, 2)
    assert same.version == backend.version != beams.version


def test_missing_model_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="No model hub is reachable"):
        HFImageToTextBackend(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="set captioner backend"):
        HFImageToTextBackend("Salesforce/blip-image-captioning-base")
