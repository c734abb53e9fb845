"""The `full` profile's real preference scorers (HPS v2/v2.1, PickScore, ImageReward-style):
each is a tiny random model saved locally, loaded back through `load_real_scorer`, and
scored against a direct computation with the official recipe."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; fail fast, never download

import json

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

from models.feedback.real_scorers import (
    IMAGEREWARD_HEAD,
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageRewardMLP,
    MissingScorerError,
    check_comparable,
    comparable,
    hps_preprocess,
    load_real_scorer,
    score_difference,
)

PROMPTS = ["a red cat on a mat", "two blue cubes", "a photo of a dog"]
TINY_HPS = "recapflow-test-tiny-hps"


def _images(seed: int, n: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


# --- HPS v2 / v2.1 ------------------------------------------------------------------------


class OfficialResizeMaxSize(torch.nn.Module):
    """HPS v2's ResizeMaxSize (tgxs002/HPSv2@866735e, hpsv2/src/open_clip/transform.py), copied
    in behaviour; `antialias=None` is torchvision's default (True since 0.17)."""

    def __init__(self, max_size: int, fill: int = 0, antialias: bool | None = None):
        super().__init__()
        self.max_size, self.fill, self.antialias = max_size, fill, antialias

    def forward(self, img):
        if isinstance(img, torch.Tensor):
            height, width = img.shape[1:]
        else:
            width, height = img.size
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            kw = {} if self.antialias is None else {"antialias": self.antialias}
            img = TF.resize(img, new_size, T.InterpolationMode.BICUBIC, **kw)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = TF.pad(
                img,
                padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2],
                fill=self.fill,
            )
        return img


def official_hps_transform(size: int, antialias: bool | None = None) -> T.Compose:
    """`preprocess_val` of hpsv2/img_score.py: image_transform(is_train=False,
    resize_longest_max=True) of HPS v2's vendored open_clip, with ViT-H-14's OpenAI mean/std."""
    return T.Compose([
        lambda im: im.convert("RGB"),
        T.ToTensor(),
        OfficialResizeMaxSize(size, fill=0, antialias=antialias),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])  # fmt: skip


