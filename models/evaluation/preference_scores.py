"""Optional human-preference scorers for the `full` profile, from local checkpoints.

HPS v2 (Wu et al. 2023) is open_clip ViT-H-14 fine-tuned on human preference pairs; its
score is the cosine of the image and prompt embeddings (about 0.2-0.3 for real images),
comparable only across images of the same prompt. recapflow loads it through open_clip
from a local file (`HPS_v2_compressed.pt` or a safetensors export; torch files are read
with `weights_only=True`). No hub is reachable from the machines that test this
project, so an absent checkpoint is skipped with a note saying how to provide one.
ImageReward and PickScore are not wired in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HPS_NOTE = (
    "HPS v2 skipped: no checkpoint configured. Download HPS_v2_compressed.pt (or HPS v2.1) "
    "on a machine with internet, copy it here, and set eval_report.hpsv2 in params.yaml to "
    "its local path (eval_report.hpsv2_model: ViT-H-14)."
)


def hps_v2_scores(
    checkpoint: str | None, model_name: str, images_uint8: torch.Tensor, texts: list[str]
) -> dict:
    """{"mean", "per_image"} of HPS v2, or {"skipped": why} without a checkpoint."""
    if not checkpoint:
        return {"skipped": HPS_NOTE}
    if not Path(checkpoint).is_file():
        return {"skipped": f"HPS v2 checkpoint {checkpoint} does not exist. " + HPS_NOTE}
    from models.common.clip import create_clip
    from models.evaluation.reference_clip import ReferenceClip

    scorer = ReferenceClip(create_clip(model_name, checkpoint), model_name)
    cos = scorer.score(images_uint8, texts) / 100.0
    return {"mean": float(np.mean(cos)), "per_image": [float(x) for x in cos]}
