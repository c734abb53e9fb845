"""Re-fine-tuning the prompt expander on what the generator draws well: Prompt
Expansion's RFT step (Datta et al. 2023), with the world judge as the filter.

1. Training queries: the short forms of a prompt suite drawn from this step's own seed,
   without any that the eval suite also holds, so the comparison below is on unseen
   queries. Each carries its conditions.
2. The base expander samples `candidates` expansions per query; the faithful and
   coherent ones (the caption metrics) are drawn, `images` each.
3. A pair (query, expansion) is kept when at least `min_pass` of its images pass every
   condition of the query, as the world judge reads them.
4. The base expander is fine-tuned again on the kept pairs under the `<rft>` prefix
   (dropped with probability `prefix_dropout`, so it also works without one).
5. Base and re-fine-tuned are compared on the eval suite's short prompts: faithfulness as
   sampled, and prompt following of the prompts upsampled by each, against the raw short
   prompts, with paired intervals over prompts (the same seeds for every form).

    python -m models.expansion.refine --expander data/prompt_expander \
        --model data/diffusion_model --judge data/world_judge --out data/prompt_expander_rft
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from corpus.atomic import replace_dir, write_text_atomic
from corpus.config import build_config
from corpus.prompt_suite import CATEGORIES, Prompt, build_suite, judge_prompt, load_suite
from models.evaluation.promotion_gate import bootstrap_ci
from models.expansion.faithfulness import keep_faithful
from models.expansion.model import expand, load_expander
from models.expansion.queries import Pair
from models.expansion.train import ExpanderConfig, FitSchedule, fit, measure, tokenize_pairs
from models.expansion.upsample import upsample

RFT = "<rft>"
log = logging.getLogger(__name__)
Draw = Callable[[list[str], int], torch.Tensor]  # prompts, seed -> uint8 images
Read = Callable[[torch.Tensor], list]  # images -> judged scenes


@dataclass(frozen=True)
class RefineConfig:
    queries_per_category: int = 32  # training queries: a suite drawn from `seed`
    candidates: int = 8  # expansions sampled per query; the faithful ones are drawn
    images: int = 2  # images per drawn expansion
    min_pass: float = 1.0  # share of an expansion's images that must pass every condition
    max_steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 20
    prefix_dropout: float = 0.5
    eval_images: int = 4  # images per suite prompt and form in the comparison
    upsample_candidates: int = 16
    sampling_steps: int = 20
    guidance_scale: float = 6.0
    suite: str = "prompts/suite-v1.json"
    n_boot: int = 2000
    seed: int = 7_000_003

    def __post_init__(self) -> None:
        if not 0 < self.min_pass <= 1:
            raise ValueError(f"refine.min_pass must be in (0, 1], got {self.min_pass}")
        if not 0 <= self.prefix_dropout <= 1:
            raise ValueError(f"refine.prefix_dropout must be in [0, 1], got {self.prefix_dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> RefineConfig:
        return build_config(cls, d, "refine")


def training_queries(cfg: RefineConfig, eval_suite: list[Prompt]) -> tuple[list[Prompt], int]:
    """Prompts of this step's own suite whose short form the eval suite does not hold, and
    how many were left out for that."""
    asked = {p.short for p in eval_suite}
    drawn = build_suite(cfg.queries_per_category, cfg.seed)
    kept = [p for p in drawn if p.short not in asked]
    return kept, len(drawn) - len(kept)


def passing_pairs(
    prompts: list[Prompt], expansions: list[list[str]], passed: list[list[bool]], min_pass: float
) -> list[Pair]:
    """(query, expansion) pairs whose images pass every condition of the query often
    enough: `passed[k]` holds the verdicts of the images of the k-th expansion, in the
    order of `expansions` flattened query-major."""
    if sum(map(len, expansions)) != len(passed):
        raise ValueError(f"{len(passed)} verdict lists for {sum(map(len, expansions))} expansions")
    pairs, k = [], 0
    for prompt, texts in zip(prompts, expansions, strict=True):
        for text in texts:
            if np.mean(passed[k]) >= min_pass:
                pairs.append(Pair(RFT, prompt.short, text))
            k += 1
    return pairs


def _verdicts(prompts: list[Prompt], scenes: list, per: int) -> list[list[bool]]:
    """Per drawn text (`per` consecutive scenes each), whether each image passes its
    prompt's conditions; `prompts` holds one entry per drawn text."""
    return [
        [judge_prompt(p, scenes[k * per + j])["passed"] for j in range(per)]
        for k, p in enumerate(prompts)
    ]


