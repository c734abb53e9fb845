"""Real human-preference scorers for the `full` profile: HPS v2 / v2.1, PickScore, and an
ImageReward-style model, all read from local files (or a hub cache) through one interface.

    scorer = load_real_scorer("hpsv2.1", "/models/HPS_v2.1_compressed.pt")
    scorer.score(images_uint8, prompts)   # np.ndarray, one score per image
    scorer.score_dict(images_uint8, prompts)   # {"version": "hpsv2.1", "mean": ..., ...}

Every score carries its scorer's `version`. Scores of different versions are on different
scales (HPS v2.0 and v2.1 are two fine-tunes of one CLIP and their numbers are not
interchangeable), so `check_comparable` / `score_difference` refuse to mix them.

- HPS v2 / v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2, `hpsv2/img_score.py`): open_clip
  ViT-H-14 with the fine-tuned weights of `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`
  (`{"state_dict": ...}`) or a safetensors export. Score = cosine of the normalised image and
  prompt embeddings (the diagonal of `image_features @ text_features.T`, about 0.2-0.3; no
  logit scale). Preprocessing is HPS v2's own `preprocess_val` (`light_augmentation=True`):
  ToTensor, then ResizeMaxSize (bicubic resize of the float tensor so the longest side is the
  model's size, zero padding centred), then the OpenAI mean/std. `hps_preprocess` does the
  same on uint8 batches. Note that open_clip's current `image_transform(resize_mode="longest")`
  is *not* the same (it resizes the PIL image before ToTensor).
- PickScore (Kirstain et al. 2023, github.com/yuvalkirstain/PickScore README): transformers
  CLIPModel (`yuvalkirstain/PickScore_v1`) and the processor of
  `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. Score = logit_scale.exp() * cosine (about 20).
  The processor runs on its PIL backend, the one PickScore was released with.
- ImageReward-style: ImageReward (Xu et al. 2023, github.com/THUDM/ImageReward) is BLIP
  (ViT-L + a BERT text encoder that cross-attends to the image) whose text [CLS] state feeds
  an MLP, standardised by fixed mean/std. This scorer rebuilds that recipe on transformers'
  BlipForImageTextRetrieval with the MLP head read from a safetensors file. It is
  ImageReward-*style*: the official ImageReward.pt is written for Salesforce's BLIP code,
  whose weight names differ from transformers', and no converter is provided here, so its
  BLIP weights do not load into this scorer (its `mlp.*` head weights do, by name).

No model hub is reachable from the machines that test this project: a missing file or an
unreachable hub id raises `MissingScorerError` saying what to download and where to put it.
Nothing falls back silently.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

KINDS = ("hpsv2", "hpsv2.1", "pickscore", "imagereward")
HPS_VERSIONS = {"hpsv2": "hpsv2.0", "hpsv2.1": "hpsv2.1"}
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
# The mean and std of CLIP's (OpenAI's) training images; HPS v2 and ImageReward both use them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageReward standardises the MLP output with these (ImageReward/ImageReward.py).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_HEAD = "imagereward_head.safetensors"
IMAGEREWARD_MAX_TOKENS = 35  # ImageReward pads and cuts prompts to 35 BERT tokens
PICKSCORE_MAX_TOKENS = 77


class MissingScorerError(FileNotFoundError):
    """A scorer's weights, processor or head are not on this machine."""


def comparable(a: str, b: str) -> bool:
    """Whether scores of versions `a` and `b` are on one scale (only the same version is)."""
    return a == b


def check_comparable(a: str, b: str) -> None:
    if not comparable(a, b):
        raise ValueError(
            f"scores of {a!r} and {b!r} are not comparable: each scorer version has its own "
            "scale (HPS v2.0 and v2.1 are different fine-tunes); rescore both sides with one "
            "version"
        )


def score_difference(a: dict, b: dict) -> float:
    """Mean score of `a` minus that of `b` (two `score_dict` results of one version)."""
    check_comparable(a["version"], b["version"])
    return a["mean"] - b["mean"]


