"""Captioning throughput: the batched path against a one-image-at-a-time loop of the same
model on the same images, in one run (images/s and their ratio).

    python -m benchmarks.captioning_throughput --captioner data/captioner --raw data/raw
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from models.captioning.captioner import GenerationConfig, PrefixCaptioner
from models.common.data import load_images


def _rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captioner", default="data/captioner")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--phase", default="dsc")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/captioning_throughput.json")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PrefixCaptioner.load(Path(args.captioner) / args.phase).to(device)
    index = pd.read_parquet(Path(args.raw) / "index.parquet").head(args.images)
    images = load_images(Path(args.raw), list(index["key"]), list(index["shard"]), model.image_size)
    gen = GenerationConfig(mode="greedy", max_new_tokens=args.max_new_tokens)
    model.generate(images[:8], gen)  # warm-up
    bs = args.batch_size
    batched = _rate(
        lambda: [model.generate(images[i : i + bs], gen) for i in range(0, len(images), bs)],
        len(images),
    )
    single = _rate(
        lambda: [model.generate(images[i : i + 1], gen) for i in range(len(images))], len(images)
    )
    res = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "phase": args.phase,
        "images": len(images),
        "batch_size": bs,
        "max_new_tokens": args.max_new_tokens,
        "batched_images_per_s": batched,
        "single_images_per_s": single,
        "speedup": batched / single,
    }
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
