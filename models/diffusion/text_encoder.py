"""The diffusion model's text encoder: frozen, so every caption is encoded once.

`full`: a pretrained transformers text encoder by path or hub id, CLIP
(`CLIPTextModelWithProjection`) or T5 (`T5EncoderModel`), as Stable Diffusion and
DALL-E 3 / Imagen use. `tiny`: a `CLIPTextModelWithProjection` built from the config in
models/configs/, pretrained contrastively on the corpus's (image, caption) pairs, the way
web CLIP is trained on alt-text, then frozen. A text encoder trained jointly with the
UNet from scratch learned colour words too slowly on a CPU (docs/log/); a contrastive one
already separates them.

Both give per-token states (for cross-attention) and one pooled vector per caption
(added to the UNet's timestep embedding: the fast path for global attributes).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from tokenizers import processors
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)

from corpus.config import build_config
from corpus.scene_text import plural
from corpus.world import SHAPES
from models import CONFIG_DIR
from models.common.clip import ClipTextTokenizer, warmup_cosine_adamw
from models.common.tokenizer import train_bpe_tokenizer


class MissingTextEncoderError(FileNotFoundError):
    pass


OBJECTIVES = ("contrastive", "masked")
# contrastive: the image-side partner. "cnn": a small CNN trained beside the text tower;
# "captioner": the captioner's concept tower and cell heads, locked, with a trainable
# linear head (models/diffusion/text_partner.py, LiT); "captioner+cnn": the sum of both,
# the CNN reading what the concept tower has no head for (the background).
PARTNERS = ("cnn", "captioner", "captioner+cnn")


@dataclass(frozen=True)
class TextPretrainConfig:
    max_steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 30
    texts: int = 60_000  # objective "masked": texts of the world's language it reads
    mask_ratio: float = 0.25
    # contrastive: each caption is also contrasted with a copy of itself whose one shape
    # word names another shape (a hard negative, as NegCLIP does): in-batch negatives
    # differ in colour and place, so without these the towers never need to read shapes
    hard_negatives: bool = False
    # contrastive: channels of the image tower's first layer (x2, x4 deeper); a wider
    # tower reads shape better, and the text tower learns what its partner can read
    image_width: int = 32
    partner: str = "cnn"  # one of PARTNERS
    # contrastive: the saved projection's weights times this. The loss compares directions
    # only, so the projection's scale is free; the UNet's linear layer that takes the
    # pooled vector learns from a loud input faster than from a quiet one (docs/log/).
    pooled_scale: float = 1.0


@dataclass(frozen=True)
class TextEncoderConfig:
    # tiny: "contrastive" trains a CLIP text tower (config) against an image tower on the
    # corpus's pairs; "masked" a T5 encoder on text alone (models/diffusion/masked_text.py)
    objective: str = "contrastive"
    config: str = "recapflow-tiny-text-encoder"  # a CLIPTextConfig / T5Config in models/configs
    pretrained: str | None = None  # full: folder or hub id of a CLIP text model or T5
    subfolder: str | None = None  # e.g. "text_encoder" inside a pipeline folder
    tokenizer_subfolder: str | None = None
    context_length: int = 64
    vocab_size: int = 1024
    pretrain: TextPretrainConfig = field(default_factory=TextPretrainConfig)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"diffusion_model.text_encoder.objective: {self.objective!r} is not one of "
                f"{list(OBJECTIVES)}"
            )
        if self.pretrain.partner not in PARTNERS:
            raise ValueError(
                f"diffusion_model.text_encoder.pretrain.partner: {self.pretrain.partner!r} is "
                f"not one of {list(PARTNERS)}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        return build_config(cls, d, "diffusion_model.text_encoder")


def clip_text_features(
    model: CLIPTextModelWithProjection, ids: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token states, projected state at the first EOS) of a CLIP text model.

    Pooled here rather than by transformers: a config with `eos_token_id: 2` (the legacy
    value, and our BPE tokenizer's real EOS id) makes transformers pool at the highest
    token id of each caption instead, so the tiny encoder's "pooled" vector was the
    causal state at some mid-caption word. For OpenAI's CLIP, whose EOS is the highest
    id, both rules pick the same token."""
    states = model(input_ids=ids).last_hidden_state
    eos = (ids == eos_token_id).int().argmax(-1)
    pooled = states[torch.arange(len(ids), device=ids.device), eos]
    return states, model.text_projection(pooled)


