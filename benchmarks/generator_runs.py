"""Scratch runs of the generator without the rest of the lineage (docs/log/2026-12-generator.md).

`oracle` writes a recaptioned dataset whose captions are the world's ground truth (what a
perfect captioner writes) and its mixed sampler, so a diffusion model trains without the
hour of recaptioning. `follow` samples the prompt suite from a trained model and scores
it as the eval report does (all conditions per category and form, attribute accuracy,
failure reasons), without the reference CLIP:

    python -m benchmarks.generator_runs oracle --raw data/raw --out data/oracle  # --max-objects 1
    python -m models.diffusion.train --params run.yaml --raw data/raw \
        --sampler data/oracle/mixed_sampler --autoencoder data/autoencoder --out data/exp/run
    python -m benchmarks.generator_runs follow --model data/exp/run --judge data/world_judge

`follow` writes its grids and scores to `--out` (default `data/exp/follow/<model folder's
name>`), never into the model's folder: `data/diffusion_model` is a DVC output, and a file
added there stales every step after it.

`cells` asks, for the descriptive form, what stands in each cell the prompt fills: its
object, another object of the prompt (the two swapped), or nothing, and how many objects
stand in cells the prompt leaves empty.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from corpus.caption_mix import MixConfig, build_mixed_sampler
from corpus.params import load_section
from corpus.prompt_suite import CATEGORIES, FORMS, diagnose, judge_prompt, load_suite
from corpus.scene_text import descriptive_caption, short_caption
from corpus.shards import read_json_sidecars
from corpus.world import Scene
from models.diffusion.autoencoder import image_grid
from models.diffusion.text_to_image import load_text_to_image
from models.evaluation.report import drawn_objects, summarise_diagnoses
from models.evaluation.world_judge import load_judge


def oracle(raw: Path, out: Path, params: Path, max_objects: int | None = None) -> None:
    """Ground-truth captions of `raw` (of its scenes with at most `max_objects` objects)."""
    index = pd.read_parquet(raw / "index.parquet")
    rows = []
    for shard, group in index.groupby("shard"):
        meta = read_json_sidecars(raw / f"{shard}.tar", set(group["key"]))
        for r in group.itertuples():
            scene = Scene.from_dict(meta[r.key]["scene"])
            if max_objects and len(scene.objects) > max_objects:
                continue
            rows.append(
                {
                    "key": r.key,
                    "shard": r.shard,
                    "split": r.split,
                    "alt_text": r.alt_text,
                    "short_caption": short_caption(scene),
                    "descriptive_caption": descriptive_caption(scene, random.Random(r.key)),
                }
            )
    (out / "recaptioned").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "recaptioned" / "oracle.parquet")
    cfg = MixConfig.from_dict(load_section(params, "mixed_sampler"))
    build_mixed_sampler(out / "recaptioned", out / "mixed_sampler", cfg)
    print(f"{len(rows)} ground-truth captions; sampler in {out / 'mixed_sampler'}")


def follow(
    model: Path,
    judge_dir: Path,
    images_per_prompt: int = 4,
    spacing: str | None = None,
    guidance: float | None = None,
    sampling: dict | None = None,
    out: Path | None = None,
) -> dict:
    """All-conditions and attribute scores of the suite's prompts; `sampling` overrides
    the model's exported sampling settings (`diffusion_model.eval`: clip_sample, ...);
    grids and scores go to `out` (default: `data/exp/follow/<model folder's name>`)."""
    out = out or Path("data/exp/follow") / model.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_suite(Path("prompts/suite-v1.json"))
    pipe = load_text_to_image(model)
    if spacing:
        pipe.eval_cfg["spacing"] = spacing
    pipe.eval_cfg.update(sampling or {})
    tag = "_".join(f"{k}{v}" for k, v in sorted((sampling or {}).items()))
    judge = load_judge(judge_dir)
    result = {}
    for form in FORMS:
        texts = [p.text(form) for p in prompts for _ in range(images_per_prompt)]
        t = time.time()
        with torch.inference_mode():
            images = pipe(texts, seed=0, guidance_scale=guidance)
        scenes = judge.predict(images)
        owner = [prompts[i // images_per_prompt] for i in range(len(texts))]
        pairs = list(zip(owner, scenes, strict=True))
        passed = np.array([judge_prompt(p, s)["passed"] for p, s in pairs])
        per_prompt = passed.reshape(len(prompts), images_per_prompt).mean(1)
        cats = {c: float(per_prompt[[p.category == c for p in prompts]].mean()) for c in CATEGORIES}
        diagnoses = [diagnose(p, s, form) for p, s in pairs]
        result[form] = {
            "prompt_following": {**cats, "overall": float(np.mean(list(cats.values())))},
            **summarise_diagnoses(diagnoses),
            "drawn": drawn_objects(owner, scenes),
            "seconds": round(time.time() - t, 1),
        }
        grid = image_grid(images[: 16 * images_per_prompt], nrow=4 * images_per_prompt, scale=3)
        grid.save(out / f"follow_{form}_{pipe.eval_cfg.get('spacing', 'leading')}.png")
    name = f"follow_{pipe.eval_cfg.get('spacing', 'leading')}_{guidance or 'default'}{tag}.json"
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    return result


@torch.no_grad()
def denoise_once(model: Path, raw: Path, n: int = 64) -> dict[int, float]:
    """RMS error ([-1, 1] pixels) of the model's x0 estimate from one step, per noise
    level t, on `n` held-out images noised with a fixed seed (empty caption)."""
    from models.common.data import load_images
    from models.diffusion.autoencoder import to_model_range
    from models.diffusion.model import noise_scheduler

    pipe = load_text_to_image(model)
    rows = pd.read_parquet(raw / "index.parquet").query("split == 'eval'").head(n)
    x = to_model_range(load_images(raw, rows["key"].tolist(), rows["shard"].tolist(), 32))
    scale = pipe.vae.config.scaling_factor
    z = pipe.vae.encode(x).latent_dist.mode() * scale
    sched = noise_scheduler(pipe.diffusion)
    states, pooled = pipe.text_encoder([""] * len(z))
    projection = pipe.unet.config.class_embed_type == "projection"
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for t in (10, 50, 200, 400, 800, 950):
        steps = torch.full((len(z),), t)
        zt = sched.add_noise(z, torch.randn(z.shape, generator=gen), steps)
        out = pipe.unet(zt, steps, states, class_labels=pooled if projection else None).sample
        a = sched.alphas_cumprod[t]
        if pipe.diffusion.prediction_type == "v_prediction":
            x0 = a.sqrt() * zt - (1 - a).sqrt() * out
        elif pipe.diffusion.prediction_type == "sample":
            x0 = out
        else:
            x0 = (zt - (1 - a).sqrt() * out) / a.sqrt()
        errors[t] = float((pipe.vae.decode(x0 / scale).sample - x).pow(2).mean().sqrt())
    errors["grey"] = float(x.pow(2).mean().sqrt())  # predicting 0 everywhere
    return errors


@torch.no_grad()
def cell_contents(model: Path, judge_dir: Path, images_per_prompt: int = 4) -> dict:
    """Per suite category, for the descriptive form (which gives every object its cell):
    of the cells the reference scene fills, the share the judge finds filled; of those,
    the share whose object has the stated shape, colour, both, and the shape or colour of
    another object of the prompt instead of its own (attributes bound to the wrong
    place); and objects per image in cells the reference scene leaves empty."""
    prompts = load_suite(Path("prompts/suite-v1.json"))
    pipe, judge = load_text_to_image(model), load_judge(judge_dir)
    texts = [p.text("descriptive") for p in prompts for _ in range(images_per_prompt)]
    scenes = judge.predict(pipe(texts, seed=0))
    counts: dict[str, dict[str, int]] = {}
    for i, scene in enumerate(scenes):
        prompt = prompts[i // images_per_prompt]
        c = counts.setdefault(prompt.category, dict.fromkeys(CELL_COUNTS, 0))
        drawn = {(o.row, o.col): o for o in scene.objects}
        asked = prompt.scene.objects
        c["images"] += 1
        c["outside"] += sum(1 for cell in drawn if cell not in {(o.row, o.col) for o in asked})
        for o in asked:
            c["asked"] += 1
            got = drawn.get((o.row, o.col))
            if got is None:
                continue
            others = [r for r in asked if r is not o]
            c["filled"] += 1
            c["shape"] += got.shape == o.shape
            c["colour"] += got.color == o.color
            c["both"] += got.shape == o.shape and got.color == o.color
            c["other_shape"] += got.shape != o.shape and any(got.shape == r.shape for r in others)
            c["other_colour"] += got.color != o.color and any(got.color == r.color for r in others)
    out = {}
    for category, c in counts.items():
        filled = max(c["filled"], 1)
        out[category] = {
            "filled": round(c["filled"] / c["asked"], 3),
            **{k: round(c[k] / filled, 3) for k in CELL_COUNTS[4:]},
            "outside_per_image": round(c["outside"] / c["images"], 2),
        }
    return out


CELL_COUNTS = (
    "images",
    "asked",
    "filled",
    "outside",
    "shape",
    "colour",
    "both",
    "other_shape",
    "other_colour",
)


@torch.no_grad()
def single_objects(model: Path, judge_dir: Path, images_per_prompt: int = 8) -> dict:
    """The suite's single-object prompts per asked size (the descriptive form names it):
    pass rate, objects the judge finds per image, and the size it reads of the prompted
    shape (of any object when that shape is absent)."""
    prompts = [
        p for p in load_suite(Path("prompts/suite-v1.json")) if p.category == "single_object"
    ]
    pipe, judge = load_text_to_image(model), load_judge(judge_dir)
    out: dict = {}
    for form in FORMS:
        texts = [p.text(form) for p in prompts for _ in range(images_per_prompt)]
        scenes = judge.predict(pipe(texts, seed=0))
        for i, scene in enumerate(scenes):
            prompt = prompts[i // images_per_prompt]
            asked = prompt.scene.objects[0]
            same = [o.size for o in scene.objects if o.shape == asked.shape]
            drawn = (same or [o.size for o in scene.objects] or ["none"])[0]
            row = out.setdefault(form, {}).setdefault(
                asked.size, {"n": 0, "passed": 0, "objects": 0, "drawn": {}}
            )
            row["n"] += 1
            row["passed"] += judge_prompt(prompt, scene)["passed"]
            row["objects"] += len(scene.objects)
            row["drawn"][drawn] = row["drawn"].get(drawn, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    o = sub.add_parser("oracle", help="ground-truth captions and their mixed sampler")
    o.add_argument("--raw", type=Path, default=Path("data/raw"))
    o.add_argument("--out", type=Path, required=True)
    o.add_argument("--params", type=Path, default=Path("params.yaml"))
    o.add_argument("--max-objects", type=int, default=None, help="keep simpler scenes only")
    f = sub.add_parser("follow", help="prompt following of a trained model, without CLIP")
    f.add_argument("--model", type=Path, required=True)
    f.add_argument("--judge", type=Path, default=Path("data/world_judge"))
    f.add_argument("--images-per-prompt", type=int, default=4)
    f.add_argument("--spacing", choices=["leading", "trailing"], default=None)
    f.add_argument("--guidance", type=float, default=None, help="default: the model's")
    f.add_argument("--clip-sample", type=float, default=None, help="x0 clipped to +-this")
    f.add_argument("--guidance-min-t", type=int, default=None, help="guidance only at t >= it")
    f.add_argument("--layout-guidance", type=float, default=None, help="the layout model's")
    f.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    f.add_argument("--out", type=Path, default=None, help="default: data/exp/follow/<model name>")
    s = sub.add_parser("single", help="single-object prompts per asked size")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--judge", type=Path, default=Path("data/world_judge"))
    c = sub.add_parser("cells", help="what stands in each cell of descriptive prompts")
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--judge", type=Path, default=Path("data/world_judge"))
    d = sub.add_parser("denoise", help="error of one-step x0 estimates per noise level")
    d.add_argument("--model", type=Path, required=True)
    d.add_argument("--raw", type=Path, default=Path("data/raw"))
    args = ap.parse_args()
    if args.command == "oracle":
        oracle(args.raw, args.out, args.params, args.max_objects)
        return
    if args.command == "single":
        for form, sizes in single_objects(args.model, args.judge).items():
            for size, r in sizes.items():
                n, read = r["n"], r["drawn"]
                print(f"{form}, asked {size}: {n} images, passed {r['passed'] / n:.3f}, "
                      f"objects per image {r['objects'] / n:.2f}, sizes read {read}")  # fmt: skip
        return
    if args.command == "cells":
        for category, row in cell_contents(args.model, args.judge).items():
            print(f"{category:15s}", " ".join(f"{k} {v}" for k, v in row.items()))
        return
    if args.command == "denoise":
        print(json.dumps(denoise_once(args.model, args.raw), indent=1))
        return
    sampling = {
        k: v
        for k, v in (
            ("clip_sample", args.clip_sample),
            ("guidance_min_t", args.guidance_min_t),
            ("layout_guidance", args.layout_guidance),
            ("steps", args.steps),
        )
        if v is not None
    }
    result = follow(
        args.model,
        args.judge,
        args.images_per_prompt,
        args.spacing,
        args.guidance,
        sampling,
        args.out,
    )
    for form, r in result.items():
        print(form, {k: round(v, 3) for k, v in r["prompt_following"].items()})
        print(form, {k: round(v, 3) for k, v in r["attribute_accuracy"].items()})
        print(form, r["failure_reasons"])
        print(form, "drawn", r["drawn"])


if __name__ == "__main__":
    main()
