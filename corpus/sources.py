"""Where raw (image, alt-text) samples come from: the synthetic world, img2dataset
webdataset output, or a folder of images with `.txt` sidecars.

A source is a list of units (input shards); each unit yields `Sample`s, broken ones
included, so the builder can count every input. Units of the synthetic source are
independent and deterministic, so they may be built in parallel.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from corpus.landing import LandingScan, scan_landing
from corpus.params import RawDatasetParams
from corpus.sample_check import UNREADABLE_SHARD, UNSAFE_MEMBER, Sample
from corpus.scene_text import alt_text, descriptive_caption, draw_noise_kind, short_caption
from corpus.shards import iter_tar_samples
from corpus.world import encode_png, render, sample_scene

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Unit:
    """One input shard: plain data, so it can be sent to a worker process."""

    name: str  # becomes the output shard name
    source: str
    params: RawDatasetParams
    paths: tuple[Path, ...] = ()  # the tar (webdataset) or image files (folder)
    start: int = 0  # synthetic image indices [start, stop)
    stop: int = 0
    key_prefix: str = ""  # landed shards: keys namespaced by shard (img2dataset reuses keys)

    def samples(self) -> Iterator[Sample]:
        if self.source == "synthetic":
            return (
                synthetic_sample(i, self.params, self.name) for i in range(self.start, self.stop)
            )
        if self.source == "webdataset":
            return _webdataset_samples(self.paths[0], self.name, self.key_prefix)
        root = Path(self.params.input_path)
        return (_folder_sample(root, p, self.name) for p in self.paths)


def split_of(key: str, eval_fraction: float, salt: str = "recapflow-split") -> str:
    """Held-out split by a hash of the key: stable as the corpus grows, for any source."""
    h = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def synthetic_sample(index: int, params: RawDatasetParams, unit: str) -> Sample:
    """The index-th image of the synthetic world: a pure function of (seed, index)."""
    rng = random.Random(f"{params.seed}:{index}")
    scene = sample_scene(rng, params.world)
    key = f"{index:09d}"
    kind = draw_noise_kind(rng, params.noise)
    meta = {"scene": scene.to_dict(), "noise_kind": kind}
    human = rng.random() < params.human_fraction
    dsc = descriptive_caption(scene, rng)
    if human and split_of(key, params.eval_fraction) == "train":
        meta["short_caption"] = short_caption(scene)
        meta["descriptive_caption"] = dsc
    image = encode_png(render(scene, params.world.image_size))
    return Sample(key, unit, key, image, alt_text(scene, kind, rng), meta)


def _synthetic_units(params: RawDatasetParams) -> list[Unit]:
    units = []
    for shard, start in enumerate(range(0, params.num_images, params.shard_size)):
        stop = min(start + params.shard_size, params.num_images)
        units.append(Unit(f"{shard:05d}", "synthetic", params, start=start, stop=stop))
    return units


def _parquet_captions(tar: Path) -> dict[str, str]:
    """img2dataset writes a parquet per shard; its captions fill in a missing `.txt`."""
    pq_path = tar.with_suffix(".parquet")
    if not pq_path.exists():
        return {}
    try:
        table = pq.read_table(pq_path, columns=["key", "caption"])
    except (OSError, ValueError, pa.ArrowException):
        return {}  # an unreadable side parquet only means no fallback captions
    return {str(k): c for k, c in zip(*table.to_pydict().values(), strict=True) if c}


def _webdataset_samples(tar: Path, unit: str, key_prefix: str = "") -> Iterator[Sample]:
    fallback = None
    for s in iter_tar_samples(tar, unit):
        if s.caption is None and s.problem is None:
            fallback = _parquet_captions(tar) if fallback is None else fallback
            s.caption = fallback.get(s.key, s.meta.get("caption"))
        if key_prefix and s.key is not None:
            s.key = f"{key_prefix}{s.key}"
        yield s


def _webdataset_units(root: Path, params: RawDatasetParams) -> list[Unit]:
    tars = sorted(root.rglob("*.tar")) + sorted(root.rglob("*.tar.gz"))
    if not tars:
        raise FileNotFoundError(f"webdataset source {root}: no .tar shards found")
    units = []
    for tar in tars:
        name = tar.name.removesuffix(".gz").removesuffix(".tar")
        units.append(Unit(name, "webdataset", params, paths=(tar,)))
    return units


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def _folder_sample(root: Path, path: Path, unit: str) -> Sample:
    rel = path.relative_to(root)
    key = _UNSAFE_KEY_CHARS.sub("_", str(rel.with_suffix("")))
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        return Sample(
            key,
            unit,
            str(rel),
            problem=UNSAFE_MEMBER,
            detail=f"{rel} links outside the folder to {resolved}",
        )
    try:
        image = path.read_bytes()
        txt = path.with_suffix(".txt")
        caption = txt.read_bytes() if txt.exists() else None
    except OSError as e:
        return Sample(key, unit, str(rel), problem=UNREADABLE_SHARD, detail=str(e))
    return Sample(key, unit, str(rel), image, caption)


def _folder_units(root: Path, params: RawDatasetParams) -> list[Unit]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"folder source {root}: no images ({FOLDER_IMAGE_EXTS})")
    units = []
    size = params.shard_size
    for shard, start in enumerate(range(0, len(files), size)):
        units.append(
            Unit(f"{shard:05d}", "folder", params, paths=tuple(files[start : start + size]))
        )
    return units


def landed_units(params: RawDatasetParams, root: Path) -> tuple[list[Unit], LandingScan]:
    """The ready shards of the landing folder as units (keys prefixed `<shard>_`), and
    the scan that found them (with what waits and what was rejected, and why)."""
    scan = scan_landing(root, params.landing_settle_seconds)
    units = [
        Unit(s.name, "webdataset", params, paths=(s.path,), key_prefix=f"{s.name}_")
        for s in scan.ready
    ]
    return units, scan


def unit_fingerprint(unit: Unit) -> list:
    """What a finished unit's result depends on besides params: its input files."""
    out = []
    for p in unit.paths:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def make_units(params: RawDatasetParams) -> list[Unit]:
    if params.source == "synthetic":
        return _synthetic_units(params)
    root = Path(params.input_path or "")
    if not params.input_path or not root.is_dir():
        raise FileNotFoundError(
            f"source {params.source!r} needs input_path to be an existing folder, "
            f"got {params.input_path!r}"
        )
    if params.source == "webdataset":
        return _webdataset_units(root, params)
    return _folder_units(root, params)