def collect_pairs(
    model, tok, prompts: list[Prompt], draw: Draw, read: Read, cfg: RefineConfig
) -> tuple[list[Pair], dict]:
    """Sample, keep the faithful, draw, judge: the pairs to re-fine-tune on, and counts."""
    queries = [p.short for p in prompts]
    log.info("sampling %d expansions of each of %d queries", cfg.candidates, len(queries))
    sampled = expand(model, tok, queries, cfg.candidates, seed=cfg.seed)
    faithful = keep_faithful(queries, sampled, cfg.candidates)
    texts = [t for ts in faithful for t in ts]
    owners = [p for p, ts in zip(prompts, faithful, strict=True) for _ in ts]
    if not texts:
        return [], {"sampled": len(queries) * cfg.candidates, "faithful": 0, "kept": 0}
    log.info(
        "drawing and judging %d images of %d faithful expansions",
        len(texts) * cfg.images,
        len(texts),
    )
    images = draw([t for t in texts for _ in range(cfg.images)], cfg.seed)
    passed = _verdicts(owners, read(images), cfg.images)
    pairs = passing_pairs(prompts, faithful, passed, cfg.min_pass)
    by_category = {
        c: {
            "faithful": sum(p.category == c for p in owners),
            "kept": int(
                sum(
                    p.category == c and np.mean(v) >= cfg.min_pass
                    for p, v in zip(owners, passed, strict=True)
                )
            ),
        }
        for c in CATEGORIES
    }
    counts = {
        "sampled": len(queries) * cfg.candidates,
        "faithful": len(texts),
        "images": len(images),
        "image_pass_rate": float(np.mean([x for v in passed for x in v])),
        "kept": len(pairs),
        "queries_with_a_kept_pair": len({p.query for p in pairs}),
        "by_category": by_category,
    }
    return pairs, counts


def _overall(scores: np.ndarray, prompts: list[Prompt]) -> float:
    """GenEval's overall: the mean over categories of the mean over their prompts."""
    cats = sorted({p.category for p in prompts})
    return float(np.mean([scores[[p.category == c for p in prompts]].mean() for c in cats]))


def compare(
    expanders: dict[str, tuple], suite: list[Prompt], draw: Draw, read: Read, cfg: RefineConfig
) -> dict:
    """Prompt following of the suite's short prompts as given and upsampled by each
    expander (the same seed for every form), with paired differences."""
    n = cfg.eval_images
    per_prompt: dict[str, np.ndarray] = {}
    forms = {"short": [p.short for p in suite for _ in range(n)]}
    expanded = {}
    for name, expander in expanders.items():
        drawn = upsample([p.short for p in suite], n, expander, cfg.upsample_candidates, cfg.seed)
        forms[name] = [d.prompt for d in drawn]
        expanded[name] = float(np.mean([d.expanded for d in drawn]))
    out: dict = {"forms": {}, "differences": []}
    for form, texts in forms.items():
        log.info("comparing: drawing and judging %d images of the %s form", len(texts), form)
        passed = _verdicts([p for p in suite for _ in range(n)], read(draw(texts, cfg.seed)), 1)
        scores = np.array([v[0] for v in passed], dtype=float).reshape(len(suite), n).mean(1)
        per_prompt[form] = scores
        out["forms"][form] = {
            "all_conditions": _overall(scores, suite),
            "ci": bootstrap_ci(scores, cfg.n_boot),
            "expanded_share": expanded.get(form, 0.0),
        }
    names = list(expanders)
    pairs = [(a, "short") for a in names] + (
        [(names[1], names[0])] if len(names) == 2 else []
    )  # fmt: skip
    for a, b in pairs:
        diff = per_prompt[a] - per_prompt[b]
        low, high = bootstrap_ci(diff, cfg.n_boot)
        out["differences"].append(
            {"a": a, "b": b, "difference": float(diff.mean()), "low": low, "high": high,
             "resolved": bool(low > 0 or high < 0)}
        )  # fmt: skip
    return out


