"""CLIP image-text models through open_clip, for both profiles.

`tiny`: an open_clip config kept in models/configs, random init, pretrained here
contrastively on (image, alt-text) pairs the way web CLIP is. `full`: any open_clip model
name with weights from a local file or a pretrained tag. Either way the model is built by
`open_clip.create_model`, so the tiny path exercises the real loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import open_clip
import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from corpus.atomic import write_atomic, write_text_atomic
from models import CONFIG_DIR
from models.common.data import normalize_images

open_clip.add_model_config(CONFIG_DIR)


class MissingWeightsError(FileNotFoundError):
    pass


def create_clip(model_name: str, pretrained: str | None = None) -> torch.nn.Module:
    """An open_clip model; `pretrained` is a local weights file or an open_clip tag."""
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; configs in {CONFIG_DIR}")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained or None)
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained and not Path(pretrained).exists():
            raise MissingWeightsError(
                f"open_clip weights {pretrained!r} for {model_name!r} could not be loaded ({e}). "
                "No model hub is reachable from this machine: download the checkpoint "
                "elsewhere (e.g. open_clip_pytorch_model.bin or .safetensors) and set the "
                "pretrained path in params.yaml to that local file."
            ) from e
        raise


def clip_preprocess_cfg(model: torch.nn.Module) -> tuple[int, tuple, tuple]:
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return size, tuple(cfg["mean"]), tuple(cfg["std"])


def visual_features(visual: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images -> (pooled embedding (B, D), last feature map (B, C, h, w)).

    ViTs give their patch tokens after the final norm (set `visual.output_tokens = True`
    once); convolutional towers (open_clip's ModifiedResNet, timm) their last feature map."""
    if getattr(visual, "output_tokens", False):
        pooled, tokens = visual(x)
        b, n, c = tokens.shape
        side = round(n**0.5)
        return pooled, tokens.transpose(1, 2).reshape(b, c, side, side)
    out = visual.forward_intermediates(x, indices=1)
    return out["image_features"], out["image_intermediates"][-1]


def cell_tokens(grid: torch.Tensor, side: int) -> torch.Tensor:
    """A feature map (B, C, h, w) average-pooled to side x side cells -> (B, side**2, C),
    row-major: cell k is (row, col) = divmod(k, side)."""
    return torch.nn.functional.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)


class ClipTextTokenizer:
    """Token ids for the tiny CLIP's text tower: our own tokenizer, padded to the context
    length, with EOS last (the tower pools at EOS)."""

    def __init__(self, context_length: int, hf_tokenizer: PreTrainedTokenizerBase):
        self.context_length = context_length
        self.hf = hf_tokenizer

    def __call__(self, texts: list[str]) -> torch.Tensor:
        n = self.context_length
        out = torch.full((len(texts), n), self.hf.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(self.hf(texts, add_special_tokens=False)["input_ids"]):
            ids = [*ids[: n - 1], self.hf.eos_token_id]  # cut at the context, as CLIP does
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class ClipPretrainModule(L.LightningModule):
    """Contrastive pretraining (InfoNCE both ways, learned temperature)."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int = 1000,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_clip(model_name, pretrained)
        self.image_size, self.mean, self.std = clip_preprocess_cfg(self.model)
        self.loss_fn = open_clip.ClipLoss()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = normalize_images(batch["images"], self.image_size, self.mean, self.std)
        img_f = self.model.encode_image(images, normalize=True)
        txt_f = self.model.encode_text(batch["text"], normalize=True)
        loss = self.loss_fn(img_f, txt_f, self.model.logit_scale.exp())
        with torch.no_grad():
            acc = (img_f @ txt_f.T).argmax(1).eq(torch.arange(len(img_f), device=self.device))
        self.log_dict({"clip/loss": loss, "clip/batch_acc": acc.float().mean()}, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():  # CLIP's clamp: temperature at most 100
            self.model.logit_scale.clamp_(0, 4.6052)

    def configure_optimizers(self):
        return warmup_cosine_adamw(
            self,
            self.hparams.lr,
            self.hparams.weight_decay,
            self.hparams.warmup_steps,
            self.hparams.max_steps,
        )


def warmup_cosine_adamw(
    module: torch.nn.Module,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    max_steps: int,
    lr_scales: dict[str, float] | None = None,
) -> dict:
    """AdamW (no decay on biases, norms, embeddings' scales) with linear warmup and cosine decay.

    `lr_scales` maps a parameter-name prefix to a multiplier of `lr` (e.g. a slower image
    tower while fine-tuning); the first matching prefix wins."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in (lr_scales or {}).items() if name.startswith(k)), 1.0)
            no_decay = p.ndim < 2 or "logit_scale" in name
            groups.setdefault((scale, no_decay), []).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": ps, "lr": lr * scale, "weight_decay": 0.0 if nd else weight_decay}
            for (scale, nd), ps in groups.items()
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(t * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def save_clip(model: torch.nn.Module, model_name: str, out_dir: Path) -> None:
    """Weights in safetensors (never a pickle) and the open_clip name to rebuild it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(out_dir / "model.safetensors", lambda tmp: save_file(state, tmp))
    write_text_atomic(out_dir / "config.json", json.dumps({"model_name": model_name}))
