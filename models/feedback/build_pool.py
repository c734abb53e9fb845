"""Draws the feedback pool: every generator's images of the pool's prompts, labelled.

    python -m models.feedback.build_pool --params params.yaml --judge data/world_judge \
        --out data/feedback_pool

What the pool is and holds: `models/feedback/pool.py`. A generator's files are written
atomically and kept on a rerun whose settings and weights are unchanged (its key), so a
killed build resumes where it stopped; where only the labelling changed (the judge's
weights or `labels.LABELS_RULE`), its kept images are labelled again, not drawn again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from corpus.atomic import write_atomic, write_text_atomic
from corpus.params import json_digest
from corpus.prompt_suite import Prompt
from models.feedback.labels import LABELS_RULE, label_images
from models.feedback.pool import (
    SPLITS,
    TUPLES,
    Generator,
    PoolConfig,
    annotate_pairs,
    generators,
    held_out,
    pool_prompts,
    read_labels,
)


def load_generator(gen: Generator, root: Path):
    """The generator's pipeline, with the raw (non-EMA) UNet of its latest checkpoint
    when asked for."""
    from models.diffusion.text_to_image import load_text_to_image

    pipe = load_text_to_image(root / gen.source.path)
    if gen.weights == "raw":
        if not gen.source.checkpoints:
            raise ValueError(f"{gen.name}: raw weights need `checkpoints:` for {gen.source.name}")
        ckpts = root / gen.source.checkpoints
        pointer = ckpts / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(
                f"{gen.name}: no training checkpoint in {ckpts} (its `latest` file is missing); "
                "train the model again or drop 'raw' from feedback_pool.weights"
            )
        weights = load_file(str(ckpts / pointer.read_text().strip() / "model.safetensors"))
        unet = {
            k.removeprefix("model.unet."): v
            for k, v in weights.items()
            if k.startswith("model.unet.")
        }
        pipe.unet.load_state_dict(unet)
    return pipe


def _draw(gen: Generator, texts: list[str], cfg: PoolConfig, root: Path) -> torch.Tensor:
    pipe = load_generator(gen, root)
    return torch.cat(
        [
            pipe(
                texts,
                seed=cfg.seed + s,
                steps=cfg.sampling_steps,
                guidance_scale=gen.guidance_scale,
                batch_size=cfg.batch_size,
            )
            for s in range(cfg.images_per_generator)
        ]
    )


def _generator_key(gen: Generator, cfg: PoolConfig, root: Path) -> str:
    """What a generator's files depend on: its settings, the bytes of its weights and the
    settings its model samples with (train_config.json's, e.g. `layout_guidance`)."""
    from models.diffusion.text_to_image import sampling_settings

    h = hashlib.sha256()
    files = sorted((root / gen.source.path).rglob("*.safetensors"))
    if gen.weights == "raw" and gen.source.checkpoints:
        pointer = root / gen.source.checkpoints / "latest"
        if pointer.is_file():
            files.append(pointer.parent / pointer.read_text().strip() / "model.safetensors")
    for f in files:
        h.update(f.read_bytes())
    drawn = {
        k: getattr(cfg, k)
        for k in ("images_per_generator", "prompts_per_category", "sampling_steps", "seed")
    }
    sampling = sampling_settings(root / gen.source.path)
    key = {"generator": gen.name, "weights": h.hexdigest(), "drawn": drawn, "sampling": sampling}
    return json_digest(key, length=16)


def _labels_key(judge_dir: Path) -> str:
    """What a generator's labels depend on besides its images: the judge and the rule."""
    h = hashlib.sha256()
    for f in sorted(Path(judge_dir).rglob("*.safetensors")):
        h.update(f.read_bytes())
    return json_digest({"rule": LABELS_RULE, "judge": h.hexdigest()}, length=16)


def build_pool(cfg: PoolConfig, judge_dir: Path, out: Path, root: Path = Path(".")) -> dict:
    from models.evaluation.world_judge import load_judge

    judge = load_judge(judge_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generators").mkdir(exist_ok=True)
    rows = pool_prompts(cfg)
    write_text_atomic(out / "prompts.json", json.dumps(rows))
    prompts = [Prompt.from_dict(r["prompt"]) for r in rows]
    texts = [r["text"] for r in rows]
    gens = generators(cfg)
    reused, relabelled, labels_key = [], [], _labels_key(judge_dir)
    for gen in tqdm(gens, desc="feedback pool: generators"):
        key = _generator_key(gen, cfg, root)
        labels_path = out / "generators" / f"{gen.slug}.jsonl"
        images_path = out / "generators" / f"{gen.slug}.safetensors"
        kept = json.loads(labels_path.open().readline()) if labels_path.is_file() else {}
        if kept.get("key") == key and kept.get("labels") == labels_key:
            reused.append(gen.name)
            continue
        if kept.get("key") == key and images_path.is_file():
            images = load_file(str(images_path))["images"]
            relabelled.append(gen.name)
        else:
            images = _draw(gen, texts, cfg, root)
            write_atomic(
                images_path,
                lambda tmp, x=images: save_file({"images": x.contiguous()}, str(tmp)),
            )
        n = cfg.images_per_generator
        labels = label_images(images, prompts * n, [r["form"] for r in rows] * n, judge)
        lines = [json.dumps({"key": key, "labels": labels_key, "generator": gen.name})]
        for i, label in enumerate(labels):
            lines.append(
                json.dumps({"image": i, "prompt": i % len(rows), "sample": i // len(rows), **label})
            )
        write_text_atomic(labels_path, "\n".join(lines) + "\n")
    images_index = read_labels(out, gens)
    pairs, summary = annotate_pairs(images_index, rows, cfg)
    write_text_atomic(out / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    summary.update(
        {
            "config": asdict(cfg),
            "generators": [g.name for g in gens],
            "held_out": [g.name for g in gens if held_out(g.name, cfg.held_out_generators)],
            "reused_generators": reused,
            "relabelled_generators": relabelled,
            "prompts": len(rows),
            "prompts_by_split": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
            "images": len(images_index),
        }
    )
    # Which generators were reused says how this build ran, not what the pool holds: kept
    # out of pool.json so that an unchanged pool hashes the same and nothing after it
    # rebuilds.
    how = ("reused_generators", "relabelled_generators")
    content = {k: v for k, v in summary.items() if k not in how}
    write_text_atomic(out / "pool.json", json.dumps(content, indent=2))
    return summary


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    add_config_flags(ap, PoolConfig, skip=TUPLES)
    args = ap.parse_args()
    cfg = config_from_args(PoolConfig, args, "feedback_pool")
    summary = build_pool(cfg, args.judge, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
