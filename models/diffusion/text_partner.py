"""The captioner's concept tower, locked, as the image-side partner of the diffusion text
tower's contrastive pretraining (LiT, Zhai et al. 2022: a locked image tower, a text
tower trained to match it).

A contrastive text tower learns only what its image partner can read. The default
partner, a small CNN trained from scratch beside it, reads colour and place but hardly
shape, so the pooled vector the UNet is given hardly carries the shape either
(docs/log/). The captioner's image tower and its per-cell heads, trained upstream in the
lineage on the human-captioned subset, read every cell's shape, colour, size and word
almost exactly; their class probabilities, and the pooled embedding for what no cell
head reads (the background), go through one trainable linear map to the text tower's
projection width. The concept tower has no background head, so "captioner+cnn" adds a
small CNN trained beside it (`SummedTowers`): the sum is the image feature, and the text
tower must carry both what the concept tower reads and what the CNN reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.captioning.concepts import CELL_CLASSES, CELL_HEADS_FILE, GRID
from models.common.clip import cell_tokens, clip_preprocess_cfg, create_clip, visual_features
from models.common.data import normalize_images
from models.diffusion.text_encoder import ImageTower


class MissingConceptTowerError(FileNotFoundError):
    pass


class LockedReader(torch.nn.Module):
    """A locked image reader (`_read`: images in [-1, 1] -> features), kept in eval mode
    whatever the trainer sets, and a trainable linear map to the text tower's width."""

    def __init__(self, locked: torch.nn.Module, dim: int):
        super().__init__()
        self.locked = locked.eval().requires_grad_(False)
        with torch.no_grad():
            width = self._read(torch.zeros(1, 3, 32, 32)).shape[1]
        self.proj = torch.nn.Linear(width, dim)

    def train(self, mode: bool = True) -> LockedReader:
        super().train(mode)
        self.locked.eval()
        return self

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            read = self._read(x)
        return self.proj(read)


class LockedConceptTower(LockedReader):
    """Images in [-1, 1] (B, 3, H, W) -> (B, dim): the captioner's concept tower and cell
    heads, locked, read through a trainable linear head."""

    def __init__(self, concepts_dir: Path, dim: int):
        concepts_dir = Path(concepts_dir)
        config, weights = concepts_dir / "config.json", concepts_dir / "model.safetensors"
        heads = concepts_dir / CELL_HEADS_FILE
        missing = [p.name for p in (config, weights, heads) if not p.exists()]
        if missing:
            raise MissingConceptTowerError(
                f"{concepts_dir} lacks {', '.join(missing)}: the partner is the captioner's "
                "`concepts` phase (tiny profile); materialize the `captioner` asset first"
            )
        model = create_clip(json.loads(config.read_text())["model_name"])
        model.load_state_dict(load_file(weights))
        if hasattr(model.visual, "output_tokens"):
            model.visual.output_tokens = True
        state = load_file(heads)
        cell_heads = torch.nn.ModuleDict()
        for name in CELL_CLASSES:
            w = state[f"{name}.weight"]
            head = torch.nn.Linear(w.shape[1], w.shape[0])
            head.load_state_dict({"weight": w, "bias": state[f"{name}.bias"]})
            cell_heads[name] = head
        self.size, self.mean, self.std = clip_preprocess_cfg(model)
        super().__init__(torch.nn.ModuleDict({"visual": model.visual, "heads": cell_heads}), dim)

    @property
    def visual(self) -> torch.nn.Module:
        return self.locked["visual"]

    @property
    def heads(self) -> torch.nn.ModuleDict:
        return self.locked["heads"]

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        images = ((x + 1) * 127.5).clamp(0, 255)
        pooled, grid = visual_features(
            self.visual, normalize_images(images, self.size, self.mean, self.std)
        )
        cells = cell_tokens(grid, GRID)
        probs = [head(cells).softmax(-1).flatten(1) for head in self.heads.values()]
        return torch.cat([*probs, torch.nn.functional.normalize(pooled, dim=-1)], 1)


class SummedTowers(torch.nn.Module):
    """Images -> the sum of several partners' (B, dim) features."""

    def __init__(self, *towers: torch.nn.Module):
        super().__init__()
        self.towers = torch.nn.ModuleList(towers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([tower(x) for tower in self.towers]).sum(0)


def captioner_partner(partner: str, concepts: Path, image_width: int):
    """`image_tower(dim)` for `pretrain_text_encoder` of a "captioner" or "captioner+cnn"
    partner."""
    if partner == "captioner":
        return lambda dim: LockedConceptTower(concepts, dim)
    return lambda dim: SummedTowers(LockedConceptTower(concepts, dim), ImageTower(dim, image_width))
