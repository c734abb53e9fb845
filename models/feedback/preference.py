"""The preference model: a CLIP-style scorer trained on the pool's pairs, HPS v2's way.

score(image, prompt) = cosine(image features, text features), compared only between
images of one prompt. Training: for a pair (a, b) of one prompt and the annotator's
choice, a 2-way softmax cross-entropy over logit_scale * (score_a, score_b) (the HPS v2 and
PickScore loss). Both towers start from the reference CLIP, which also gives the
CLIP-score-only baseline every number is shown against.

    python -m models.feedback.preference --params params.yaml --pool data/feedback_pool \
        --reference-clip data/reference_clip --out data/preference_model

Measured on the test prompts (`models/feedback/metrics.py`): agreement with the
annotators against the exact ceiling, ranking agreement and Spearman with the utility,
the same on pairs drawn only from held-out generators, on pairs that only plausibility
or only alignment decides, and, with each utility term removed in turn, the model
trained on what those annotators chose.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from corpus.atomic import write_text_atomic
from corpus.config import build_config
from models.common.clip import clip_preprocess_cfg, save_clip, warmup_cosine_adamw
from models.common.data import normalize_images
from models.evaluation.reference_clip import ReferenceClip, load_reference_clip
from models.feedback import metrics as M
from models.feedback.pool import Pool, held_out, load_pool
from models.feedback.trainer import fine_tune_trainer
from models.feedback.utility import (
    TERMS,
    annotate,
    bayes_ceiling,
    choice_probability,
    terms,
    utility,
)


@dataclass(frozen=True)
class PreferenceConfig:
    max_steps: int = 600
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    ablate_terms: bool = True  # also train one model per utility term left out
    ablation_steps: int = 300
    max_gap: float = 0.03  # the asset check: held-out agreement this close to the ceiling
    seed: int = 6_000_053

    @classmethod
    def from_dict(cls, d: dict) -> PreferenceConfig:
        return build_config(cls, d, "preference_model")


class PreferenceModule(L.LightningModule):
    def __init__(self, clip: ReferenceClip, cfg: PreferenceConfig):
        super().__init__()
        self.model, self.cfg = clip.model.train(), cfg
        self.image_size, self.mean, self.std = clip_preprocess_cfg(self.model)

    def scores(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        x = normalize_images(images, self.image_size, self.mean, self.std)
        img = self.model.encode_image(x, normalize=True)
        txt = self.model.encode_text(text_ids, normalize=True)
        return (img * txt).sum(-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        s_a = self.scores(batch["a"], batch["text"])
        s_b = self.scores(batch["b"], batch["text"])
        logits = self.model.logit_scale.exp() * torch.stack([s_a, s_b], 1)
        target = 1 - batch["choice"]  # column 0 is a
        loss = torch.nn.functional.cross_entropy(logits, target)
        acc = (logits.argmax(1) == target).float().mean()
        self.log_dict({"preference/loss": loss, "preference/batch_acc": acc}, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, 4.6052)

    def configure_optimizers(self):
        c = self.cfg
        return warmup_cosine_adamw(self, c.lr, c.weight_decay, c.warmup_steps, c.max_steps)


class _PairData(torch.utils.data.Dataset):
    def __init__(self, pool: Pool, index: np.ndarray, choice: np.ndarray, text_ids: torch.Tensor):
        self.pool, self.index, self.choice, self.text_ids = pool, index, choice, text_ids

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i = self.index[k]
        a, b = int(self.pool.pairs["a"][i]), int(self.pool.pairs["b"][i])
        return {
            "a": self.pool.images[a],
            "b": self.pool.images[b],
            "text": self.text_ids[a],
            "choice": int(self.choice[k]),
        }


def train_scorer(
    pool: Pool,
    reference_clip: Path,
    cfg: PreferenceConfig,
    choice: np.ndarray,
    max_steps: int,
    logger: L.pytorch.loggers.Logger | None = None,
) -> ReferenceClip:
    """A preference model fine-tuned from the reference CLIP on the training pairs (train
    split, no held-out generator), with `choice` as the annotators' choices."""
    torch.manual_seed(cfg.seed)
    clip = load_reference_clip(reference_clip)
    train = np.flatnonzero((pool.pairs["split"] == "train") & ~pool.pairs["held_out"])
    text_ids = clip.tokenizer(pool.texts)
    loader = torch.utils.data.DataLoader(
        _PairData(pool, train, choice[train], text_ids),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
    )
    module = PreferenceModule(clip, PreferenceConfig(**{**asdict(cfg), "max_steps": max_steps}))
    fine_tune_trainer(max_steps, logger).fit(module, loader)
    return ReferenceClip(module.model.cpu().eval(), clip.model_name)


def image_scores(scorer: ReferenceClip, pool: Pool) -> np.ndarray:
    """Every pool image's score against its prompt, as a cosine."""
    return scorer.score(pool.images, pool.texts) / 100.0


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
    out: Path,
    logger: L.pytorch.loggers.Logger | None = None,
) -> dict:
    t0 = time.time()
    pool = load_pool(pool_dir)
    utilities = np.array([utility(x, pool.config.utility) for x in pool.labels])
    baseline = image_scores(load_reference_clip(reference_clip), pool)
    scorer = train_scorer(pool, reference_clip, cfg, pool.pairs["choice"], cfg.max_steps, logger)
    scores = image_scores(scorer, pool)
    metrics = {
        "preference_model": evaluate_scores(scores, pool, utilities),
        "clip_score_baseline": evaluate_scores(baseline, pool, utilities),
        "generators": generator_table(scores, pool, utilities),
        "best_of_n": best_of_n(scores, pool, utilities, seed=cfg.seed),
        "best_of_n_clip_score": best_of_n(baseline, pool, utilities, seed=cfg.seed),
        "ablations": {},
    }
    if cfg.ablate_terms:
        for term in TERMS:
            choice = ablated_choices(pool, term, cfg.seed)
            ablated = train_scorer(pool, reference_clip, cfg, choice, cfg.ablation_steps)
            # Judged against the full utility's annotators: what reading `term` adds.
            metrics["ablations"][f"without_{term}"] = evaluate_scores(
                image_scores(ablated, pool), pool, utilities
            )
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics["config"] = asdict(cfg)
    save_preference_model(scorer, out, metrics)
    return metrics


def save_preference_model(scorer: ReferenceClip, out: Path, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_clip(scorer.model, scorer.model_name, out)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))


def load_preference_model(path: Path) -> ReferenceClip:
    """The trained scorer; `.score(images, texts) / 100` is its cosine."""
    return load_reference_clip(path)


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--reference-clip", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, PreferenceConfig)
    args = ap.parse_args()
    cfg = config_from_args(PreferenceConfig, args, "preference_model")
    metrics = train_preference(cfg, args.pool, args.reference_clip, args.out)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
