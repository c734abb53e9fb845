"""The rich-feedback metrics of RAHF (Liang et al. 2024), against exact truth.

Scores: PLCC (Pearson) and SRCC (Spearman) between predicted and true scores.
Heatmaps, the saliency benchmark's four (Bylinskii et al., "What do different evaluation
metrics tell us about saliency models?"), per image, on images whose true map is not
empty (an empty truth has no fixation to find; RAHF reports these metrics likewise):
- CC: Pearson correlation of the two maps;
- KLD: KL divergence of the true map from the predicted one, both normalised to sum 1
  (lower is better);
- NSS: the predicted map standardised, averaged over the truth's fixations;
- AUC-Judd: the ROC area of the predicted map at telling fixations from the other pixels,
  with the thresholds at the predicted values of the fixations.
A fixation is a pixel whose true value is at least `FIXATION` (the truth here is a map in
[0, 1], not annotators' points).
Keywords: precision, recall and F1 of the predicted misaligned words, pooled over images.
"""

from __future__ import annotations

import numpy as np

from models.feedback.metrics import ranks

EPS = 2.2204e-16  # the saliency benchmark's eps
FIXATION = 0.5


def plcc(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(pred, float), np.asarray(truth, float))[0, 1])


def srcc(pred: np.ndarray, truth: np.ndarray) -> float:
    return plcc(ranks(np.asarray(pred, float)), ranks(np.asarray(truth, float)))


def cc(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, float).ravel(), np.asarray(truth, float).ravel()
    if p.std() == 0 or t.std() == 0:
        return 0.0
    return float(np.corrcoef(p, t)[0, 1])


def kld(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, float).ravel(), np.asarray(truth, float).ravel()
    p, t = p / (p.sum() + EPS), t / (t.sum() + EPS)
    return float(np.sum(t * np.log(EPS + t / (p + EPS))))


def nss(pred: np.ndarray, truth: np.ndarray) -> float:
    p = np.asarray(pred, float).ravel()
    fix = np.asarray(truth, float).ravel() >= FIXATION
    if not fix.any():
        raise ValueError("NSS needs at least one fixation in the true map")
    z = (p - p.mean()) / (p.std() + EPS)
    return float(z[fix].mean())


def auc_judd(pred: np.ndarray, truth: np.ndarray) -> float:
    p = np.asarray(pred, float).ravel()
    fix = np.asarray(truth, float).ravel() >= FIXATION
    n_fix, n_pix = int(fix.sum()), len(p)
    if n_fix == 0 or n_fix == n_pix:
        raise ValueError("AUC-Judd needs fixations and non-fixations in the true map")
    # One ROC point per distinct predicted value at a fixation (ties move together).
    thresholds = np.unique(p[fix])[::-1]
    tp = np.array([(p[fix] >= th).sum() for th in thresholds]) / n_fix
    fp = np.array([(p[~fix] >= th).sum() for th in thresholds]) / (n_pix - n_fix)
    tp, fp = np.concatenate([[0.0], tp, [1.0]]), np.concatenate([[0.0], fp, [1.0]])
    return float(np.sum((fp[1:] - fp[:-1]) * (tp[1:] + tp[:-1]) / 2))


def heatmap_metrics(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """Mean CC, KLD, NSS and AUC-Judd over the images whose true map has a fixation."""
    rows = [
        (cc(p, t), kld(p, t), nss(p, t), auc_judd(p, t))
        for p, t in zip(preds, truths, strict=True)
        if (np.asarray(t) >= FIXATION).any() and not (np.asarray(t) >= FIXATION).all()
    ]
    if not rows:
        return {"images": 0}
    m = np.array(rows).mean(0)
    return {"images": len(rows), "cc": m[0], "kld": m[1], "nss": m[2], "auc_judd": m[3]}


def keyword_metrics(predicted: list[set[str]], true: list[set[str]]) -> dict:
    """Precision, recall and F1 of misaligned keywords, pooled over images."""
    hit = sum(len(p & t) for p, t in zip(predicted, true, strict=True))
    n_pred, n_true = sum(map(len, predicted)), sum(map(len, true))
    precision = hit / n_pred if n_pred else float("nan")
    recall = hit / n_true if n_true else float("nan")
    if not (n_pred and n_true):
        f1 = float("nan")  # undefined, not a failure: nothing to find or nothing claimed
    else:
        f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
