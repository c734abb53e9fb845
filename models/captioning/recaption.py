"""Recaption the raw corpus shard by shard: one `data/recaptioned/<shard>.parquet` per raw
shard, with key, alt_text, short_caption, descriptive_caption, the captioner's id and
version and the generation config.

Each shard's parquet is written to a temp file and renamed, so it either exists whole or
not at all; a rerun skips shards already written by the same captioner version, which
makes a killed run resume without duplicate or missing keys.

    python -m models.captioning.recaption --params params.yaml --raw data/raw \
        --captioner data/captioner --out data/recaptioned
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from corpus.atomic import pid_alive
from corpus.config import build_config
from models.captioning.backends import CaptionBackend, HFImageToTextBackend, PrefixCaptionerBackend
from models.captioning.captioner import GenerationConfig
from models.common.data import load_images_lenient

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("split", pa.string()),
        ("alt_text", pa.string()),
        ("short_caption", pa.string()),
        ("descriptive_caption", pa.string()),
        ("captioner_id", pa.string()),
        ("captioner_version", pa.string()),
        ("generation_config", pa.string()),
    ]
)


# A temp file names its writer: partitions recaptioned side by side (several processes,
# or machines sharing the folder) must not delete each other's files in flight.
_WRITER = f"{socket.gethostname()}-{os.getpid()}"


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete the temp shard files of writers on this machine that are no longer alive
    (a killed run); a live writer's, or another machine's, are left alone."""
    removed = []
    for tmp in out_dir.glob(".*.parquet.tmp-*"):
        host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def shard_rejections(path: Path) -> dict[str, str]:
    """{key: reason} for the images of a recaptioned shard that could not be read."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"rejected", b"{}"))


def shard_is_current(path: Path, version: str) -> bool:
    """A shard written whole by this captioner version (the version is in its metadata)."""
    if not path.exists():
        return False
    meta = pq.read_schema(path).metadata or {}
    return meta.get(b"captioner_version", b"").decode() == version


def recaption_shard(
    backend: CaptionBackend,
    raw_dir: Path,
    shard: str,
    out_dir: Path,
    batch_size: int = 256,
    image_size: int | None = None,
) -> Path:
    """Caption every indexed image of one raw shard; returns the parquet path."""
    index = pd.read_parquet(Path(raw_dir) / "index.parquet", filters=[("shard", "==", shard)])
    if index.empty:
        raise ValueError(f"raw shard {shard!r} has no indexed images in {raw_dir}")
    if not (Path(raw_dir) / f"{shard}.tar").exists():
        raise FileNotFoundError(f"raw shard {shard}.tar is missing from {raw_dir}")
    size = image_size or backend.image_size or int(index["width"].max())
    images, ok, failed = load_images_lenient(
        Path(raw_dir), list(index["key"]), [shard] * len(index), size
    )
    # An image that no longer decodes is skipped and reported, never silently dropped.
    index = index.set_index("key").loc[ok].reset_index()
    captions: dict[str, list[str]] = {"short": [], "descriptive": []}
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        for kind in captions:
            captions[kind].extend(backend.caption(batch, kind))
    gen = json.dumps(backend.generation_config(), sort_keys=True)
    table = pa.Table.from_pydict(
        {
            "key": list(index["key"]),
            "shard": [shard] * len(index),
            "split": list(index["split"]),
            "alt_text": list(index["alt_text"]),
            "short_caption": captions["short"],
            "descriptive_caption": captions["descriptive"],
            "captioner_id": [backend.id] * len(index),
            "captioner_version": [backend.version] * len(index),
            "generation_config": [gen] * len(index),
        },
        schema=SCHEMA.with_metadata(
            {"captioner_version": backend.version, "rejected": json.dumps(failed, sort_keys=True)}
        ),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{shard}.parquet"
    tmp = out_dir / f".{shard}.parquet.tmp-{_WRITER}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def recaption(
    backend: CaptionBackend,
    raw_dir: Path,
    out_dir: Path,
    shards: list[str] | None = None,
    batch_size: int = 256,
    pool: Executor | None = None,
) -> dict[str, str]:
    """Recaption the given shards (default: all), skipping ones already current; a shard
    with no image in the raw index (never ingested, or every sample rejected there) has
    nothing to caption: status `no_raw_images`, and no file. With a `pool`
    (`worker_pool`), its processes caption the shards, each with its own copy of the
    backend (`backend` then only says which shards are current)."""
    indexed = set(
        pd.read_parquet(Path(raw_dir) / "index.parquet", columns=["shard"])["shard"].unique()
    )
    if shards is None:
        shards = sorted(indexed)
    remove_stale_temps(Path(out_dir))
    status = {}
    todo = []
    for shard in shards:
        if shard not in indexed:
            status[shard] = "no_raw_images"
        elif shard_is_current(Path(out_dir) / f"{shard}.parquet", backend.version):
            status[shard] = "skipped"
        else:
            todo.append(shard)
    raw, out = Path(raw_dir), Path(out_dir)
    if pool is None:
        done = (recaption_shard(backend, raw, shard, out, batch_size) for shard in todo)
    else:
        jobs = [pool.submit(_recaption_in_worker, shard, raw, out, batch_size) for shard in todo]
        done = as_completed(jobs)
    for _ in tqdm(done, total=len(todo), desc="recaption shards", unit="shard"):
        pass  # recaption_shard raises for a shard it cannot write; the run stops there
    status.update(dict.fromkeys(todo, "captioned"))
    return status


@dataclass(frozen=True)
class RecaptionConfig:
    """params.yaml's `recaptioned_dataset`, with `generation` read from the captioner's
    section (corpus.params.SHARED_PARAMS)."""

    backend: Literal["prefix", "hf"] = "prefix"  # our captioner | transformers image-to-text
    batch_size: int = 256
    # prefix: the decoding of both captions; the short one stops at short_max_new_tokens.
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    short_max_new_tokens: int = 24
    # hf: a local folder (or hub id) and its per-kind prompts and lengths.
    model: str | None = None
    prompts: dict[str, str | None] | None = None
    max_new_tokens: dict[str, int] | None = None
    num_beams: int = 1
    # Processes captioning shards side by side, each with its own backend and an equal
    # share of the cores' torch threads (`worker_pool`).
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"recaptioned_dataset.workers={self.workers}: need >= 1")
        if self.backend == "hf" and not self.model:
            raise ValueError("recaptioned_dataset.backend hf needs `model` (a local folder)")

    @classmethod
    def from_dict(cls, d: dict) -> RecaptionConfig:
        return build_config(cls, d, "recaptioned_dataset")


def make_backend(cfg: dict | RecaptionConfig, captioner_dir: Path) -> CaptionBackend:
    """`recaptioned_dataset.backend` of params.yaml: `prefix` (our captioner) or `hf`."""
    if not isinstance(cfg, RecaptionConfig):
        cfg = RecaptionConfig.from_dict(cfg)
    if cfg.backend == "prefix":
        return PrefixCaptionerBackend(
            captioner_dir, cfg.generation, short_max_new_tokens=cfg.short_max_new_tokens
        )
    return HFImageToTextBackend(
        cfg.model,
        prompts=cfg.prompts,
        max_new_tokens=cfg.max_new_tokens,
        num_beams=cfg.num_beams,
    )


_WORKER_BACKEND: CaptionBackend | None = None  # a worker process's own (`worker_pool`)


def _start_worker(cfg: RecaptionConfig, captioner_dir: Path, threads: int) -> None:
    global _WORKER_BACKEND
    torch.set_num_threads(threads)
    _WORKER_BACKEND = make_backend(cfg, captioner_dir)


def _recaption_in_worker(shard: str, raw_dir: Path, out_dir: Path, batch_size: int) -> Path:
    return recaption_shard(_WORKER_BACKEND, raw_dir, shard, out_dir, batch_size)


def caption_in_worker(images: torch.Tensor, kind: str) -> list[str]:
    """Captions of one kind by the backend of the worker process this runs in."""
    return _WORKER_BACKEND.caption(images, kind)


def worker_pool(
    cfg: RecaptionConfig, captioner_dir: Path
) -> AbstractContextManager[Executor | None]:
    """`cfg.workers` processes, each building the backend once and decoding with an equal
    share of this machine's cores; no pool (None) for one worker. On a CPU the clause check
    is Python, on one core, and the small LM gains little from a second thread: two
    one-thread processes on 2 cores caption more than one two-thread process
    (docs/log/2026-12-speed.md)."""
    if cfg.workers == 1:
        return nullcontext()
    threads = max(1, len(os.sched_getaffinity(0)) // cfg.workers)
    return ProcessPoolExecutor(
        cfg.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(cfg, Path(captioner_dir), threads),
    )


def main(argv: list[str] | None = None) -> None:
    from corpus.params import load_section

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--captioner", default="data/captioner")
    ap.add_argument("--out", default="data/recaptioned")
    ap.add_argument("--shards", nargs="*", default=None)
    args = ap.parse_args(argv)
    cfg = RecaptionConfig.from_dict(load_section(args.params, "recaptioned_dataset"))
    backend = make_backend(cfg, Path(args.captioner))
    with worker_pool(cfg, Path(args.captioner)) as pool:
        status = recaption(
            backend, Path(args.raw), Path(args.out), args.shards, cfg.batch_size, pool
        )
    print(json.dumps(status))


if __name__ == "__main__":
    main()
