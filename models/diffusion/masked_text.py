"""A tiny T5 encoder pretrained on text alone, by masked-token prediction: the `tiny`
stand-in for the frozen public T5 of the DALL-E 3 report and Imagen.

Its corpus is the world's own language drawn from a seed of its own (descriptive
captions in every phrasing, short captions, alt-text of every noise kind), never the
training images' captions: every caption blend then trains against the same encoder,
as every variant of the report's ablation did. Predicting a masked "red" or "top left"
from the rest of its phrase makes each token's state carry its whole phrase both ways,
which is what cross-attention reads (`models/diffusion/text_probes.py` measures it).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from transformers import T5Config, T5EncoderModel

from corpus.scene_text import (
    NoiseRates,
    alt_text,
    descriptive_caption,
    draw_noise_kind,
    short_caption,
)
from corpus.world import WorldConfig, sample_scene
from models.common.clip import ClipTextTokenizer, warmup_cosine_adamw
from models.diffusion.text_encoder import (
    FrozenTextEncoder,
    TextEncoderConfig,
    eos_tokenizer,
    tiny_config,
)

TEXT_SEED = 5_000_011  # the encoder's corpus: apart from the training data and evaluators


def world_texts(n: int, seed: int = TEXT_SEED) -> list[str]:
    """`n` texts: scene after scene, its descriptive caption, its short caption and one
    alt-text (when that noise kind writes any)."""
    rng = random.Random(seed)
    cfg = WorldConfig()
    noise = NoiseRates()
    texts: list[str] = []
    while len(texts) < n:
        scene = sample_scene(rng, cfg)
        texts += [descriptive_caption(scene, rng), short_caption(scene)]
        alt = alt_text(scene, draw_noise_kind(rng, noise), rng)
        if alt:
            texts.append(alt)
    return texts[:n]


class _MaskedLM(L.LightningModule):
    def __init__(self, encoder: T5EncoderModel, cfg: TextEncoderConfig, mask_id: int, pad_id: int):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        self.mask_id, self.pad_id = mask_id, pad_id
        self.head = torch.nn.Linear(encoder.config.d_model, encoder.config.vocab_size)

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        real = ids != self.pad_id
        masked = (torch.rand(ids.shape, device=ids.device) < self.cfg.pretrain.mask_ratio) & real
        inputs = ids.masked_fill(masked, self.mask_id)
        states = self.encoder(input_ids=inputs, attention_mask=real.long()).last_hidden_state
        logits = self.head(states[masked])
        loss = F.cross_entropy(logits, ids[masked])
        acc = (logits.argmax(-1) == ids[masked]).float().mean()
        self.log_dict({"text_encoder/loss": loss, "text_encoder/masked_acc": acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        p = self.cfg.pretrain
        return warmup_cosine_adamw(self, p.lr, 0.01, p.warmup_steps, p.max_steps)


def pretrain_masked_text_encoder(
    cfg: TextEncoderConfig,
    out: Path,
    logger: L.pytorch.loggers.Logger | None = None,
    seed: int = 0,
) -> dict:
    """Train a BPE tokenizer and a T5 encoder (config `cfg.config` in models/configs) on
    `world_texts`; save both with `save_pretrained`, so they load back through
    `load_text_encoder` like a hub T5."""
    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    texts = world_texts(cfg.pretrain.texts)
    tokenizer = eos_tokenizer(texts, cfg.vocab_size)
    config = T5Config(
        **tiny_config(cfg),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    encoder = T5EncoderModel(config)
    ids = ClipTextTokenizer(cfg.context_length, tokenizer)(texts)
    loader = torch.utils.data.DataLoader(
        ids, batch_size=cfg.pretrain.batch_size, shuffle=True, drop_last=True
    )
    # Byte-level BPE never emits <unk>: it serves as the mask token.
    module = _MaskedLM(encoder, cfg, tokenizer.unk_token_id, tokenizer.pad_token_id)
    trainer = L.Trainer(
        max_steps=cfg.pretrain.max_steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        logger=logger or False,
        enable_checkpointing=False,
        callbacks=[TQDMProgressBar(refresh_rate=50)],
        log_every_n_steps=25,
    )
    trainer.fit(module, loader)
    FrozenTextEncoder(encoder.cpu(), tokenizer, cfg.context_length).save(out)
    metrics = {
        k.replace("/", "_"): float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith("text_encoder/")
    }
    metrics.update(texts=len(texts), seconds=time.perf_counter() - t0)
    return metrics
