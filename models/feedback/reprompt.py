"""Reprompted pairs: the pool's training images shown to the same annotators under prompts
they were not drawn for.

The pool's training prompts are few (`prompts_per_category` per category, less the
validation and test share), and a scorer that must learn what a prompt asks learns those
prompts instead. An image's labels hold the scene the judge reads and how clean each cell
is, so its utility under any other prompt is exact too (the conditions that prompt's text
states, on the same scene; the same plausibility). These pairs add prompts, not images:
new prompts of the suite's categories, drawn from a seed of their own. None asks for the
same conditions as a prompt kept out (the pool's validation and test prompts, the eval
suite's), so those stay unseen. Half of the first images of each pair are among those
that follow the prompt best, or almost every pair would be two images that both ignore it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from corpus.prompt_suite import FORMS, Prompt, build_suite, condition_holds, stated_conditions
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


def kept_out_prompts(pool: Pool) -> list[Prompt]:
    """The pool's validation and test prompts."""
    return [Prompt.from_dict(p["prompt"]) for p in pool.prompts if p["split"] != "train"]


def new_prompts(
    per_category: int, seed: int, kept_out: Iterable[Prompt]
) -> list[tuple[Prompt, str]]:
    """Suite prompts, each with a random form, none asking for the conditions of a
    kept-out one."""
    unseen = {frozenset(p.conditions) for p in kept_out}
    rng = random.Random(seed)
    out = []
    for p in build_suite(per_category, seed=seed):
        form = rng.choice(FORMS)
        if frozenset(p.conditions) not in unseen:
            out.append((p, form))
    return out


def reprompted_pairs(
    pool: Pool,
    n_pairs: int,
    per_category: int,
    seed: int,
    kept_out: Iterable[Prompt] = (),
    alike_share: float = 0.0,
) -> Reprompted:
    """`n_pairs` pairs of training images under new prompts; `kept_out` (besides the pool's
    validation and test prompts): prompts whose conditions no new prompt may ask for."""
    prompts = new_prompts(per_category, seed, [*kept_out_prompts(pool), *kept_out])
    images = training_images(pool)
    if not prompts or len(images) < 2:
        raise ValueError("reprompted pairs need new prompts and at least two training images")
    scenes = [Scene.from_dict(pool.labels[i]["scene"]) for i in images]
    align, whole = [], []  # (prompts, images): share of the conditions held; all held
    for p, form in prompts:
        conds = stated_conditions(p, form)  # once per prompt, not per image
        held = np.array([[condition_holds(c, s) for c in conds] for s in scenes])
        align.append(held.mean(1))
        whole.append(held.all(1))
    align, whole = np.stack(align), np.stack(whole).astype(float)
    rng = np.random.default_rng(seed)
    q = rng.integers(0, len(prompts), n_pairs)
    b = rng.integers(0, len(images), n_pairs)
    a = rng.integers(0, len(images), n_pairs)

    def follows_best(k: int) -> int:
        return rng.choice(np.flatnonzero(align[q[k]] >= align[q[k]].max()))

    best = rng.random(n_pairs) < 0.5
    for k in np.flatnonzero(best):
        a[k] = follows_best(k)
    # Pairs that hold the prompt alike (same share of conditions, both or neither whole):
    # only plausibility tells them apart, so the alignment term learns to say nothing.
    # Both images follow the prompt as well as any does, as two images drawn for a prompt
    # mostly do; two that ignore it would teach nothing about the extras a scene can hold.
    alike_pairs = np.flatnonzero(rng.random(n_pairs) < alike_share) if alike_share else []
    for k in alike_pairs:
        if not best[k]:
            a[k] = follows_best(k)
        row_a, row_w = align[q[k]], whole[q[k]]
        alike = np.flatnonzero((row_a == row_a[a[k]]) & (row_w == row_w[a[k]]))
        alike = alike[alike != a[k]]
        if len(alike):
            b[k] = rng.choice(alike)
    same = a == b  # an image against itself teaches nothing
    while same.any():
        b[same] = rng.integers(0, len(images), int(same.sum()))
        same = a == b
    return Reprompted(
        texts=[p.text(form) for p, form in prompts],
        a=images[a],
        b=images[b],
        prompt=q,
        alignment=np.stack([align[q, a], align[q, b]], 1),
        composition=np.stack([whole[q, a], whole[q, b]], 1),
    )
