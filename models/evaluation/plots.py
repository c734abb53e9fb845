"""The eval report's plots (matplotlib, headless): accuracy per category and prompt form,
CLIP score per form, and the training curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from models.evaluation.colour_following import CHANCE

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def write_plots(metrics: dict, records: list[dict], out: Path) -> list[Path]:
    forms = list(metrics["forms"])
    cats = [c for c in metrics["forms"][forms[0]]["prompt_following"]]
    written = []

    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(forms)
    x = np.arange(len(cats))
    for i, form in enumerate(forms):
        acc = metrics["forms"][form]["prompt_following"]
        ax.bar(x + i * width, [acc[c] for c in cats], width, label=f"{form} prompts")
    ax.set_xticks(x + width * (len(forms) - 1) / 2, [c.replace("_", "\n") for c in cats])
    ax.set_ylim(0, 1)
    ax.set_ylabel("images passing every condition")
    ax.set_title("Prompt following by category (world judge)")
    ax.legend()
    fig.tight_layout()
    written.append(out / "prompt_following.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.4))
    data = [[r["clip_score"] for r in records if r["form"] == f] for f in forms]
    ax.boxplot(data, tick_labels=forms)  # longer labels overlap at this width
    ax.set_xlabel("scored against the prompts of form")
    ax.set_ylabel("CLIP score (100 x cosine)")
    ax.set_title("CLIP score (reference CLIP)")
    fig.tight_layout()
    written.append(out / "clip_score.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    curve = metrics.get("training_curve") or []
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        steps = [c["step"] for c in curve]
        ax.plot(steps, [c["colour_following"] for c in curve], marker="o", label="colour following")
        ax.axhline(CHANCE, color="gray", linestyle="--", label=f"chance ({CHANCE:.3f})")
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
        ax.set_title("During training: single-object colour following")
        ax.legend()
        fig.tight_layout()
        written.append(out / "training_curve.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