class RealScorer:
    """Scores uint8 images (N, 3, H, W) against their prompts, in batches, without grad."""

    name: str  # the kind: hpsv2, hpsv2.1, pickscore or imagereward
    version: str  # recorded with every score; only equal versions are comparable
    source: str  # where the weights came from
    device: torch.device
    batch_size: int

    def _score_batch(self, images_uint8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images_uint8: torch.Tensor, prompts: list[str]) -> np.ndarray:
        """One float score per image, higher = more preferred for its prompt."""
        x, n = images_uint8, self.batch_size
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(prompts):
            raise ValueError(f"{len(x)} images but {len(prompts)} prompts")
        out = [
            self._score_batch(x[i : i + n], prompts[i : i + n]).float().cpu()
            for i in range(0, len(prompts), n)
        ]
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def score_dict(self, images_uint8: torch.Tensor, prompts: list[str]) -> dict:
        """{"scorer", "version", "source", "mean", "per_image"}: scores with their version."""
        s = self.score(images_uint8, prompts)
        return {
            "scorer": self.name,
            "version": self.version,
            "source": self.source,
            "mean": float(s.mean()) if len(s) else float("nan"),
            "per_image": [float(x) for x in s],
        }


def load_real_scorer(kind: str, source: str | Path, **kw) -> RealScorer:
    """A scorer of `kind` (hpsv2, hpsv2.1, pickscore, imagereward) from `source`: a local
    checkpoint file for HPS, a local directory or hub id for the others. Keywords go to
    `load_hps`, `load_pickscore` or `load_imagereward_style`."""
    if kind in HPS_VERSIONS:
        return load_hps(kind, source, **kw)
    if kind == "pickscore":
        return load_pickscore(source, **kw)
    if kind == "imagereward":
        return load_imagereward_style(source, **kw)
    raise ValueError(f"unknown scorer kind {kind!r}; expected one of {KINDS}")


# --- HPS v2 / v2.1 ------------------------------------------------------------------------


