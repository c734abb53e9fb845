"""The preference model: a scorer trained on the pool's pairs with HPS v2's loss.

score(image, prompt) comes from `models/feedback/judge_scorer.py` (the frozen world
judge's reading, a small text tower, cross-attention) and is compared only between images
of one prompt. Training: for a pair (a, b) of one prompt and the annotator's choice, a
2-way softmax cross-entropy over (score_a, score_b) (the HPS v2 and PickScore loss), on
the pool's training pairs and on reprompted pairs (`models/feedback/reprompt.py`): the
same annotators choosing between training images under prompts they were not drawn for.
The reference CLIP's score, untrained on the pairs, is the baseline every number is shown
against.

    python -m models.feedback.preference --params params.yaml --pool data/feedback_pool \
        --reference-clip data/reference_clip --judge data/world_judge --out data/preference_model

Measured on the test prompts (`models/feedback/metrics.py`): agreement with the
annotators against the exact ceiling, ranking agreement and Spearman with the utility,
the same on pairs drawn only from held-out generators, on pairs that only plausibility
or only alignment decides, and, with each utility term removed in turn, the model
trained on what those annotators chose.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from corpus.atomic import replace_dir, write_text_atomic
from corpus.config import build_config
from corpus.prompt_suite import load_suite
from models.common.clip import warmup_cosine_adamw
from models.evaluation.reference_clip import load_reference_clip
from models.evaluation.world_judge import JudgeConfig, WorldJudge, load_judge
from models.feedback import metrics as M
from models.feedback.judge_scorer import (
    JudgeScorer,
    add_unnamed_object,
    load_scorer,
    named_shapes,
    read_cells,
    save_scorer,
)
from models.feedback.pool import Pool, held_out, load_pool
from models.feedback.reprompt import Reprompted, reprompted_pairs
from models.feedback.trainer import fine_tune_trainer
from models.feedback.utility import (
    TERMS,
    UtilityConfig,
    annotate,
    bayes_ceiling,
    choice_probability,
    terms,
    utility,
)


@dataclass(frozen=True)
class PreferenceConfig:
    max_steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    width: int = 64
    context_length: int = 64  # tokens of a prompt the text tower reads
    # In the text and cross-attention layers. Above 0, attention on a CPU takes PyTorch's
    # unfused path and each step draws the masks (docs/log/2026-12-speed.md).
    dropout: float = 0.0
    reprompt_pairs: int = 60_000  # 0: the pool's own pairs only
    reprompt_per_category: int = 300  # new prompts per suite category for those pairs
    reprompt_alike_share: float = 0.6  # of those pairs, two images that hold the prompt alike
    # Weight of the loss that holds alignment still when an object of a shape the prompt
    # does not name is added to the scene (`judge_scorer.add_unnamed_object`); 0: off.
    unnamed_invariance: float = 1.0
    unnamed_rows: int = 0  # the first rows of each batch it is computed on (0: all)
    # Steps the alignment term first trains alone, on the training pairs whose images hold
    # the prompt differently (0: none). It is then frozen and plausibility trains on every
    # pair, so the pairs only plausibility decides cannot pull alignment apart.
    alignment_first_steps: int = 2000
    # There, the weight of the squared difference of alignment on pairs that hold the
    # prompt alike (0: those pairs are left out).
    alignment_ties: float = 1.0
    ablate_terms: bool = True  # also train one model per utility term left out
    ablation_steps: int = 300
    max_gap: float = 0.03  # the asset check: held-out agreement this close to the ceiling
    seed: int = 6_000_053

    @classmethod
    def from_dict(cls, d: dict) -> PreferenceConfig:
        return build_config(cls, d, "preference_model")


class PreferenceModule(L.LightningModule):
    """`trains`: which of the score's terms train, "both", "alignment" (scored alone) or
    "plausibility" (alignment frozen, its value still in the score)."""

    def __init__(self, scorer: JudgeScorer, cfg: PreferenceConfig, trains: str = "both"):
        super().__init__()
        self.scorer, self.cfg, self.trains = scorer, cfg, trains
        # The first phase's curves apart: its steps count from 0 again in the second.
        self.name = "preference_alignment_first" if trains == "alignment" else "preference"
        if trains == "plausibility":  # alignment frozen but for how loud it is
            for name, p in scorer.named_parameters():
                p.requires_grad_(name.startswith("plausibility.") or name == "alignment_gain")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        s = self.scorer
        text = s.encode_text(batch["ids"])  # once for both images
        align = [s.alignment_score(batch[k], *text) for k in ("a", "b")]
        target = 1 - batch["choice"]  # column 0 is a
        scored = torch.ones_like(target, dtype=torch.bool)  # the rows the choices train
        if self.trains == "alignment":
            logits, tied = torch.stack(align, 1), batch["tied"]
            scored, loss = ~tied, logits.new_zeros(())
            if scored.any():
                loss = torch.nn.functional.cross_entropy(logits[scored], target[scored])
            if tied.any():
                gap = (align[0][tied] - align[1][tied]).square().mean()
                self.log(f"{self.name}/tie_gap", gap)
                loss = loss + self.cfg.alignment_ties * gap
        else:
            plaus = [s.plausibility_score(batch[k]) for k in ("a", "b")]
            logits = torch.stack([align[0] + plaus[0], align[1] + plaus[1]], 1)
            loss = torch.nn.functional.cross_entropy(logits, target)
        if self.cfg.unnamed_invariance and self.trains != "plausibility":
            n = self.cfg.unnamed_rows or len(target)
            more = add_unnamed_object(batch["a"][:n], batch["named"][:n])
            moved = s.alignment_score(more, text[0][:n], text[1][:n])
            drift = torch.nn.functional.mse_loss(moved, align[0][:n])
            self.log(f"{self.name}/unnamed_drift", drift)
            loss = loss + self.cfg.unnamed_invariance * drift
        acc = (logits.argmax(1) == target)[scored].float().mean()
        self.log_dict({f"{self.name}/loss": loss, f"{self.name}/batch_acc": acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        c = self.cfg
        return warmup_cosine_adamw(self, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)


class _PairBatches(torch.utils.data.IterableDataset):
    """Batches of pairs as (image a, image b, text, choice), images by their judge
    reading, reshuffled each pass, without end (training stops at max_steps). A whole
    batch is indexed at once rather than pair by pair and collated."""

    def __init__(
        self,
        reading: torch.Tensor,
        a: np.ndarray,
        b: np.ndarray,
        text: np.ndarray,
        choice: np.ndarray,
        ids: torch.Tensor,
        named: torch.Tensor,
        batch_size: int,
        seed: int,
        tied: np.ndarray,
    ):
        self.reading, self.ids, self.batch_size, self.seed = reading, ids, batch_size, seed
        self.named = named
        self.pairs = torch.as_tensor(np.stack([a, b, text, choice, tied], 1))

    def __iter__(self):
        g, n, size = torch.Generator().manual_seed(self.seed), len(self.pairs), self.batch_size
        while True:
            order = torch.randperm(n, generator=g)
            for s in range(0, n - size + 1, size):
                a, b, text, choice, tied = self.pairs[order[s : s + size]].T
                yield {
                    "a": self.reading[a],
                    "b": self.reading[b],
                    "ids": self.ids[text],
                    "named": self.named[text],
                    "choice": choice,
                    "tied": tied.bool(),
                }


def train_scorer(
    pool: Pool,
    judge: WorldJudge,
    reading: torch.Tensor,
    cfg: PreferenceConfig,
    choice: np.ndarray,
    reprompted: Reprompted | None,
    reprompt_choice: np.ndarray | None,
    max_steps: int,
    logger: L.pytorch.loggers.Logger | None = None,
    u: UtilityConfig | None = None,
    first_steps: int | None = None,
) -> JudgeScorer:
    """A scorer trained on the pool's training pairs (train split, no held-out generator)
    with `choice` as the annotators' choices, and on the reprompted pairs if given;
    `reading`: every pool image as `read_cells` gives it; `u`: the utility those
    annotators hold (the pool's by default), which says the pairs alignment decides;
    `first_steps`: the alignment-first phase's steps (`cfg.alignment_first_steps` by
    default; then `max_steps` are the second phase's)."""
    u = u or pool.config.utility
    torch.manual_seed(cfg.seed)
    scorer = JudgeScorer(
        judge.net, judge.cfg.resolution, cfg.width, cfg.context_length, cfg.dropout
    )
    pr = pool.pairs
    train = np.flatnonzero((pr["split"] == "train") & ~pr["held_out"])
    # Text k of the table: the pool's prompt k, then the reprompted texts.
    texts = [p["text"] for p in pool.prompts]
    a, b, text, y = pr["a"][train], pr["b"][train], pr["prompt"][train], choice[train]
    t = [terms(x, u.error_cap) for x in pool.labels]
    pair = np.stack([a, b], 1)
    alignment = np.array([x["alignment"] for x in t])[pair]  # (pairs, 2), as composition
    composition = np.array([x["composition"] for x in t])[pair]
    if reprompted is not None:
        a, b = np.concatenate([a, reprompted.a]), np.concatenate([b, reprompted.b])
        text = np.concatenate([text, reprompted.prompt + len(texts)])
        y = np.concatenate([y, reprompt_choice])
        texts = texts + reprompted.texts
        alignment = np.concatenate([alignment, reprompted.alignment])
        composition = np.concatenate([composition, reprompted.composition])
    # Per pair, what alignment's terms add to U.
    asked = u.w_alignment * alignment + u.w_composition * composition
    if len(a) == 0:
        raise ValueError(
            "no training pairs: the pool has no train-split pairs between generators that "
            "are not held out, and reprompt_pairs is 0"
        )
    ids, named = scorer.token_ids(texts), named_shapes(texts)
    tied = asked[:, 0] == asked[:, 1]

    def fit(keep: np.ndarray, steps: int, trains: str) -> None:
        size = min(cfg.batch_size, int(keep.sum()))
        rows = (a[keep], b[keep], text[keep], y[keep])
        data = _PairBatches(reading, *rows, ids, named, size, cfg.seed, tied[keep])
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        step_cfg = PreferenceConfig(**{**asdict(cfg), "max_steps": steps})
        fine_tune_trainer(steps, logger).fit(PreferenceModule(scorer, step_cfg, trains), loader)

    everything = np.ones(len(a), dtype=bool)
    first_steps = cfg.alignment_first_steps if first_steps is None else first_steps
    if first_steps:
        if tied.all() and not cfg.alignment_ties:
            raise ValueError(
                "alignment_first_steps: no training pair holds its prompt differently, and "
                "alignment_ties is 0: the alignment term has nothing to learn from"
            )
        fit(everything if cfg.alignment_ties else ~tied, first_steps, "alignment")
        fit(everything, max_steps, "plausibility")
    else:
        fit(everything, max_steps, "both")
    return scorer.cpu().eval()


def image_scores(scorer: JudgeScorer, pool: Pool) -> np.ndarray:
    """Every pool image's score against its prompt."""
    return scorer.preference(pool.images, pool.texts)


def clip_scores(reference_clip: Path, pool: Pool) -> np.ndarray:
    """The baseline: every pool image's reference-CLIP cosine with its prompt."""
    return load_reference_clip(reference_clip).score(pool.images, pool.texts) / 100.0


def evaluate_scores(scores: np.ndarray, pool: Pool, utilities: np.ndarray) -> dict:
    """Every measure on the test prompts, by pair set."""
    pr, terms_of = pool.pairs, [terms(x, pool.config.utility.error_cap) for x in pool.labels]
    a, b = pr["a"], pr["b"]
    align = np.array([t["alignment"] for t in terms_of])
    comp = np.array([t["composition"] for t in terms_of])
    test = pr["split"] == "test"
    sets = {
        "test": test & ~pr["held_out"],
        "held_out_generators": test & _both_held_out(pool),
        "alignment_decides": test & ~pr["held_out"] & (align[a] != align[b]),
        "plausibility_only": test & ~pr["held_out"] & (align[a] == align[b]) & (comp[a] == comp[b]),
    }
    out = {}
    for name, mask in sets.items():
        if not mask.any():
            out[name] = {"pairs": 0}
            continue
        ia, ib = a[mask], b[mask]
        images = np.unique(np.concatenate([ia, ib]))
        prompt_of = np.array([pool.labels[i]["prompt"] for i in images])
        out[name] = {
            "pairs": int(mask.sum()),
            "agreement": M.pair_agreement(scores[ia], scores[ib], pr["p"][mask]),
            "ceiling": bayes_ceiling(pr["p"][mask]),
            "choice_accuracy": M.choice_accuracy(scores[ia], scores[ib], pr["choice"][mask]),
            "ranking_agreement": M.ranking_agreement(scores[images], utilities[images], prompt_of),
            "spearman": M.spearman(scores[images], utilities[images], prompt_of),
        }
    return out


def generator_table(scores: np.ndarray, pool: Pool, utilities: np.ndarray) -> list[dict]:
    """Per generator, on the test prompts: mean preference score, mean utility and the
    share of images that pass every condition, best first (HPS v2's benchmark table)."""
    test = {i for i, r in enumerate(pool.labels) if pool.split_of(r["prompt"]) == "test"}
    rows = []
    for gen in dict.fromkeys(r["generator"] for r in pool.labels):
        idx = [i for i in test if pool.labels[i]["generator"] == gen]
        rows.append(
            {
                "generator": gen,
                "images": len(idx),
                "preference": float(np.mean(scores[idx])),
                "utility": float(np.mean(utilities[idx])),
                "all_conditions": float(np.mean([all(pool.labels[i]["conditions"]) for i in idx])),
            }
        )
    return sorted(rows, key=lambda r: -r["preference"])


def best_of_n(
    scores: np.ndarray, pool: Pool, utilities: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict:
    """Best of N by preference score against a random pick, on the test prompts: per
    (prompt, generator), the N samples of the pool; the random pick's value is the exact
    mean over the N. Intervals: a bootstrap over prompts of the paired difference."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, r in enumerate(pool.labels):
        if pool.split_of(r["prompt"]) == "test":
            groups.setdefault((r["prompt"], r["generator"]), []).append(i)
    n = pool.config.images_per_generator
    if n < 2:
        return {"n": n, "skipped": "best-of-N needs feedback_pool.images_per_generator >= 2"}
    passed = np.array([float(all(r["conditions"])) for r in pool.labels])
    keys = sorted(groups)
    chosen = np.array([max(groups[k], key=lambda i: scores[i]) for k in keys])
    prompt_of = np.array([k[0] for k in keys])
    out = {"n": n, "groups": len(keys)}
    for name, value in (("all_conditions", passed), ("utility", utilities)):
        best = value[chosen]
        random = np.array([value[groups[k]].mean() for k in keys])
        low, high = _paired_interval(best - random, prompt_of, n_boot, seed)
        out[name] = {
            "best_of_n": float(best.mean()),
            "random": float(random.mean()),
            "difference": float((best - random).mean()),
            "low": low,
            "high": high,
        }
    return out


def _paired_interval(
    diff: np.ndarray, prompt_of: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float]:
    """95% bootstrap interval of the mean difference, resampling prompts."""
    prompts = np.unique(prompt_of)
    per_prompt = np.array([diff[prompt_of == q].mean() for q in prompts])
    rng = np.random.default_rng(seed)
    means = per_prompt[rng.integers(0, len(prompts), (n_boot, len(prompts)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _both_held_out(pool: Pool) -> np.ndarray:
    pats = pool.config.held_out_generators
    per_gen = {g: held_out(g, pats) for g in {x["generator"] for x in pool.labels}}
    per_image = np.array([per_gen[x["generator"]] for x in pool.labels])
    return per_image[pool.pairs["a"]] & per_image[pool.pairs["b"]]


def ablated_choices(pool: Pool, term: str, seed: int) -> np.ndarray:
    """The choices of annotators as noisy as the pool's (the same tau) who do not value
    `term`. Without plausibility most pairs tie and are coin flips: no tau would bring
    those annotators to HPD v2's agreement."""
    cfg = pool.config.utility.without(term)
    u = np.array([utility(x, cfg) for x in pool.labels])
    p = choice_probability(u[pool.pairs["a"]], u[pool.pairs["b"]], pool.tau)
    return annotate(p, seed)


def train_preference(
    cfg: PreferenceConfig,
    pool_dir: Path,
    reference_clip: Path,
    judge_dir: Path,
    out: Path,
    logger: L.pytorch.loggers.Logger | None = None,
) -> dict:
    t0 = time.time()
    pool = load_pool(pool_dir)
    utilities = np.array([utility(x, pool.config.utility) for x in pool.labels])
    baseline = clip_scores(reference_clip, pool)
    judge = load_judge(judge_dir)
    reading = read_cells(judge.net, judge.cfg.resolution, pool.images)
    # The eval suite's prompts stay unseen too: the report scores its images.
    reprompted = (
        reprompted_pairs(
            pool,
            cfg.reprompt_pairs,
            cfg.reprompt_per_category,
            cfg.seed,
            load_suite(),
            cfg.reprompt_alike_share,
        )
        if cfg.reprompt_pairs
        else None
    )

    def train(u: UtilityConfig, choice: np.ndarray, steps: int, first: int, log=None):
        more = reprompted.choices(pool, u, cfg.seed + 1) if reprompted else None
        args = (choice, reprompted, more, steps, log, u, first)
        return train_scorer(pool, judge, reading, cfg, *args)

    first = cfg.alignment_first_steps
    scorer = train(pool.config.utility, pool.pairs["choice"], cfg.max_steps, first, logger)
    scores = image_scores(scorer, pool)
    metrics = {
        "preference_model": evaluate_scores(scores, pool, utilities),
        "clip_score_baseline": evaluate_scores(baseline, pool, utilities),
        "generators": generator_table(scores, pool, utilities),
        "best_of_n": best_of_n(scores, pool, utilities, seed=cfg.seed),
        "best_of_n_clip_score": best_of_n(baseline, pool, utilities, seed=cfg.seed),
        "reprompted": {
            "pairs": len(reprompted.a) if reprompted else 0,
            "prompts": len(reprompted.texts) if reprompted else 0,
        },
        "ablations": {},
    }
    if cfg.ablate_terms:
        for term in TERMS:
            choice = ablated_choices(pool, term, cfg.seed)
            steps = cfg.ablation_steps  # for each phase, where alignment trains first
            ablated = train(pool.config.utility.without(term), choice, steps, first and steps)
            # Judged against the full utility's annotators: what reading `term` adds.
            metrics["ablations"][f"without_{term}"] = evaluate_scores(
                image_scores(ablated, pool), pool, utilities
            )
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics["config"] = asdict(cfg)
    save_preference_model(scorer, judge.cfg, out, metrics)
    return metrics


def save_preference_model(
    scorer: JudgeScorer, judge_cfg: JudgeConfig, out: Path, metrics: dict
) -> None:
    """Written aside and swapped in whole: no file of an earlier model is left behind."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_scorer(scorer, judge_cfg, tmp)
    write_text_atomic(tmp / "metrics.json", json.dumps(metrics, indent=2))
    replace_dir(tmp, out)


def load_preference_model(path: Path) -> JudgeScorer:
    """The trained scorer; `.preference(images, texts)` scores images against texts."""
    return load_scorer(path)


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--reference-clip", type=Path, required=True)
    ap.add_argument("--judge", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, PreferenceConfig)
    args = ap.parse_args()
    cfg = config_from_args(PreferenceConfig, args, "preference_model")
    metrics = train_preference(cfg, args.pool, args.reference_clip, args.judge, args.out)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