def refine(
    cfg: RefineConfig, expander_dir: Path, draw: Draw, read: Read, out: Path, progress: bool = True
) -> dict:
    """Re-fine-tune the expander in `expander_dir`, write it to `out` with `metrics.json`
    and `pairs.jsonl`, and compare it with the base one."""
    t0 = time.time()
    suite = load_suite(Path(cfg.suite))
    prompts, overlapping = training_queries(cfg, suite)
    model, tok = load_expander(expander_dir)
    pairs, counts = collect_pairs(model, tok, prompts, draw, read, cfg)
    t_collect = time.time() - t0
    base = load_expander(expander_dir)
    max_length = getattr(model.config, "n_positions", 160)
    steps = cfg.max_steps if pairs else 0  # nothing kept: the base expander, said so below
    loss = fit(
        model,
        tok,
        tokenize_pairs(pairs, tok) if pairs else [],
        FitSchedule(steps, cfg.max_steps, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.seed),
        lambda step: cfg.prefix_dropout,
        max_length,
        progress=progress,
        desc="re-fine-tune",
    )
    t_fit = time.time() - t0 - t_collect
    model.eval()
    short = [p.short for p in suite]
    measured = ExpanderConfig(candidates=cfg.upsample_candidates, suite=cfg.suite, seed=cfg.seed)
    faithfulness = {
        name: measure(m, t, measured, [], short)["suite_short"]
        for name, (m, t) in {"base": base, "rft": (model, tok)}.items()
    }
    comparison = compare({"base": base, "rft": (model, tok)}, suite, draw, read, cfg)
    metrics = {
        "training_queries": len(prompts),
        "left_out_as_in_eval_suite": overlapping,
        **counts,
        "trained_steps": steps,
        "final_loss": loss,
        "note": "" if pairs else "no expansion's images passed: the base expander is kept",
        "faithfulness": faithfulness,
        "comparison": comparison,
        "seconds": {
            "collect": round(t_collect, 1),
            "fit": round(t_fit, 1),
            "compare": round(time.time() - t0 - t_collect - t_fit, 1),
        },
        "config": asdict(cfg),
    }
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)  # safetensors
    tok.save_pretrained(tmp)
    write_text_atomic(tmp / "metrics.json", json.dumps(metrics, indent=2))
    write_text_atomic(
        tmp / "pairs.jsonl", "".join(json.dumps({"query": p.query, "prompt": p.prompt}) + "\n"
                                     for p in pairs)
    )  # fmt: skip
    replace_dir(tmp, out)
    return metrics


def table(metrics: dict) -> str:
    """The comparison as markdown."""
    lines = [
        "| short prompts | all conditions [95% CI] | drawn from an expansion |",
        "|---|---|---:|",
    ]
    for form, m in metrics["comparison"]["forms"].items():
        name = "as given" if form == "short" else f"upsampled by {form}"
        lo, hi = m["ci"]
        lines.append(
            f"| {name} | {m['all_conditions']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{m['expanded_share']:.3f} |"
        )
    lines += ["", "| difference | estimate [95% CI] | resolved |", "|---|---|---|"]
    for d in metrics["comparison"]["differences"]:
        lines.append(
            f"| {d['a']} - {d['b']} | {d['difference']:+.3f} [{d['low']:+.3f}, "
            f"{d['high']:+.3f}] | {'yes' if d['resolved'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args
    from models.diffusion.text_to_image import load_text_to_image
    from models.evaluation.world_judge import load_judge

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expander", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="exported text-to-image folder")
    ap.add_argument("--judge", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, RefineConfig)
    args = ap.parse_args()
    cfg = config_from_args(RefineConfig, args, "refine")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pipe = load_text_to_image(args.model).to("cuda" if torch.cuda.is_available() else "cpu")
    judge = load_judge(args.judge)

    def draw(texts: list[str], seed: int) -> torch.Tensor:
        with torch.inference_mode():
            return pipe(
                texts, seed=seed, steps=cfg.sampling_steps, guidance_scale=cfg.guidance_scale
            )

    metrics = refine(cfg, args.expander, draw, judge.predict, args.out)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("config",)}, indent=2))
    print(table(metrics))


if __name__ == "__main__":
    main()
