"""A concept detector trained from captions: the image tower learns which words a caption
uses, through a linear multi-label head over the vocabulary on its pooled embedding.

Why (measured in docs/captioning.md): the tiny tower learns object shapes within a
minute when a linear head is told them, even from the ~1,000 human-captioned images, but
not through any objective that also has to learn its text side from scratch (contrastive
CLIP, captioning, also on clean captions). Word detectors trained from captions are an
old captioning recipe (Fang et al. 2015, "From captions to visual concepts and back";
Wu et al. 2016). The words come from the human-written short captions, so no label the
corpus does not have is used; the head is dropped after training and the tower is kept.
"""

from __future__ import annotations

import lightning as L
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from models.clip import clip_preprocess_cfg, create_clip, warmup_cosine_adamw
from models.data import normalize_images


def word_targets(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """(N, vocab) multi-hot of the tokens each text contains, special tokens excluded."""
    out = torch.zeros(len(texts), len(tokenizer))
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        out[i, ids] = 1.0
    out[:, tokenizer.all_special_ids] = 0.0
    return out


class ConceptModule(L.LightningModule):
    """Trains the image tower of an open_clip model (text tower frozen) with a word head."""

    def __init__(
        self,
        model_name: str,
        clip_weights: str,
        vocab_size: int,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
        max_steps: int = 800,
    ):
        super().__init__()
        # Not save_hyperparameters(): the `clip` phase already logged lr/max_steps to the
        # same MLflow run, and MLflow refuses a param's second value (the run config has them).
        self.opt = (lr, weight_decay, warmup_steps, max_steps)
        self.model = create_clip(model_name)
        self.model.load_state_dict(load_file(clip_weights))
        self.model.requires_grad_(False)
        self.model.visual.requires_grad_(True)
        self.image_size, self.mean, self.std = clip_preprocess_cfg(self.model)
        dim = self.model.visual.output_dim
        self.head = torch.nn.Linear(dim, vocab_size)
        # A caption uses a handful of the vocabulary's words: start every word unlikely.
        torch.nn.init.constant_(self.head.bias, -4.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = normalize_images(batch["images"], self.image_size, self.mean, self.std)
        logits = self.head(self.model.encode_image(x))
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(
                logits, batch["targets"], reduction="none"
            )
            .sum(1)
            .mean()
        )
        with torch.no_grad():  # share of caption words ranked in the image's top-k words
            k = int(batch["targets"].sum(1).max().item())
            top = logits.topk(max(k, 1), dim=1).indices
            hit = batch["targets"].gather(1, top).sum() / batch["targets"].sum().clamp(min=1)
        self.log_dict({"concepts/loss": loss, "concepts/recall_at_k": hit}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return warmup_cosine_adamw(self, *self.opt)
