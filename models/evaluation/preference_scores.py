"""HPS v2 in the eval report (`full` profile), from a local checkpoint.

HPS v2 (Wu et al. 2023) is open_clip ViT-H-14 fine-tuned on human preference pairs; its
score is the cosine of the image and prompt embeddings (about 0.2-0.3 for real images),
comparable only across images of the same prompt and only within one version (v2.0 and
v2.1 are different fine-tunes). The loading, HPS v2's own preprocessing and the version
come from `models/feedback/real_scorers.py`; the version is read from the checkpoint's
file name (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) and recorded with the
scores. No hub is reachable from the machines that test this project, so an absent
checkpoint is skipped with a note saying how to provide one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HPS_NOTE = (
    "HPS v2 skipped: no checkpoint configured. Download HPS_v2_compressed.pt (or "
    "HPS_v2.1_compressed.pt) on a machine with internet, copy it here, and set "
    "eval_report.hpsv2 in params.yaml to its local path (eval_report.hpsv2_model: ViT-H-14)."
)


def hps_v2_scores(
    checkpoint: str | None, model_name: str, images_uint8: torch.Tensor, texts: list[str]
) -> dict:
    """{"mean", "per_image", "version"} of HPS v2, or {"skipped": why}."""
    from models.feedback.real_scorers import hps_version_in_name, load_hps

    if not checkpoint:
        return {"skipped": HPS_NOTE}
    path = Path(checkpoint)
    if not path.is_file():
        return {"skipped": f"HPS v2 checkpoint {checkpoint} does not exist. " + HPS_NOTE}
    version = hps_version_in_name(path.name)
    if version is None:
        return {
            "skipped": f"HPS v2 checkpoint {path.name}: its file name does not say whether it "
            "is v2.0 or v2.1, whose scores are not comparable; keep the released name "
            "(HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)."
        }
    kind = "hpsv2.1" if version == "hpsv2.1" else "hpsv2"
    scores = load_hps(kind, path, model_name=model_name).score(images_uint8, texts)
    return {
        "mean": float(np.mean(scores)),
        "per_image": [float(x) for x in scores],
        "version": version,
    }