def hps_preprocess(
    images_uint8: torch.Tensor,
    size: int,
    mean: tuple[float, ...] = OPENAI_MEAN,
    std: tuple[float, ...] = OPENAI_STD,
    antialias: bool = True,
) -> torch.Tensor:
    """HPS v2's `preprocess_val` on a uint8 batch: [0, 1] floats, bicubic resize so the
    longest side is `size`, zero padding to a centred square, normalisation.

    HPS v2 resizes the *tensor* (ToTensor comes first) with torchvision's F.resize, whose
    `antialias` defaults to True since torchvision 0.17 (what `hpsv2.score` does today) and
    was False for tensors before. Bicubic overshoot outside [0, 1] is kept, as there."""
    x = images_uint8.float() / 255.0  # ToTensor
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)  # ResizeMaxSize rounds the same way
        x = nn.functional.interpolate(
            x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias
        )
    # HPS v2 pads only after a resize, so a non-square image whose longest side is already
    # `size` would reach the model unpadded and fail there; padding it too is the only
    # reading that gives the model a square input.
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    if pad_h or pad_w:
        x = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class HpsScorer(RealScorer):
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        kind: str,
        source: str,
        antialias: bool = True,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.name, self.version, self.source = kind, HPS_VERSIONS[kind], source
        self.antialias, self.device, self.batch_size = antialias, torch.device(device), batch_size
        h, w = model.visual.image_size
        if h != w:
            raise ValueError(f"HPS v2 preprocessing needs a square input, the model has {h}x{w}")
        self.image_size = h

    def _score_batch(self, images_uint8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = hps_preprocess(images_uint8, self.image_size, antialias=self.antialias)
        img = self.model.encode_image(x.to(self.device), normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (img * txt).sum(-1)  # the cosine, as hpsv2/img_score.py reports it


def hps_version_in_name(name: str) -> str | None:
    """The HPS version a checkpoint's file name claims, if any (HPS_v2.1_compressed.pt)."""
    n = name.lower()
    if "v2.1" in n or "v2_1" in n:
        return "hpsv2.1"
    if "hps_v2" in n or "hpsv2" in n:
        return "hpsv2.0"
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:  # weights_only: a checkpoint is data, never code to run
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path} holds more than tensors and is not loaded with weights_only=True "
                f"({e}); export its state_dict to safetensors on a trusted machine"
            ) from e
        state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    # Checkpoints saved from DistributedDataParallel prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_hps(
    kind: str,
    source: str | Path,
    model_name: str = "ViT-H-14",
    antialias: bool = True,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> HpsScorer:
    """HPS v2.0 (`kind="hpsv2"`) or v2.1 from a local checkpoint of open_clip `model_name`."""
    import open_clip

    if kind not in HPS_VERSIONS:
        raise ValueError(f"unknown HPS kind {kind!r}; expected one of {tuple(HPS_VERSIONS)}")
    path = Path(source)
    if not path.is_file():
        raise MissingScorerError(
            f"{HPS_VERSIONS[kind]} checkpoint {str(path)!r} does not exist. No model hub is "
            f"reachable from here: download {HPS_FILES[kind]} from the hub repo xswu/HPSv2 on "
            "a machine with internet, copy it to this machine and pass its local path."
        )
    claimed = hps_version_in_name(path.name)
    if claimed and claimed != HPS_VERSIONS[kind]:  # a mislabelled version is worse than none
        raise ValueError(
            f"{path.name} looks like a {claimed} checkpoint but was asked for as {kind!r} "
            f"({HPS_VERSIONS[kind]})"
        )
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; register its config with "
            "open_clip.add_model_config"
        )
    model = open_clip.create_model(model_name, pretrained=None)
    try:
        model.load_state_dict(_read_state_dict(path), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit open_clip {model_name!r}: {e}") from e
    tokenizer = open_clip.get_tokenizer(model_name)
    return HpsScorer(model, tokenizer, kind, str(path), antialias, device, batch_size)


# --- transformers models (PickScore, ImageReward-style) -----------------------------------


def _looks_local(source: str) -> bool:
    """A path rather than a hub id ("owner/name")."""
    return Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") != 1


def _from_pretrained(load, source: str | Path, what: str, hint: str, **kw):
    """`load(source)`, or a MissingScorerError saying how to get `what` onto this machine."""
    source = str(source)
    how = (
        f"No model hub is reachable from here: download {hint} on a machine with internet "
        "(e.g. `huggingface-cli download REPO --local-dir DIR`), copy DIR here and pass its path."
    )
    if _looks_local(source) and not Path(source).expanduser().exists():
        raise MissingScorerError(f"{what} {source!r} does not exist. {how}")
    try:
        return load(str(Path(source).expanduser()) if _looks_local(source) else source, **kw)
    except (OSError, ValueError) as e:  # missing files, offline hub, bad repo id
        raise MissingScorerError(f"could not load {what} from {source!r} ({e}). {how}") from e


def _to_pil(images_uint8: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images_uint8]


def _embedding(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # earlier versions returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PickScoreScorer(RealScorer):
    def __init__(
        self,
        model: nn.Module,
        image_processor,
        tokenizer,
        source: str,
        version: str = "pickscore_v1",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ):
        self.model = model.to(device).eval()
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.name, self.version, self.source = "pickscore", version, source
        self.device, self.batch_size = torch.device(device), batch_size

    def _score_batch(self, images_uint8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=_to_pil(images_uint8), return_tensors="pt")
        text = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=PICKSCORE_MAX_TOKENS,
            return_tensors="pt",
        )
        pixels, text = pixels.to(self.device), text.to(self.device)
        img = _embedding(self.model.get_image_features(pixel_values=pixels["pixel_values"]))
        txt = _embedding(
            self.model.get_text_features(
                input_ids=text["input_ids"], attention_mask=text["attention_mask"]
            )
        )
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def load_pickscore(
    source: str | Path,
    processor: str | Path | None = None,
    version: str = "pickscore_v1",
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> PickScoreScorer:
    """PickScore from a CLIPModel directory or hub id; `processor` (default: `source`) holds
    the image processor and tokenizer (officially laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    hint = "yuvalkirstain/PickScore_v1"
    model = _from_pretrained(CLIPModel.from_pretrained, source, "PickScore model", hint)
    processor = processor or source
    proc_hint = "the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    # The PIL backend: transformers 5 defaults to torchvision, which resizes differently
    # from the PIL processor PickScore was trained and released with.
    image_processor = _from_pretrained(
        AutoImageProcessor.from_pretrained,
        processor,
        "PickScore image processor",
        proc_hint,
        backend="pil",
    )
    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained, processor, "PickScore tokenizer", proc_hint
    )
    return PickScoreScorer(
        model, image_processor, tokenizer, str(source), version, device, batch_size
    )


class ImageRewardMLP(nn.Module):
    """ImageReward's head, layer for layer (no activations between the Linears, as there),
    so its `mlp.*` weights load by name."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def imagereward_preprocess(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """ImageReward's transform, op for op on PIL images: bicubic resize of the shortest side,
    centre crop, [0, 1] floats, OpenAI mean/std."""
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )  # fmt: skip (one op a line, as in ImageReward's _transform)
    return torch.stack([transform(im) for im in _to_pil(images_uint8)])


class ImageRewardStyleScorer(RealScorer):
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        head: ImageRewardMLP,
        source: str,
        version: str = "imagereward-style",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ):
        self.model, self.head = model.to(device).eval(), head.to(device).eval()
        self.tokenizer = tokenizer
        self.name, self.version, self.source = "imagereward", version, source
        self.device, self.batch_size = torch.device(device), batch_size
        self.image_size = model.config.vision_config.image_size

    def _score_batch(self, images_uint8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = imagereward_preprocess(images_uint8, self.image_size).to(self.device)
        text = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_MAX_TOKENS,
            return_tensors="pt",
        )
        image_embeds = self.model.vision_model(pixel_values=x).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.model.text_encoder(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        features = out.last_hidden_state[:, 0, :].float()  # [CLS], cross-attended to the image
        reward = self.head(features).squeeze(-1)
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_imagereward_style(
    source: str | Path,
    head: str | Path | None = None,
    tokenizer: str | Path | None = None,
    version: str = "imagereward-style",
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> ImageRewardStyleScorer:
    """A BlipForImageTextRetrieval directory or hub id, its tokenizer (default: `source`) and
    the MLP head (default: `source`/imagereward_head.safetensors)."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    hint = "a BLIP image-text retrieval model (e.g. Salesforce/blip-itm-large-coco)"
    model = _from_pretrained(BlipForImageTextRetrieval.from_pretrained, source, "BLIP model", hint)
    tok = _from_pretrained(
        AutoTokenizer.from_pretrained, tokenizer or source, "BLIP tokenizer", hint
    )
    if head is None:
        if not Path(source).expanduser().is_dir():
            raise MissingScorerError(
                f"{str(source)!r} is not a local directory: pass head= the local path of the "
                f"ImageReward-style MLP head ({IMAGEREWARD_HEAD})"
            )
        head = Path(source).expanduser() / IMAGEREWARD_HEAD
    head = Path(head)
    if not head.is_file():
        raise MissingScorerError(
            f"ImageReward-style head {str(head)!r} does not exist: save the MLP's weights "
            f"(ImageRewardMLP state_dict, or ImageReward's `mlp.*` tensors) as {IMAGEREWARD_HEAD} "
            "next to the BLIP directory, or pass head= its path."
        )
    state = {k.removeprefix("mlp."): v for k, v in load_file(str(head)).items()}
    mlp = ImageRewardMLP(model.config.text_config.hidden_size)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{head} is not an ImageReward-style head for this BLIP: {e}") from e
    return ImageRewardStyleScorer(model, tok, mlp, str(source), version, device, batch_size)