class FrozenTextEncoder(torch.nn.Module):
    """A tokenizer and a transformers text encoder, frozen, in eval mode."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, ctx: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenize = ClipTextTokenizer(ctx, tokenizer)
        self.context_length = ctx

    @property
    def hidden_size(self) -> int:
        return (
            self.model.config.hidden_size
            if hasattr(self.model.config, "hidden_size")
            else (self.model.config.d_model)
        )

    @property
    def pooled_size(self) -> int:
        return getattr(self.model.config, "projection_dim", None) or self.hidden_size

    def truncated(self, texts: list[str]) -> int:
        """How many texts are longer than the context (cut, as CLIP cuts at 77)."""
        lens = [
            len(ids) + 1 for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ]
        return sum(n > self.context_length for n in lens)

    def token_mask(self, texts: list[str]) -> torch.Tensor:
        """(B, context_length) bool: the texts' real tokens (EOS included), not padding."""
        return self.tokenize(texts) != self.tokenizer.pad_token_id

    @torch.no_grad()
    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, hidden), pooled (B, pooled)) for a list of texts."""
        ids = self.tokenize(texts).to(next(self.model.parameters()).device)
        if isinstance(self.model, CLIPTextModelWithProjection):
            return clip_text_features(self.model, ids, self.tokenizer.eos_token_id)
        mask = (ids != self.tokenizer.pad_token_id).long()
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return states, pooled

    @torch.no_grad()
    def encode_all(
        self, texts: list[str], batch_size: int = 512, dtype: torch.dtype = torch.float16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], []
        for i in range(0, len(texts), batch_size):
            s, p = self(texts[i : i + batch_size])
            states.append(s.to("cpu", dtype))
            pooled.append(p.to("cpu", dtype))
        return torch.cat(states), torch.cat(pooled)

    def save(self, out: Path) -> None:
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)


def load_text_encoder(
    path_or_id: str | Path,
    context_length: int,
    subfolder: str | None = None,
    tokenizer_subfolder: str | None = None,
) -> FrozenTextEncoder:
    """A CLIP text model or a T5 encoder with its tokenizer, from a folder or hub id."""
    kw = {"subfolder": subfolder} if subfolder else {}
    try:
        config = AutoConfig.from_pretrained(str(path_or_id), **kw)
        tok_kw = {"subfolder": tokenizer_subfolder} if tokenizer_subfolder else kw
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), **tok_kw)
    except OSError as e:
        raise MissingTextEncoderError(
            f"could not load a text encoder from {path_or_id!r}: {e}. Give a local folder "
            "with config.json, model.safetensors and the tokenizer files, or a hub id on a "
            "machine that reaches the hub."
        ) from e
    if config.model_type in ("clip_text_model", "clip"):
        model = CLIPTextModelWithProjection.from_pretrained(str(path_or_id), **kw)
    elif config.model_type in ("t5", "umt5", "mt5"):
        model = T5EncoderModel.from_pretrained(str(path_or_id), **kw)
    else:
        raise ValueError(
            f"text encoder {path_or_id!r} is a {config.model_type!r}; expected a CLIP text "
            "model or a T5 encoder"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return FrozenTextEncoder(model, tokenizer, context_length)


class ImageTower(torch.nn.Module):
    """A small CNN, only a partner for contrastive pretraining of the text tower."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        c = width
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(4 * c, 4 * c, 3, stride=2, padding=1), torch.nn.GELU(),
        )  # fmt: skip
        self.proj = torch.nn.Linear(4 * c * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return self.proj(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")(e?s)?\b")


def swap_one_shape(text: str, rng: random.Random) -> str | None:
    """`text` with one of its shape words (chosen by `rng`) naming another shape, plural
    kept; None when it names no shape."""
    hits = list(_SHAPE_WORD.finditer(text))
    if not hits:
        return None
    hit = rng.choice(hits)
    other = rng.choice([s for s in SHAPES if s != hit.group(1)])
    return text[: hit.start()] + (plural(other) if hit.group(2) else other) + text[hit.end() :]


class _ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        text: CLIPTextModelWithProjection,
        cfg: TextPretrainConfig,
        eos_id: int,
        image: torch.nn.Module | None = None,
    ):
        super().__init__()
        self.text, self.cfg, self.eos_id = text, cfg, eos_id
        self.image = image or ImageTower(text.config.projection_dim, cfg.image_width)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.659))  # ln(1 / 0.07)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        img = F.normalize(self.image(batch["image"].float() / 127.5 - 1), dim=-1)
        n = len(img)
        ids = torch.cat([batch["ids"], batch["neg_ids"]]) if "neg_ids" in batch else batch["ids"]
        txt = F.normalize(clip_text_features(self.text, ids, self.eos_id)[1], dim=-1)
        scale = self.logit_scale.clamp(max=4.6).exp()
        logits = scale * img @ txt[:n].T
        labels = torch.arange(n, device=img.device)
        image_logits = logits
        metrics = {}
        if "neg_ids" in batch:
            # every image also scores every caption's shape-swapped copy; a caption
            # without a shape word has none, and its column is masked out
            has_neg = batch["has_neg"]
            negatives = (scale * img @ txt[n:].T).masked_fill(~has_neg[None], -1e4)
            image_logits = torch.cat([logits, negatives], 1)
            metrics["text_encoder/hard_negative_acc"] = (
                (logits.diagonal() > negatives.diagonal())[has_neg].float().mean()
            )
        loss = (F.cross_entropy(image_logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        acc = (logits.argmax(1) == labels).float().mean()
        self.log_dict(
            {"text_encoder/loss": loss, "text_encoder/acc": acc, **metrics}, prog_bar=True
        )
        return loss

    def configure_optimizers(self):
        return warmup_cosine_adamw(
            self, self.cfg.lr, 0.01, self.cfg.warmup_steps, self.cfg.max_steps
        )


class _PairDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        neg_ids: torch.Tensor | None = None,
        has_neg: torch.Tensor | None = None,
    ):
        self.images, self.ids, self.neg_ids, self.has_neg = images, ids, neg_ids, has_neg

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "ids": self.ids[i]}
        if self.neg_ids is not None:
            item.update(neg_ids=self.neg_ids[i], has_neg=self.has_neg[i])
        return item


