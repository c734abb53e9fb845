"""The feedback pool: images of the same prompts from several generators, each labelled
exactly by the world, and pairs of them chosen by simulated annotators.

HPD v2 pairs images of one prompt from about ten generators. Here a generator is a
trained text-to-image folder (what `diffusion_model` exports, or a caption-ablation
run's), its EMA or raw weights, and a guidance scale; each draws `images_per_generator`
images of every prompt. Prompts are the prompt suite's categories drawn from a seed of
their own (never the eval suite's), each in one form (short or descriptive) picked at
random, and split by prompt into train / val / test. Generators matching
`held_out_generators` are kept out of training: the "new generator" rows.

Drawn by `models/feedback/build_pool.py`. Files: `prompts.json`; per generator
`generators/<slug>.safetensors` (uint8 images, sample by sample: image i shows prompt
i mod P, its sample i div P) and `generators/<slug>.jsonl` (labels, same order);
`pairs.jsonl` (every pair of images of one prompt, with both utilities, the choice
probability and one annotator's choice); `pool.json` (config, tau, agreement, counts).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from corpus.config import build_config
from corpus.prompt_suite import FORMS, build_suite
from models.feedback.utility import (
    UtilityConfig,
    annotate,
    annotator_agreement,
    bayes_ceiling,
    choice_probability,
    fit_tau,
    utility,
)

SPLITS = ("train", "val", "test")
TUPLES = ("models", "weights", "guidance_scales", "held_out_generators", "utility")


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: str  # an exported text-to-image folder
    checkpoints: str | None = None  # its training checkpoints: where "raw" weights come from


@dataclass(frozen=True)
class PoolConfig:
    models: tuple[ModelSource, ...] = (
        ModelSource("default", "data/diffusion_model", "data/work/diffusion_model/checkpoints"),
    )
    weights: tuple[str, ...] = ("ema", "raw")
    guidance_scales: tuple[float, ...] = (1.0, 3.0, 6.0)
    images_per_generator: int = 2
    prompts_per_category: int = 40
    val_share: float = 0.1
    test_share: float = 0.25
    held_out_generators: tuple[str, ...] = ("*/g1",)
    sampling_steps: int = 20
    batch_size: int = 128
    utility: UtilityConfig = field(default_factory=UtilityConfig)
    seed: int = 6_000_047  # apart from the corpus, the judge, the CLIP and the suite

    def __post_init__(self) -> None:
        bad = set(self.weights) - {"ema", "raw"}
        if bad:
            raise ValueError(f"feedback_pool.weights: {sorted(bad)} not in ['ema', 'raw']")
        if not (
            self.val_share >= 0 and self.test_share > 0 and self.val_share + self.test_share < 1
        ):
            raise ValueError(
                "feedback_pool: test_share must be above 0, val_share at least 0, "
                "and the two below 1 together"
            )

    @classmethod
    def from_dict(cls, d: dict) -> PoolConfig:
        return build_config(cls, d, "feedback_pool")


@dataclass(frozen=True)
class Generator:
    source: ModelSource
    weights: str
    guidance_scale: float

    @property
    def name(self) -> str:
        return f"{self.source.name}/{self.weights}/g{self.guidance_scale:g}"

    @property
    def slug(self) -> str:
        return self.name.replace("/", "__")


def generators(cfg: PoolConfig) -> list[Generator]:
    return [
        Generator(m, w, g)
        for m, w, g in itertools.product(cfg.models, cfg.weights, cfg.guidance_scales)
    ]


def held_out(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def pool_prompts(cfg: PoolConfig) -> list[dict]:
    """The pool's prompts: each with the form it is shown in and its split."""
    rng = random.Random(cfg.seed)
    rows = []
    for p in build_suite(cfg.prompts_per_category, seed=cfg.seed):
        form = rng.choice(FORMS)
        u = rng.random()
        split = (
            "test"
            if u < cfg.test_share
            else "val"
            if u < cfg.test_share + cfg.val_share
            else "train"
        )
        rows.append({"prompt": p.to_dict(), "form": form, "text": p.text(form), "split": split})
    return rows


