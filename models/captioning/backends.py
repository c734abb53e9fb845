"""Captioning backends behind one interface, so recaptioning does not care which model
writes the captions:

- `PrefixCaptionerBackend`: recapflow's own captioner (its SSC and DSC checkpoints);
- `HFImageToTextBackend`: any transformers image-to-text model (BLIP, BLIP-2, Florence-2,
  GIT, ...) by hub id or local path, with a prompt per caption kind.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from corpus.params import json_digest
from models.captioning.captioner import GenerationConfig, PrefixCaptioner

CAPTION_KINDS = ("short", "descriptive")


class CaptionBackend(Protocol):
    id: str
    version: str

    def caption(self, images: torch.Tensor, kind: str) -> list[str]:
        """Captions of one kind for a batch of uint8 (B,3,H,W) images."""

    def generation_config(self) -> dict: ...


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


class PrefixCaptionerBackend:
    """The SSC and DSC checkpoints written by `models.captioning.train`."""

    def __init__(
        self,
        captioner_dir: str | Path,
        generation: GenerationConfig,
        short_max_new_tokens: int = 24,
        device: str | None = None,
    ):
        root = Path(captioner_dir)
        for phase in ("ssc", "dsc"):
            if not (root / phase / "model.safetensors").exists():
                raise FileNotFoundError(
                    f"captioner checkpoint {root / phase} is missing: materialize the "
                    "`captioner` asset (or run `python -m models.captioning.train`) first"
                )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.models = {
            "short": PrefixCaptioner.load(root / "ssc").to(device),
            "descriptive": PrefixCaptioner.load(root / "dsc").to(device),
        }
        self.gens = {
            "short": replace(generation, max_new_tokens=short_max_new_tokens),
            "descriptive": generation,
        }
        self.id = f"recapflow-prefix-captioner:{root.resolve()}"
        # The captions depend on the weights and on how they are decoded: a new decoding
        # (greedy -> beam) makes every shard stale, as new weights do.
        self.version = "-".join(
            [_file_digest(root / p / "model.safetensors") for p in ("ssc", "dsc")]
            + [json_digest(self.generation_config())]
        )
        self.image_size = self.models["short"].image_size

    def caption(self, images: torch.Tensor, kind: str) -> list[str]:
        return self.models[kind].generate(images, self.gens[kind])

    def generation_config(self) -> dict:
        return {k: asdict(v) for k, v in self.gens.items()}


class HFImageToTextBackend:
    """A transformers image-to-text model from a hub id or a local folder."""

    def __init__(
        self,
        model: str,
        prompts: dict[str, str | None] | None = None,
        max_new_tokens: dict[str, int] | None = None,
        num_beams: int = 1,
        device: str | None = None,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model)
        except OSError as e:
            raise FileNotFoundError(
                f"image-to-text model {model!r} could not be loaded ({e}). No model hub is "
                "reachable from this machine: download it elsewhere (e.g. `hf download "
                f"{model} --local-dir models/pretrained/<name>`), copy the folder here and "
                "set captioner backend `model:` to that local path."
            ) from e
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.prompts = prompts or {"short": None, "descriptive": None}
        self.max_new_tokens = max_new_tokens or {"short": 20, "descriptive": 77}
        self.num_beams = num_beams
        self.id = f"hf:{model}"
        self.version = "-".join(
            [json_digest(self.model.config.to_dict()), json_digest(self.generation_config())]
        )
        self.image_size = None

    def caption(self, images: torch.Tensor, kind: str) -> list[str]:
        pil = [np.ascontiguousarray(im.permute(1, 2, 0).numpy()) for im in images]
        prompt = self.prompts.get(kind)
        kwargs = {"images": pil, "return_tensors": "pt"}
        if prompt:
            kwargs["text"] = [prompt] * len(pil)
        inputs = self.processor(**kwargs).to(self.device)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens[kind], num_beams=self.num_beams
            )
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        # Models that echo the prompt (BLIP with a text prefix) return it first.
        return [
            t[len(prompt) :].strip() if prompt and t.startswith(prompt) else t.strip()
            for t in texts
        ]

    def generation_config(self) -> dict:
        return {
            "prompts": self.prompts,
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
        }