@pytest.fixture(scope="module")
def hps_model_name(tmp_path_factory) -> str:
    """A tiny open_clip ViT registered under its own name (ViT-H-14's layout, 32 px)."""
    d = tmp_path_factory.mktemp("open_clip_configs")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2},
    }  # fmt: skip
    (d / f"{TINY_HPS}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return TINY_HPS


@pytest.fixture(scope="module")
def hps_model(hps_model_name) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(hps_model_name).eval()


@pytest.mark.parametrize("shape", [(64, 64), (48, 40), (40, 48), (20, 25), (100, 37), (32, 32)])
@pytest.mark.parametrize("antialias", [True, False])
def test_hps_preprocess_matches_official_transform(shape, antialias):
    images = _images(sum(shape), 4, *shape)
    official = official_hps_transform(32, antialias=antialias)
    want = torch.stack([official(im) for im in _pil(images)])
    got = hps_preprocess(images, 32, antialias=antialias)
    assert got.shape == want.shape == (4, 3, 32, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hps_preprocess_default_is_torchvisions_default():
    images = _images(7, 2, 50, 30)
    want = torch.stack([official_hps_transform(32)(im) for im in _pil(images)])
    torch.testing.assert_close(hps_preprocess(images, 32), want, atol=1e-5, rtol=0)


def test_hps_scores_match_the_official_recipe(tmp_path, hps_model_name, hps_model):
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    # The official file is {"state_dict": ...}; a DDP-saved one has "module." keys.
    state = {f"module.{k}": v for k, v in hps_model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, ckpt)
    scorer = load_real_scorer("hpsv2", ckpt, model_name=hps_model_name, batch_size=2)
    images = _images(1, 3, 48, 40)
    got = scorer.score(images, PROMPTS)

    tokenizer = open_clip.get_tokenizer(hps_model_name)
    with torch.no_grad():
        x = torch.stack([official_hps_transform(32)(im) for im in _pil(images)])
        image_features, text_features = hps_model(x, tokenizer(PROMPTS))[:2]  # normalised
        want = torch.diagonal(image_features @ text_features.T).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(got) > 0 and np.all(np.abs(got) <= 1 + 1e-6)  # cosines, not x100
    assert scorer.version == "hpsv2.0"
    d = scorer.score_dict(images, PROMPTS)
    assert d["version"] == "hpsv2.0" and d["scorer"] == "hpsv2" and d["source"] == str(ckpt)
    np.testing.assert_allclose(d["per_image"], got, atol=1e-6)


def test_hps_v21_from_safetensors_and_versions_never_compared(tmp_path, hps_model_name, hps_model):
    v20, v21 = tmp_path / "HPS_v2_compressed.pt", tmp_path / "HPS_v2.1.safetensors"
    torch.save({"state_dict": hps_model.state_dict()}, v20)
    save_file({k: v.contiguous() for k, v in hps_model.state_dict().items()}, v21)
    a = load_real_scorer("hpsv2", v20, model_name=hps_model_name)
    b = load_real_scorer("hpsv2.1", v21, model_name=hps_model_name)
    assert (a.version, b.version) == ("hpsv2.0", "hpsv2.1")
    images = _images(2, 3, 32, 32)
    da, db = a.score_dict(images, PROMPTS), b.score_dict(images, PROMPTS)
    np.testing.assert_allclose(da["per_image"], db["per_image"], atol=1e-6)  # same weights here

    assert comparable("hpsv2.1", "hpsv2.1") and not comparable("hpsv2.0", "hpsv2.1")
    with pytest.raises(ValueError, match=r"'hpsv2\.0' and 'hpsv2\.1'"):
        check_comparable("hpsv2.0", "hpsv2.1")
    with pytest.raises(ValueError, match=r"'hpsv2\.1' and 'hpsv2\.0'"):
        score_difference(db, da)
    assert score_difference(da, da) == 0.0


def test_hps_missing_or_mislabelled_checkpoint(tmp_path, hps_model_name, hps_model):
    with pytest.raises(MissingScorerError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):
        load_real_scorer("hpsv2.1", tmp_path / "absent.pt", model_name=hps_model_name)
    mislabelled = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": hps_model.state_dict()}, mislabelled)
    with pytest.raises(ValueError, match=r"looks like a hpsv2\.1 checkpoint"):
        load_real_scorer("hpsv2", mislabelled, model_name=hps_model_name)
    with pytest.raises(ValueError, match="unknown scorer kind"):
        load_real_scorer("hpsv3", mislabelled)


# --- PickScore ----------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which CLIP's BPE works on."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_clip_tokenizer():
    """A CLIPTokenizer over single bytes plus a few merges (none can be downloaded here)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in [*chars, *(c + "</w>" for c in chars), "ca", "cat</w>", "do", "dog</w>"]:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    d = tmp_path_factory.mktemp("pickscore")
    tok = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(d / "model")
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(d / "processor")
    tok.save_pretrained(d / "processor")
    return d


def test_pickscore_scores_match_the_readme(pickscore_dir):
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    scorer = load_real_scorer(
        "pickscore", pickscore_dir / "model", processor=pickscore_dir / "processor", batch_size=2
    )
    assert type(scorer.image_processor).__name__ == "CLIPImageProcessorPil"
    images = _images(3, 3, 40, 48)
    got = scorer.score(images, PROMPTS)

    # The PickScore README's calc_probs, one prompt against all images, before the softmax.
    model = CLIPModel.from_pretrained(pickscore_dir / "model").eval()
    processor = CLIPImageProcessorPil.from_pretrained(pickscore_dir / "processor")
    tokenizer = AutoTokenizer.from_pretrained(pickscore_dir / "processor")
    want = []
    with torch.no_grad():
        image_inputs = processor(images=_pil(images), return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        for i, prompt in enumerate(PROMPTS):
            text_inputs = tokenizer(
                prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            text_embs = model.get_text_features(**text_inputs).pooler_output
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
            want.append(scores[i].item())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.ptp(got) > 0
    assert scorer.version == "pickscore_v1"
    assert scorer.score_dict(images, PROMPTS)["version"] == "pickscore_v1"


def test_pickscore_missing_sources_raise(tmp_path, pickscore_dir):
    with pytest.raises(MissingScorerError, match=r"does not exist.*PickScore_v1"):
        load_real_scorer("pickscore", tmp_path / "absent")
    with pytest.raises(MissingScorerError, match="could not load PickScore model"):
        load_real_scorer("pickscore", "recapflow-tests/no-such-model")
    # The model alone, without its processor: an error, not a default processor.
    with pytest.raises(MissingScorerError, match="PickScore image processor"):
        load_real_scorer("pickscore", pickscore_dir / "model")


# --- ImageReward-style --------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "on", "mat", "two",
         "blue", "cubes", "photo", "of", "dog"]  # fmt: skip


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    d = tmp_path_factory.mktemp("imagereward") / "blip"
    config = BlipConfig(
        text_config={"vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        image_text_hidden_size=16,
    )  # fmt: skip
    torch.manual_seed(2)
    BlipForImageTextRetrieval(config).save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(d)
    head = ImageRewardMLP(32)
    # Saved with ImageReward's own names (`mlp.layers.N.*`), which the loader accepts.
    state = {f"mlp.{k}": v.contiguous() for k, v in head.state_dict().items()}
    save_file(state, d / IMAGEREWARD_HEAD)
    return d


def official_imagereward_transform(n_px: int) -> T.Compose:
    """ImageReward/ImageReward.py `_transform`."""
    return T.Compose([
        T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(n_px),
        lambda im: im.convert("RGB"),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])  # fmt: skip


def test_imagereward_style_scores_match_the_official_recipe(blip_dir):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    scorer = load_real_scorer("imagereward", blip_dir, batch_size=2)
    images = _images(4, 3, 48, 40)
    got = scorer.score(images, PROMPTS)

    # ImageReward.score, one image at a time: BLIP image tokens, the text encoder's [CLS]
    # cross-attending to them, the MLP, then the fixed standardisation.
    model = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(blip_dir)
    head = ImageRewardMLP(32).eval()
    head.load_state_dict({k[4:]: v for k, v in load_file(blip_dir / IMAGEREWARD_HEAD).items()})
    want = []
    with torch.no_grad():
        for pil, prompt in zip(_pil(images), PROMPTS, strict=True):
            text = tokenizer(
                prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
            )
            image = official_imagereward_transform(32)(pil).unsqueeze(0)
            image_embeds = model.vision_model(pixel_values=image).last_hidden_state
            image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
            out = model.text_encoder(
                input_ids=text.input_ids,
                attention_mask=text.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
            )
            reward = head(out.last_hidden_state[:, 0, :].float())
            want.append(((reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).item())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.ptp(got) > 0
    assert scorer.version == "imagereward-style"
    assert scorer.score_dict(images, PROMPTS)["version"] == "imagereward-style"


def test_imagereward_style_missing_head_or_model(tmp_path, blip_dir):
    with pytest.raises(MissingScorerError, match=IMAGEREWARD_HEAD):
        load_real_scorer("imagereward", blip_dir, head=tmp_path / IMAGEREWARD_HEAD)
    with pytest.raises(MissingScorerError, match=r"BLIP model .* does not exist"):
        load_real_scorer("imagereward", tmp_path / "absent")
