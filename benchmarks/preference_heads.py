"""Where a preference model loses agreement: its score's two terms apart, by pair set.

The scorer's score is alignment (the prompt read against the decoded scene) plus
plausibility (per cell, prompt-blind). On the pool's test pairs (generators not held
out) this prints the exact agreement of the whole score, of each term alone, and the
ceiling, on the pairs alignment decides and on those only plausibility decides, the
latter split by whether the judge decodes the two images as one scene; then by the suite
category, by how often each term prefers the image with more objects, and by the form
(short or descriptive) of the prompt. Where the two scenes
differ but hold the prompt equally, alignment should say nothing: its agreement alone
should sit at 0.5, and the whole score should do as well as plausibility alone.

    python -m benchmarks.preference_heads --model data/preference_model \
        [--pool data/feedback_pool] [--split test]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from models.feedback import metrics as M
from models.feedback.pool import Pool, load_pool
from models.feedback.preference import load_preference_model
from models.feedback.utility import bayes_ceiling, terms


@torch.no_grad()
def head_scores(model: Path, pool_dir: Path) -> tuple[dict[str, np.ndarray], Pool]:
    """Per pool image against its prompt: the whole score and each of its two terms."""
    scorer, pool = load_preference_model(model), load_pool(pool_dir)
    reading = scorer.read(pool.images)
    text, mask = scorer.encode_text(scorer.token_ids(pool.texts))
    alignment = scorer.alignment_score(reading, text, mask).numpy()
    plausibility = scorer.plausibility_score(reading).numpy()
    scores = {"score": alignment + plausibility, "alignment": alignment}
    scores["plausibility"] = plausibility
    return scores, pool


def pair_sets(pool: Pool, split: str) -> dict[str, np.ndarray]:
    """Masks over the pool's pairs, by what decides them."""
    pr, cap = pool.pairs, pool.config.utility.error_cap
    t = [terms(x, cap) for x in pool.labels]
    align = np.array([x["alignment"] for x in t])
    comp = np.array([x["composition"] for x in t])
    scene = [json.dumps(x["scene"], sort_keys=True) for x in pool.labels]
    a, b = pr["a"], pr["b"]
    base = (pr["split"] == split) & ~pr["held_out"]
    plaus_only = base & (align[a] == align[b]) & (comp[a] == comp[b])
    same = np.array([scene[i] == scene[j] for i, j in zip(a, b, strict=True)])
    return {
        "alignment decides": base & (align[a] != align[b]),
        "plausibility only, one scene": plaus_only & same,
        "plausibility only, two scenes": plaus_only & ~same,
        "all": base,
    }


def _share(score: np.ndarray, first: np.ndarray, second: np.ndarray) -> str:
    return f"{(score[first] > score[second]).mean():.3f}" if len(first) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--pool", type=Path, default=Path("data/feedback_pool"))
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    args = ap.parse_args()
    scores, pool = head_scores(args.model, args.pool)
    pr = pool.pairs
    print(
        f"| {args.split} pairs | n | ceiling | whole score | alignment alone | plausibility alone |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    sets = pair_sets(pool, args.split)
    for name, m in sets.items():
        row = [M.pair_agreement(s[pr["a"][m]], s[pr["b"][m]], pr["p"][m]) for s in scores.values()]
        cells = " | ".join(f"{v:.3f}" for v in row)
        print(f"| {name} | {int(m.sum())} | {bayes_ceiling(pr['p'][m]):.3f} | {cells} |")
    # Which prompts the alignment term misreads: on the pairs it decides, and on the
    # two-scene pairs where it should say nothing (whole score against plausibility alone).
    decides, quiet = sets["alignment decides"], sets["plausibility only, two scenes"]
    category = np.array([q["prompt"]["category"] for q in pool.prompts])[pr["prompt"]]
    print(
        "\n| by category | alignment decides: n | whole score | alignment alone "
        "| two scenes: n | whole score | plausibility alone |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in dict.fromkeys(category[decides | quiet]):
        cells = []
        for m, keys in (
            (decides & (category == c), ("score", "alignment")),
            (quiet & (category == c), ("score", "plausibility")),
        ):
            row = [
                M.pair_agreement(scores[k][pr["a"][m]], scores[k][pr["b"][m]], pr["p"][m])
                if m.any()
                else float("nan")
                for k in keys
            ]
            cells += [str(int(m.sum())), *(f"{v:.3f}" for v in row)]
        print(f"| {c} | " + " | ".join(cells) + " |")
    # What the alignment term reads instead: on two-scene pairs whose images hold
    # different numbers of objects, how often each term prefers the one with more.
    n = np.array([len(x["scene"]["objects"]) for x in pool.labels])
    a, b = pr["a"][quiet], pr["b"][quiet]
    differ = n[a] != n[b]
    more, fewer = np.where(n[a] > n[b], a, b)[differ], np.where(n[a] > n[b], b, a)[differ]
    p_more = np.where(n[a] > n[b], pr["p"][quiet], 1 - pr["p"][quiet])[differ]
    print(
        f"\nTwo-scene pairs whose images hold different numbers of objects: {int(differ.sum())}."
        f" The image with more is preferred by the annotators {p_more.mean():.3f} of the time"
        f" (mean choice probability), by the whole score {_share(scores['score'], more, fewer)},"
        f" alignment alone {_share(scores['alignment'], more, fewer)}, plausibility alone"
        f" {_share(scores['plausibility'], more, fewer)}."
    )
    # By the form the prompt was shown in: a descriptive prompt states more than a short one.
    form = np.array([q["form"] for q in pool.prompts])[pr["prompt"]]
    print(
        f"\n| {args.split} pairs, by form | n | ceiling | whole score | alignment alone "
        "| plausibility alone |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("alignment decides", "plausibility only, two scenes", "all"):
        for f in dict.fromkeys(form):
            m = sets[name] & (form == f)
            row = [
                M.pair_agreement(x[pr["a"][m]], x[pr["b"][m]], pr["p"][m]) for x in scores.values()
            ]
            cells = " | ".join(f"{v:.3f}" for v in row)
            print(f"| {name}, {f} | {int(m.sum())} | {bayes_ceiling(pr['p'][m]):.3f} | {cells} |")


if __name__ == "__main__":
    main()