def read_labels(out: Path, gens: list[Generator]) -> list[dict]:
    """Every image of the pool: its generator, prompt, sample and labels."""
    rows = []
    for gen in gens:
        with (out / "generators" / f"{gen.slug}.jsonl").open() as f:
            next(f)
            rows += [{"generator": gen.name, **json.loads(line)} for line in f]
    return rows


def annotate_pairs(
    images: list[dict], prompts: list[dict], cfg: PoolConfig
) -> tuple[list[dict], dict]:
    """Every pair of images of one prompt, with its utilities and annotator's choice;
    tau fitted on all pairs so that annotators agree as often as HPD v2's."""
    for im in images:
        im["utility"] = utility(im, cfg.utility)
    by_prompt: dict[int, list[int]] = {}
    for i, im in enumerate(images):
        by_prompt.setdefault(im["prompt"], []).append(i)
    a_idx, b_idx = [], []
    for members in by_prompt.values():
        for a, b in itertools.combinations(members, 2):
            a_idx.append(a)
            b_idx.append(b)
    u = np.array([im["utility"] for im in images])
    delta = u[a_idx] - u[b_idx]
    tau = fit_tau(delta, cfg.utility.human_agreement)
    p = choice_probability(delta, 0.0, tau)
    choice = annotate(p, cfg.seed)
    pairs = []
    for k, (a, b) in enumerate(zip(a_idx, b_idx, strict=True)):
        ga, gb = images[a]["generator"], images[b]["generator"]
        pairs.append(
            {
                "a": a,
                "b": b,
                "prompt": images[a]["prompt"],
                "split": prompts[images[a]["prompt"]]["split"],
                "held_out": held_out(ga, cfg.held_out_generators)
                or held_out(gb, cfg.held_out_generators),
                "u_a": round(float(u[a]), 6),
                "u_b": round(float(u[b]), 6),
                "p": round(float(p[k]), 6),
                "choice": int(choice[k]),
            }
        )
    summary = {
        "tau": tau,
        "pairs": len(pairs),
        "annotator_agreement": annotator_agreement(p),
        "bayes_ceiling": bayes_ceiling(p),
        "equal_utility_pairs": int(np.sum(delta == 0)),
    }
    return pairs, summary


@dataclass
class Pool:
    """The pool as training reads it: every image, its labels, and the pairs."""

    images: torch.Tensor  # uint8 (N, 3, H, W), in read_labels order
    labels: list[dict]
    texts: list[str]  # per image, its prompt's text
    pairs: dict[str, np.ndarray]  # a, b, prompt, p, choice, split, held_out columns
    prompts: list[dict]  # prompts.json: per prompt, the suite prompt, its form, text, split
    tau: float  # the annotators' noise (pool.json)
    config: PoolConfig = field(default_factory=PoolConfig)

    @property
    def splits(self) -> list[str]:
        return [r["split"] for r in self.prompts]

    def split_of(self, prompt: int) -> str:
        return self.prompts[prompt]["split"]


def load_pool(path: Path) -> Pool:
    path = Path(path)
    summary = json.loads((path / "pool.json").read_text())
    cfg = PoolConfig.from_dict(summary["config"])
    gens = generators(cfg)
    labels = read_labels(path, gens)
    images = torch.cat(
        [load_file(str(path / "generators" / f"{g.slug}.safetensors"))["images"] for g in gens]
    )
    prompts = json.loads((path / "prompts.json").read_text())
    texts = [prompts[row["prompt"]]["text"] for row in labels]
    rows = [json.loads(line) for line in (path / "pairs.jsonl").read_text().splitlines()]
    pairs = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return Pool(images, labels, texts, pairs, prompts, summary["tau"], cfg)
