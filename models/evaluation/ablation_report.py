"""The caption ablation's comparison: a Markdown table and curves over training steps
(the report's Figures 4 and 5), from the per-variant results of `caption_ablation`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from corpus.atomic import write_atomic
from models.evaluation.colour_following import CHANCE

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def ablation_table(results: list[dict]) -> str:
    """One row per variant: blend, realized ratio, final prompt following per form (95%
    CI over prompts), the colour category, CLIP score per form, and wall time."""
    lines = [
        "| variant | synthetic ratio (realized) | prompt following, short prompts [95% CI] "
        "| prompt following, descriptive prompts [95% CI] | colour category (short / desc.) "
        "| CLIP score (short / desc.) | colour following at the end (chance 0.125) "
        "| steps | wall time (s) |",
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        s, d = r["forms"]["short"], r["forms"]["descriptive"]
        lines.append(
            f"| {r['name']} | {r['synthetic_ratio']:.2f} {r['caption_kind']} "
            f"({r['realized_ratio']:.3f}) "
            f"| {s['overall']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] "
            f"| {d['overall']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] "
            f"| {s['colour']:.3f} / {d['colour']:.3f} "
            f"| {s['clip_score']:.1f} / {d['clip_score']:.1f} "
            f"| {r['colour_following']:.3f} | {r['steps']} | {r['seconds']['total']:.0f} |"
        )
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path) -> Path:
    """Colour following and (when measured) CLIP score over training steps per variant."""
    has_clip = any("clip_score" in c for r in results for c in r["curve"])
    fig, axes = plt.subplots(1, 2 if has_clip else 1, figsize=(11 if has_clip else 6, 3.8))
    axes = axes if has_clip else [axes]
    for r in results:
        steps = [c["step"] for c in r["curve"]]
        axes[0].plot(
            steps, [c["colour_following"] for c in r["curve"]], marker="o", label=r["name"]
        )
        if has_clip:
            axes[1].plot(
                steps, [c.get("clip_score") for c in r["curve"]], marker="o", label=r["name"]
            )
    axes[0].axhline(CHANCE, color="gray", linestyle="--", linewidth=1)
    axes[0].set(
        xlabel="training step", ylabel=f"colour following (chance {CHANCE:.3f})", ylim=(0, 1)
    )
    if has_clip:
        axes[1].set(
            xlabel="training step",
            ylabel="CLIP score vs the colour prompts\n(in the variant's caption style)",
        )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