def eos_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on `texts` that ends every text with <eos>."""
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tokenizer.eos_token_id)]
    )
    return tokenizer


def tiny_config(cfg: TextEncoderConfig) -> dict:
    """The fields of the tiny encoder's config file in models/configs."""
    return json.loads((CONFIG_DIR / f"{cfg.config}.json").read_text())


def pretrain_text_encoder(
    cfg: TextEncoderConfig,
    images: torch.Tensor,
    texts: list[str],
    out: Path,
    logger: L.pytorch.loggers.Logger | None = None,
    seed: int = 0,
    image_tower: Callable[[int], torch.nn.Module] | None = None,
) -> dict:
    """Tiny profile: train a BPE tokenizer and a CLIP text tower contrastively against a
    small image tower on (image, caption) pairs; save the text tower and tokenizer with
    `save_pretrained`, so it loads back through `load_text_encoder` like a hub model.

    `image_tower(dim)` builds another partner (images in [-1, 1] -> (B, dim)), e.g. a
    locked pretrained tower with a trainable head, as LiT pairs them."""
    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    tokenizer = eos_tokenizer([t for t in texts if t], cfg.vocab_size)
    config = CLIPTextConfig(
        **tiny_config(cfg),
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.context_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = CLIPTextModelWithProjection(config)
    tokenize = ClipTextTokenizer(cfg.context_length, tokenizer)
    pairs = [i for i, t in enumerate(texts) if t]  # an empty caption describes nothing
    ids = tokenize([texts[i] for i in pairs])
    neg_ids = has_neg = None
    if cfg.pretrain.hard_negatives:
        rng = random.Random(seed)
        negatives = [swap_one_shape(texts[i], rng) for i in pairs]
        neg_ids = tokenize([t or "" for t in negatives])
        has_neg = torch.tensor([t is not None for t in negatives])
    dataset = _PairDataset(images[pairs], ids, neg_ids, has_neg)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.pretrain.batch_size,
        shuffle=True,
        drop_last=True,
    )
    partner = image_tower(config.projection_dim) if image_tower else None
    module = _ContrastiveModule(model, cfg.pretrain, tokenizer.eos_token_id, partner)
    trainer = L.Trainer(
        max_steps=cfg.pretrain.max_steps,
        accelerator="auto",
        devices=1,
        logger=logger or False,
        enable_checkpointing=False,
        callbacks=[TQDMProgressBar(refresh_rate=20)],
        log_every_n_steps=10,
    )
    trainer.fit(module, loader)
    with torch.no_grad():
        model.text_projection.weight.mul_(cfg.pretrain.pooled_scale)
    encoder = FrozenTextEncoder(model.cpu(), tokenizer, cfg.context_length)
    encoder.save(out)
    metrics = {
        key: float(v) for key, v in trainer.callback_metrics.items() if key.startswith("text_")
    }
    metrics["seconds"] = time.perf_counter() - t0
    return metrics
