"""Fine-tune the prompt expander on the inversion dataset (models/expansion/queries.py)
and measure it exactly: faithfulness and diversity of its expansions of held-out queries
and of the prompt suite's short prompts.

    python -m models.expansion.train --params params.yaml --recaptioned data/recaptioned \
        --out data/prompt_expander

Prefix dropout rises linearly from `prefix_dropout[0]` to `prefix_dropout[1]` over
training, as in Prompt Expansion (Datta et al. 2023): early on the prefix says which
level a query is; by the end the model must tell from the query itself.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from corpus.atomic import replace_dir, write_text_atomic
from corpus.config import build_config
from corpus.prompt_suite import load_suite
from models.common.clip import warmup_cosine_adamw
from models.expansion.dpo import DPOConfig, dpo_queries, optimise_faithfulness
from models.expansion.faithfulness import check, coherent, diversity, keep_faithful
from models.expansion.model import (
    LMConfig,
    delexicalise,
    expand,
    load_expander,
    new_expander,
    quoted_word,
    source_text,
    word_slot,
)
from models.expansion.queries import LEVELS, Pair, inversion_pairs


@dataclass(frozen=True)
class ExpanderConfig:
    pretrained: str | None = None  # full: a causal LM hub id or folder; None: tiny GPT-2
    lm: LMConfig = field(default_factory=LMConfig)
    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    prefix_dropout: tuple[float, ...] = (0.4, 1.0)  # at the first step, at the last
    relation_share: float = 0.5  # of training queries whose caption has a relation: ask it
    expansions: int = 4  # per query, when measured
    candidates: int = 16  # samples per query from which the faithful ones are kept
    eval_queries: int = 64  # held-out captions per level
    temperature: float = 1.0
    top_p: float = 0.95
    suite: str = "prompts/suite-v1.json"
    max_unfaithful: float = 0.02  # the asset check, on the suite's short prompts
    dpo: DPOConfig = field(default_factory=DPOConfig)  # after fine-tuning (models/expansion/dpo.py)
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.prefix_dropout
        if not 0 <= lo <= hi <= 1:
            raise ValueError(
                f"prompt_expander.prefix_dropout must rise within [0, 1], got {self.prefix_dropout}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> ExpanderConfig:
        return build_config(cls, d, "prompt_expander")


def prefix_dropout(cfg: ExpanderConfig, step: int) -> float:
    lo, hi = cfg.prefix_dropout
    return lo + (hi - lo) * step / max(cfg.max_steps - 1, 1)


def read_captions(recaptioned: Path) -> dict[str, list[str]]:
    """Descriptive captions of the recaptioned dataset, by split."""
    df = pd.concat(pd.read_parquet(f) for f in sorted(recaptioned.glob("*.parquet")))
    return {s: g["descriptive_caption"].tolist() for s, g in df.groupby("split")}


def tokenize_pairs(pairs: list[Pair], tok) -> list[tuple[list[int], list[int], list[int]]]:
    """Per pair: the source ids with its prefix, without it, and the target ids (the
    query's quoted word as `<word>` in both, when the tokenizer has it)."""

    def ids(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    slot = word_slot(tok) is not None
    with_prefix = ids([source_text(p.query, p.prefix, tok, slot) for p in pairs])
    without = ids([source_text(p.query, None, tok, slot) for p in pairs])
    prompts = [delexicalise(p.prompt, quoted_word(p.query) if slot else None) for p in pairs]
    targets = [[*t, tok.eos_token_id] for t in ids([" " + p for p in prompts])]
    return list(zip(with_prefix, without, targets, strict=True))


def _batch(rows, drop: float, pad: int, max_length: int, rng: random.Random):
    """Token ids, attention mask and labels; only the prompt and its end are learnt."""
    ids, labels = [], []
    for with_prefix, without, tgt in rows:
        src = without if rng.random() < drop else with_prefix
        ids.append((src + tgt)[:max_length])
        labels.append(([-100] * len(src) + tgt)[:max_length])
    width = max(map(len, ids))
    x = torch.tensor([s + [pad] * (width - len(s)) for s in ids])
    y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
    return x, mask, y


def unprefixed_batch(pairs: list[tuple[str, str]], tok, max_length: int):
    """(query, expansion) pairs as `_batch` gives them, the query without a prefix, as
    the suite's short prompts are expanded."""
    rows = tokenize_pairs([Pair(LEVELS[0], q, x) for q, x in pairs], tok)
    return _batch(rows, 1.0, tok.pad_token_id, max_length, random.Random(0))


@dataclass(frozen=True)
class FitSchedule:
    steps: int  # taken (0: none)
    schedule_steps: int  # the learning-rate schedule's length
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int


def fit(
    model,
    tok,
    rows: list[tuple[list[int], list[int], list[int]]],
    run: FitSchedule,
    dropout: Callable[[int], float],
    max_length: int,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
    desc: str = "prompt_expander",
) -> float | None:
    """Fine-tune on tokenized pairs (`tokenize_pairs`), the prefix dropped with
    probability `dropout(step)`; the last loss (None: no step taken)."""
    optim = warmup_cosine_adamw(model, run.lr, 0.01, run.warmup_steps, run.schedule_steps)
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    rng = random.Random(run.seed)
    torch.manual_seed(run.seed)
    model.train()
    loss = None
    bar = tqdm(range(run.steps), desc=desc, disable=not progress)
    for step in bar:
        drop = dropout(step)
        rows_now = rng.choices(rows, k=run.batch_size)
        x, mask, y = _batch(rows_now, drop, tok.pad_token_id, max_length, rng)
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == run.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log({"expander_loss": loss.item(), "prefix_dropout": drop}, step)
    return None if loss is None else loss.item()


def _mean(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def _share(verdicts: list[dict], *kinds: str) -> float:
    """The share of verdicts with any of `kinds`; NaN for none (no usable held-out caption)."""
    if not verdicts:
        return float("nan")
    return float(np.mean([any(v[k] for k in kinds) for v in verdicts]))


def _diversity(expansions: list[list[str]]) -> dict[str, float]:
    per_query = [diversity(ts) for ts in expansions]
    return {k: float(np.mean([d[k] for d in per_query])) for k in per_query[0]} if per_query else {}


def measure(
    model, tok, cfg: ExpanderConfig, held_out: list[Pair], short_prompts: list[str]
) -> dict:
    """Faithfulness and diversity of expansions of held-out queries (with and without
    their prefix) and of the suite's short prompts (no prefix): of the first `expansions`
    samples as drawn, and of the faithful ones among `candidates` (what a user is given)."""
    out: dict = {}
    runs = {f"{p}": [q for q in held_out if q.prefix == p] for p in LEVELS}
    sets = {
        **{f"held_out_{lv.strip('<>')}": ([q.query for q in qs], lv) for lv, qs in runs.items()},
        "held_out_no_prefix": ([q.query for q in held_out], None),
        "suite_short": (short_prompts, None),
    }
    n = cfg.expansions
    for name, (queries, prefix) in sets.items():
        sampled = expand(
            model, tok, queries, max(n, cfg.candidates), prefix, cfg.temperature, cfg.top_p,
            seed=cfg.seed,
        )  # fmt: skip
        raw = [ts[:n] for ts in sampled]
        kept = keep_faithful(queries, sampled, n)
        verdicts = [check(q, t) for q, ts in zip(queries, raw, strict=True) for t in ts]
        out[name] = {
            "queries": len(queries),
            "unfaithful": _share(verdicts, "dropped", "contradicted"),
            "dropped": _share(verdicts, "dropped"),
            "contradicted": _share(verdicts, "contradicted"),
            "incoherent": _mean([not coherent(t) for ts in raw for t in ts]),
            "short_of_faithful": _mean([len(k) < n for k in kept]),
            "diversity": _diversity(raw),
            "diversity_faithful": _diversity([k for k in kept if k]),
            "examples": [
                {"query": q, "expansions": ks} for q, ks in zip(queries[:3], kept[:3], strict=True)
            ],
        }
    return out


def train_expander(
    cfg: ExpanderConfig,
    recaptioned: Path,
    out: Path,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> dict:
    t0 = time.time()
    captions = read_captions(recaptioned)
    train, skipped = inversion_pairs(
        captions.get("train", []), cfg.seed, relation_share=cfg.relation_share
    )
    held_out, skipped_eval = inversion_pairs(
        captions.get("eval", [])[: cfg.eval_queries], cfg.seed + 1
    )
    # No usable caption (a captioner trained for a few steps): nothing to learn, the model
    # stays as built and the asset check `prompt_expander_faithful` says why.
    steps = cfg.max_steps if train else 0
    if cfg.pretrained:
        model, tok = load_expander(cfg.pretrained)
    else:
        model, tok = new_expander(cfg.lm, captions["train"], cfg.seed)
    max_length = min(cfg.lm.max_length, getattr(model.config, "n_positions", cfg.lm.max_length))
    loss = fit(
        model,
        tok,
        tokenize_pairs(train, tok) if train else [],
        FitSchedule(steps, cfg.max_steps, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.seed),
        lambda step: prefix_dropout(cfg, step),
        max_length,
        log=log,
        progress=progress,
    )
    t_train = time.time() - t0
    short = [p.short for p in load_suite(Path(cfg.suite))]
    # No usable caption, nothing learnt to sample from: the asset check says why.
    queries, left_out = dpo_queries(train, short, cfg.dpo) if train else ([], 0)
    rounds = optimise_faithfulness(
        model,
        tok,
        queries,
        cfg.dpo,
        lambda pairs: unprefixed_batch(pairs, tok, max_length),
        {"temperature": cfg.temperature, "top_p": cfg.top_p},
        log=log,
        progress=progress,
    ) if queries else []  # fmt: skip
    t_dpo = time.time() - t0 - t_train
    metrics = {
        "pairs": len(train),
        "skipped_captions": dict(skipped + skipped_eval),
        "trained_steps": steps,
        "final_loss": loss,
        "dpo": {"queries": len(queries), "left_out_as_in_eval_suite": left_out, "rounds": rounds},
        **measure(model, tok, cfg, held_out, short),
        "seconds": {
            "train": round(t_train, 1),
            "dpo": round(t_dpo, 1),
            "measure": round(time.time() - t0 - t_train - t_dpo, 1),
        },
        "config": asdict(cfg),
    }
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)  # safetensors
    tok.save_pretrained(tmp)
    write_text_atomic(tmp / "metrics.json", json.dumps(metrics, indent=2))
    replace_dir(tmp, out)
    if log:
        log({f"{k}_unfaithful": v["unfaithful"] for k, v in metrics.items()
             if isinstance(v, dict) and "unfaithful" in v}, cfg.max_steps)  # fmt: skip
    return metrics


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recaptioned", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, ExpanderConfig, skip=("lm", "prefix_dropout", "dpo"))
    args = ap.parse_args()
    cfg = config_from_args(ExpanderConfig, args, "prompt_expander")
    metrics = train_expander(cfg, args.recaptioned, args.out)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
