"""Throughput of the raw dataset stage on this machine (images/s), in one run:

1. generation: scene sampling + rendering + PNG encoding, one process;
2. synthetic build: generation + validation + shard, index and manifest writing;
3. ingest: the shards of (2) read back as an img2dataset webdataset source.

    python -m benchmarks.raw_dataset_throughput [--images 20000] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from corpus.params import RawDatasetParams
from corpus.raw_dataset import build_raw_dataset
from corpus.sources import synthetic_sample


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="benchmarks/results/raw_dataset_throughput.json")
    args = ap.parse_args(argv)
    n = args.images
    params = RawDatasetParams.from_dict({"num_images": n, "world": {"image_size": args.size}})
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "images": n,
        "image_size": args.size,
        "workers": args.workers,
    }
    gen_n = min(n, 5000)
    secs = _timed(lambda: [synthetic_sample(i, params, "bench") for i in range(gen_n)])
    results["generation_images_per_s_1proc"] = gen_n / secs
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        secs = _timed(lambda: build_raw_dataset(params, raw, workers=args.workers, progress=False))
        results["synthetic_build_images_per_s"] = n / secs
        ingest = RawDatasetParams.from_dict({"source": "webdataset", "input_path": str(raw)})
        secs = _timed(lambda: build_raw_dataset(ingest, Path(tmp) / "ingested", progress=False))
        results["webdataset_ingest_images_per_s"] = n / secs
    for k, v in results.items():
        print(f"{k:36s} {v:,.0f}" if isinstance(v, float) else f"{k:36s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
