"""The caption ablation's comparison (the report's Figures 4 and 5) from its finished
runs: each variant's prompt following with a 95% interval over prompts and seeds, the
differences between variants with theirs, a Markdown write-up table and curves over
training steps.

A run is one variant trained with one seed; its record holds every suite prompt's score
(the share of its images that pass every condition) per prompt form. Two sources of
noise separate two variants: which prompts the suite happens to hold, and which seed a
run happens to get (run-to-run spread is as large as the differences sought). The
bootstrap resamples both: prompts within their category (the same prompts for both
variants of a difference: a paired comparison) and, independently per variant, seeds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from corpus.atomic import write_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Differences reported when both variants ran: the report's Figure 4 (caption kind)
# and Figure 5 (synthetic share).
COMPARISONS = [
    ("descriptive_95", "alt_text"),
    ("short_95", "alt_text"),
    ("descriptive_95", "short_95"),
    ("descriptive_95", "descriptive_65"),
    ("descriptive_95", "descriptive_80"),
    ("descriptive_95", "descriptive_90"),
    ("descriptive_90", "descriptive_65"),
]


def _weights(categories: list[str]) -> np.ndarray:
    """Per-prompt weights that make a weighted sum the mean over categories of each
    category's mean (GenEval's overall)."""
    cats = np.array(categories)
    counts = {c: int((cats == c).sum()) for c in set(categories)}
    return np.array([1.0 / (len(counts) * counts[c]) for c in categories])


def _resample_prompts(rng: np.random.Generator, categories: list[str]) -> np.ndarray:
    cats = np.array(categories)
    return np.concatenate(
        [rng.choice(np.flatnonzero(cats == c), (cats == c).sum()) for c in sorted(set(categories))]
    )


def score(runs: np.ndarray, categories: list[str]) -> float:
    """The overall score of a variant: (seeds, prompts) scores averaged over seeds, then
    over prompts within each category, then over categories."""
    return float(runs.mean(0) @ _weights(categories))


def bootstrap_interval(
    runs: np.ndarray,
    categories: list[str],
    other: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high) with a 95% percentile interval: of `runs`' score, or of
    `runs` minus `other` (both (seeds, prompts) over the same prompts, any seed counts).
    Each replicate draws the prompts again within their categories (shared by both
    sides) and each side's seeds again, with replacement."""
    runs = np.asarray(runs, dtype=float)
    if other is not None:
        other = np.asarray(other, dtype=float)
        if other.shape[1] != runs.shape[1]:
            raise ValueError(
                f"a difference needs the same prompts: {runs.shape[1]} vs {other.shape[1]}"
            )
    if runs.shape[1] != len(categories):
        raise ValueError(f"{runs.shape[1]} prompt scores but {len(categories)} categories")
    w = _weights(categories)
    rng = np.random.default_rng(seed)

    def value(a: np.ndarray, b: np.ndarray | None, idx: np.ndarray | None = None) -> float:
        cols = slice(None) if idx is None else idx
        v = a[:, cols].mean(0) @ w[cols]
        return float(v - (b[:, cols].mean(0) @ w[cols] if b is not None else 0.0))

    reps = np.empty(n_boot)
    for i in range(n_boot):
        idx = _resample_prompts(rng, categories)
        a = runs[rng.integers(0, len(runs), len(runs))]
        b = other[rng.integers(0, len(other), len(other))] if other is not None else None
        reps[i] = value(a, b, idx)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return value(runs, other), float(lo), float(hi)


def compare(
    runs: dict[str, dict[str, np.ndarray]],
    categories: list[str],
    n_boot: int = 2000,
) -> dict:
    """`runs[variant][form]`: (seeds, prompts) scores. Returns per variant and form the
    score, its interval and the per-seed scores, and each of COMPARISONS present (then
    any pair against the first variant) per form, `resolved` when its interval excludes 0."""
    variants = {
        name: {
            form: dict(
                zip(
                    ("mean", "low", "high"),
                    bootstrap_interval(s, categories, n_boot=n_boot),
                    strict=True,
                ),
                per_seed=[score(s[i : i + 1], categories) for i in range(len(s))],
            )
            for form, s in forms.items()
        }
        for name, forms in runs.items()
    }
    pairs = [(a, b) for a, b in COMPARISONS if a in runs and b in runs]
    if not pairs and len(runs) > 1:
        first, *rest = runs
        pairs = [(r, first) for r in rest]
    differences = []
    for a, b in pairs:
        for form in runs[a]:
            d, lo, hi = bootstrap_interval(runs[a][form], categories, runs[b][form], n_boot)
            differences.append(
                {
                    "a": a,
                    "b": b,
                    "form": form,
                    "difference": d,
                    "low": lo,
                    "high": hi,
                    "resolved": bool(lo > 0 or hi < 0),
                }
            )
    return {"variants": variants, "differences": differences}


def _ci(m: dict) -> str:
    return f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def ablation_tables(results: list[dict], stats: dict) -> str:
    """Markdown: per variant, prompt following per form with its interval and seeds;
    attribute accuracy and CLIP score per form; then the differences."""
    forms = list(next(iter(stats["variants"].values())))
    head = " | ".join(f"all conditions, {f} [95% CI]" for f in forms)
    lines = [
        f"| variant | synthetic ratio (realized) | seeds | {head} | per seed |",
        "|---|---|---:|" + "---|" * len(forms) + "---|",
    ]
    for name, v in stats["variants"].items():
        r = next(r for r in results if r["name"] == name)
        seeds = " / ".join(", ".join(f"{x:.3f}" for x in v[f]["per_seed"]) for f in forms)
        lines.append(
            f"| {name} | {r['synthetic_ratio']:.2f} {r['caption_kind']} "
            f"({r['realized_ratio']:.3f}) | {len(r['seeds'])} | "
            + " | ".join(_ci(v[f]) for f in forms)
            + f" | {seeds} |"
        )
    kinds = sorted({k for r in results for f in forms for k in r["attributes"][f]})
    lines += [
        "",
        "| variant | form | " + " | ".join(kinds) + " | CLIP score |",
        "|---|---|" + "---:|" * (len(kinds) + 1),
    ]
    for r in results:
        for f in forms:
            acc = r["attributes"][f]
            cells = " | ".join(f"{acc[k]:.3f}" if k in acc else "" for k in kinds)
            lines.append(f"| {r['name']} | {f} | {cells} | {r['clip_score'][f]:.2f} |")
    if stats["differences"]:
        lines += [
            "",
            "| difference | prompts | estimate [95% CI] | resolved |",
            "|---|---|---|---|",
        ]
        for d in stats["differences"]:
            lines.append(
                f"| {d['a']} - {d['b']} | {d['form']} | {d['difference']:+.3f} "
                f"[{d['low']:+.3f}, {d['high']:+.3f}] | {'yes' if d['resolved'] else 'no'} |"
            )
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path) -> Path:
    """Per variant (mean over its seeds), over training steps: all-conditions prompt
    following per form when measured, and CLIP score against the colour prompts."""
    keys = [
        k
        for k in ("all_conditions/short", "all_conditions/descriptive", "clip_score")
        if any(k in c for r in results for c in r["curve"])
    ] or ["colour_following"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for r in results:
            points: dict[int, list[float]] = {}
            for c in r["curve"]:
                if key in c:
                    points.setdefault(c["step"], []).append(c[key])
            steps = sorted(points)
            ax.plot(steps, [np.mean(points[s]) for s in steps], marker="o", label=r["name"])
        ax.set(xlabel="training step", ylabel=key.replace("/", ", "))
        if key != "clip_score":
            ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
