"""Faithfulness of a trained prompt expander, measured as the asset measures it, with
params.yaml's defaults (docs/log/2026-12-expansion.md):

    python -m benchmarks.expander_measure data/exp/<run> [--temperatures 1.0 0.7 0.5 0.3]

Per query set: the share of expansions that drop or contradict a claim of their query as
sampled, and the share of queries with fewer than `expansions` faithful among `candidates`;
for the suite's short prompts, the faithful share per category and the failed claims by
kind.
With `--temperatures`: for the suite's short prompts at each sampling temperature, the
share of `candidates` samples that are unfaithful or incoherent, the share of prompts
with fewer than `expansions` good ones, and the distinct good ones per prompt.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from corpus.params import load_section
from corpus.prompt_suite import load_suite
from models.expansion.faithfulness import check, coherent, faithful, query_relations
from models.expansion.model import expand, load_expander
from models.expansion.queries import inversion_pairs
from models.expansion.train import ExpanderConfig, measure, read_captions


def temperature_sweep(model, tok, cfg: ExpanderConfig, short: list[str], temps) -> None:
    print("| temperature | unfaithful or incoherent | fewer than "
          f"{cfg.expansions} good of {cfg.candidates} | distinct good per prompt |")  # fmt: skip
    print("|---:|---:|---:|---:|")
    for t in temps:
        sampled = expand(model, tok, short, cfg.candidates, temperature=t, seed=cfg.seed)
        good = [
            [faithful(q, x) and coherent(x) for x in xs]
            for q, xs in zip(short, sampled, strict=True)
        ]
        bad = 1 - sum(map(sum, good)) / (cfg.candidates * len(short))
        few = sum(sum(g) < cfg.expansions for g in good) / len(short)
        distinct = sum(
            len({x for x, ok in zip(xs, g, strict=True) if ok})
            for xs, g in zip(sampled, good, strict=True)
        ) / len(short)
        print(f"| {t} | {bad:.3f} | {few:.3f} | {distinct:.2f} |")


def relations(
    model, tok, cfg: ExpanderConfig, captions: dict[str, list[str]], n_queries: int = 48
) -> None:
    """Relation queries of the training distribution: `<abst>` queries derived from
    held-out captions, and how many of the expander's training pairs have one."""
    train, _ = inversion_pairs(captions["train"], cfg.seed, relation_share=cfg.relation_share)
    held_out, _ = inversion_pairs(captions["eval"], cfg.seed + 1)
    queries = [p.query for p in held_out if p.prefix == "<abst>" and query_relations(p.query)]
    queries = queries[:n_queries]
    sampled = expand(model, tok, queries, cfg.expansions, seed=cfg.seed)
    bad = [not faithful(q, t) for q, ts in zip(queries, sampled, strict=True) for t in ts]
    with_relation = sum(bool(query_relations(p.query)) for p in train)
    print(f"held-out <abst> relation queries: {len(queries)}, unfaithful as sampled "
          f"{sum(bad) / len(bad):.3f}; training pairs with a relation query: "
          f"{with_relation} of {len(train)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("expander", type=Path)
    ap.add_argument("--temperatures", type=float, nargs="*", default=[])
    args = ap.parse_args()
    cfg = ExpanderConfig.from_dict(load_section("params.yaml", "prompt_expander"))
    model, tok = load_expander(args.expander)
    # The held-out queries are params.yaml's; the training pairs counted are the expander's
    # (a folder trained elsewhere has no metrics.json: params.yaml's then).
    saved = args.expander / "metrics.json"
    trained = json.loads(saved.read_text()).get("config", {}) if saved.exists() else {}
    cfg_train = replace(cfg, relation_share=trained.get("relation_share", cfg.relation_share))
    captions = read_captions(Path("data/recaptioned"))
    held_out, _ = inversion_pairs(captions["eval"][: cfg.eval_queries], cfg.seed + 1)
    short = [p.short for p in load_suite(Path(cfg.suite))]
    for name, m in measure(model, tok, cfg, held_out, short).items():
        print(f"{name}: {m['queries']} queries, unfaithful {m['unfaithful']:.3f}, "
              f"short of faithful {m['short_of_faithful']:.3f}")  # fmt: skip
    prompts = load_suite(Path(cfg.suite))
    sampled = expand(model, tok, [p.short for p in prompts], cfg.expansions, seed=cfg.seed)
    by_category: dict[str, list[bool]] = {}
    claims: Counter = Counter()
    for p, texts in zip(prompts, sampled, strict=True):
        by_category.setdefault(p.category, []).extend(faithful(p.short, t) for t in texts)
        for t in texts:
            verdict = check(p.short, t)
            claims.update(f"{how} {c.split()[0]}" for how in verdict for c in verdict[how])
    print("faithful as sampled, per suite category:")
    print({c: round(sum(v) / len(v), 3) for c, v in by_category.items()})
    print("claims dropped or contradicted, by kind:", dict(claims.most_common()))
    relations(model, tok, cfg_train, captions)
    if args.temperatures:
        temperature_sweep(model, tok, cfg, short, args.temperatures)


if __name__ == "__main__":
    main()
