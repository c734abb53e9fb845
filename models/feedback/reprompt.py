"""Reprompted pairs: the pool's training images shown to the same annotators under prompts
they were not drawn for.

The pool has about a hundred training prompts. A scorer that must learn what a prompt
asks cannot learn it from a hundred texts: it learns those prompts. An image's labels
hold the scene the judge reads and how clean each cell is, so its utility under any other
prompt is exact too (that prompt's conditions on the same scene, the same plausibility).
These pairs add prompts, not images: new prompts of the suite's categories, drawn from a
seed of their own, never a validation or test prompt's text. Half of the first images of
each pair are among those that follow the prompt best, or almost every pair would be two
images that both ignore it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from corpus.prompt_suite import FORMS, Prompt, build_suite, condition_holds
from corpus.world import Scene
from models.feedback.pool import Pool, held_out
from models.feedback.utility import UtilityConfig, annotate, choice_probability, terms


@dataclass
class Reprompted:
    texts: list[str]  # the new prompts
    a: np.ndarray  # pool image indices
    b: np.ndarray
    prompt: np.ndarray  # index into texts
    alignment: np.ndarray  # (n, 2): share of the prompt's conditions held by a and b
    composition: np.ndarray  # (n, 2): 1 where every condition holds

    def choices(self, pool: Pool, cfg: UtilityConfig, seed: int) -> np.ndarray:
        """One annotator's choice per pair (1: a), as noisy as the pool's annotators."""
        plaus = np.array([terms(x, cfg.error_cap)["plausibility"] for x in pool.labels])
        u = (
            cfg.w_alignment * self.alignment
            + cfg.w_plausibility * np.stack([plaus[self.a], plaus[self.b]], 1)
            + cfg.w_composition * self.composition
        )
        return annotate(choice_probability(u[:, 0], u[:, 1], pool.tau), seed)


def training_images(pool: Pool) -> np.ndarray:
    """Images of training prompts from generators not held out."""
    pats = pool.config.held_out_generators
    return np.array(
        [
            i
            for i, x in enumerate(pool.labels)
            if pool.split_of(x["prompt"]) == "train" and not held_out(x["generator"], pats)
        ],
        dtype=np.int64,
    )


def new_prompts(pool: Pool, per_category: int, seed: int) -> list[tuple[Prompt, str]]:
    """Suite prompts in a random form, none with the text of a validation or test prompt."""
    kept_out = {p["text"] for p in pool.prompts if p["split"] != "train"}
    rng = random.Random(seed)
    out = []
    for p in build_suite(per_category, seed=seed):
        text = p.text(rng.choice(FORMS))
        if text not in kept_out:
            out.append((p, text))
    return out


def reprompted_pairs(pool: Pool, n_pairs: int, per_category: int, seed: int) -> Reprompted:
    prompts = new_prompts(pool, per_category, seed)
    images = training_images(pool)
    if not prompts or len(images) < 2:
        raise ValueError("reprompted pairs need new prompts and at least two training images")
    scenes = [Scene.from_dict(pool.labels[i]["scene"]) for i in images]
    held = [[[condition_holds(c, s) for c in p.conditions] for s in scenes] for p, _ in prompts]
    align = np.array([[np.mean(h) for h in row] for row in held])  # (prompts, images)
    whole = np.array([[float(all(h)) for h in row] for row in held])
    rng = np.random.default_rng(seed)
    q = rng.integers(0, len(prompts), n_pairs)
    b = rng.integers(0, len(images), n_pairs)
    a = rng.integers(0, len(images), n_pairs)
    best = rng.random(n_pairs) < 0.5
    for k in np.flatnonzero(best):
        top = np.flatnonzero(align[q[k]] >= align[q[k]].max())
        a[k] = rng.choice(top)
    return Reprompted(
        texts=[t for _, t in prompts],
        a=images[a],
        b=images[b],
        prompt=q,
        alignment=np.stack([align[q, a], align[q, b]], 1),
        composition=np.stack([whole[q, a], whole[q, b]], 1),
    )
