"""Faithfulness of a trained prompt expander, measured as the asset measures it, with
params.yaml's defaults (docs/log/2026-12-expansion.md):

    python -m benchmarks.expander_measure data/exp/<run>

Per query set: the share of expansions that drop or contradict a claim of their query as
sampled, and the share of queries with fewer than `expansions` faithful among `candidates`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from corpus.params import load_section
from corpus.prompt_suite import load_suite
from models.expansion.faithfulness import faithful
from models.expansion.model import expand, load_expander
from models.expansion.queries import inversion_pairs
from models.expansion.train import ExpanderConfig, measure, read_captions


def main() -> None:
    cfg = ExpanderConfig.from_dict(load_section("params.yaml", "prompt_expander"))
    model, tok = load_expander(Path(sys.argv[1]))
    captions = read_captions(Path("data/recaptioned"))["eval"][: cfg.eval_queries]
    held_out, _ = inversion_pairs(captions, cfg.seed + 1)
    short = [p.short for p in load_suite(Path(cfg.suite))]
    for name, m in measure(model, tok, cfg, held_out, short).items():
        print(f"{name}: {m['queries']} queries, unfaithful {m['unfaithful']:.3f}, "
              f"short of faithful {m['short_of_faithful']:.3f}")  # fmt: skip
    prompts = load_suite(Path(cfg.suite))
    sampled = expand(model, tok, [p.short for p in prompts], cfg.expansions, seed=cfg.seed)
    by_category: dict[str, list[bool]] = {}
    for p, texts in zip(prompts, sampled, strict=True):
        by_category.setdefault(p.category, []).extend(faithful(p.short, t) for t in texts)
    print("faithful as sampled, per suite category:")
    print({c: round(sum(v) / len(v), 3) for c, v in by_category.items()})


if __name__ == "__main__":
    main()
