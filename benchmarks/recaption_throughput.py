"""Recaptioning throughput: both captions of each image (short and descriptive), decoded
as `recaptioned_dataset` decodes them (params.yaml's `captioner.generation`: beam search
checked by the concept heads as it writes), against the same search run by transformers'
`generate` (the check a logits processor, which cannot look ahead), the same search
without `lookahead` (where params.yaml has it on) and plain beam search of the same
width, on the same weights and images, in one run; with the caption quality of each on
the held-out images (the captioner's own measure); and the checked decoding in `--workers` processes
side by side, as `recaptioned_dataset` runs it with `workers` (each with its share of the
cores).

    python -m benchmarks.recaption_throughput --captioner data/captioner --raw data/raw
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import wait
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from corpus.caption_metrics import caption_quality
from corpus.params import load_section
from models.captioning.backends import PrefixCaptionerBackend
from models.captioning.captioner import GenerationConfig
from models.captioning.recaption import RecaptionConfig, caption_in_worker, worker_pool
from models.captioning.train import read_scenes
from models.common.data import load_images


def _run(backend: PrefixCaptionerBackend, images: torch.Tensor, batch_size: int) -> tuple:
    start = time.perf_counter()
    captions: dict[str, list[str]] = {"short": [], "descriptive": []}
    for i in range(0, len(images), batch_size):
        for kind in captions:
            captions[kind].extend(backend.caption(images[i : i + batch_size], kind))
    return len(images) / (time.perf_counter() - start), captions


def _run_workers(
    cfg: RecaptionConfig, captioner: Path, images: torch.Tensor, batch_size: int
) -> tuple:
    with worker_pool(cfg, captioner) as pool:
        warm = [pool.submit(caption_in_worker, images[:2], "short") for _ in range(2 * cfg.workers)]
        wait(warm)  # every worker started and built its backend
        start = time.perf_counter()
        jobs = {
            kind: [
                pool.submit(caption_in_worker, images[i : i + batch_size], kind)
                for i in range(0, len(images), batch_size)
            ]
            for kind in ("short", "descriptive")
        }
        captions = {kind: [c for job in js for c in job.result()] for kind, js in jobs.items()}
        return len(images) / (time.perf_counter() - start), captions


def _quality(captions: list[str], scenes) -> dict[str, float]:
    q = caption_quality(captions, scenes)
    return {
        "object_recall": q["object"]["recall"],
        "colour_recall": q["colour"]["recall"],
        "relation_precision": q["relation"]["precision"],
        "relation_recall": q["relation"]["recall"],
        "word_precision": q["word"]["precision"],
        "hallucination": q["overall"]["hallucination_rate"],
    }


def _result(rate: float, captions: dict, gen: GenerationConfig, scenes) -> dict:
    return {
        "images_per_s": rate,
        "generation": asdict(gen),
        "descriptive": _quality(captions["descriptive"], scenes),
        "short": _quality(captions["short"], scenes),
    }


def held_out_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark on the captioner's held-out images."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--captioner", default="data/captioner")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--images", type=int, default=500, help="held-out images (eval split)")
    return ap


def held_out(raw: Path, n: int) -> tuple[list[str], list[str]]:
    """Keys and shards of the first `n` held-out images, as the captioner is scored on."""
    index = pd.read_parquet(raw / "index.parquet")
    rows = index[index["split"] == "eval"].head(n)
    return list(rows["key"]), list(rows["shard"])


def main(argv: list[str] | None = None) -> dict:
    ap = held_out_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="processes of the last run")
    ap.add_argument("--out", default="benchmarks/results/recaption_throughput.json")
    args = ap.parse_args(argv)
    cfg = RecaptionConfig.from_dict(load_section(args.params, "recaptioned_dataset"))
    checked = cfg.generation
    plain: GenerationConfig = replace(checked, check_clauses=False, candidates=1, lookahead=False)
    keys, shards = held_out(Path(args.raw), args.images)
    scenes = read_scenes(Path(args.raw), keys, shards)
    results = {}
    runs = {
        "checked_beam": checked,
        "checked_beam_transformers": replace(checked, beam_search="transformers", lookahead=False),
        "plain_beam": plain,
    }
    if checked.lookahead:  # what looking ahead buys, on the same weights
        runs["checked_beam_no_lookahead"] = replace(checked, lookahead=False)
    for name, gen in runs.items():
        backend = PrefixCaptionerBackend(args.captioner, gen, cfg.short_max_new_tokens)
        images = load_images(Path(args.raw), keys, shards, backend.image_size)
        backend.caption(images[:4], "short")  # warm-up
        results[name] = _result(*_run(backend, images, cfg.batch_size), gen, scenes)
        print(f"{name}: {results[name]['images_per_s']:.2f} images/s")
    name = f"checked_beam_{args.workers}_workers"
    workers = replace(cfg, workers=args.workers)
    rate, captions = _run_workers(workers, Path(args.captioner), images, cfg.batch_size)
    results[name] = _result(rate, captions, checked, scenes)
    print(f"{name}: {rate:.2f} images/s")
    same_as_transformers = "checked_beam_no_lookahead" if checked.lookahead else "checked_beam"
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "images": len(keys),
        "batch_size": cfg.batch_size,
        **results,
        "checked_over_plain": results["checked_beam"]["images_per_s"]
        / results["plain_beam"]["images_per_s"],
        # the same decoding in both searches: without look-ahead, which `generate` lacks
        "recapflow_over_transformers_search": results[same_as_transformers]["images_per_s"]
        / results["checked_beam_transformers"]["images_per_s"],
        "workers_over_one_process": results[name]["images_per_s"]
        / results["checked_beam"]["images_per_s"],
    }
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
