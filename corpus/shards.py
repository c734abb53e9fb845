"""Webdataset tar shards, img2dataset layout: `{key}.{jpg|png}`, `{key}.txt`, `{key}.json`.

Writing is deterministic (fixed mtime, owner and mode) so the same samples give
byte-identical shards and the same DVC hash. Reading never extracts to disk and treats
every member name as untrusted.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path

from corpus.sample_check import (
    TRUNCATED_TAR_MEMBER,
    UNREADABLE_SHARD,
    UNSAFE_MEMBER,
    CleanSample,
    Sample,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def sample_json(s: CleanSample) -> dict:
    """The `.json` member: img2dataset's fields plus whatever the source knew (the scene)."""
    return {
        **s.meta,
        "key": s.key,
        "caption": s.alt_text,
        "status": "success",
        "width": s.width,
        "height": s.height,
    }


def write_shard(path: Path, samples: list[CleanSample]) -> None:
    """Write one shard atomically: a temp file renamed over the final name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        for s in samples:
            txt = s.alt_text.encode("utf-8")
            js = json.dumps(sample_json(s), sort_keys=True, ensure_ascii=False).encode("utf-8")
            for name, data in (
                (f"{s.key}.{s.ext}", s.image),
                (f"{s.key}.txt", txt),
                (f"{s.key}.json", js),
            ):
                tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    os.replace(tmp, path)


def _unsafe(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if not (member.isfile() or member.isdir()):
        return f"member {name!r} is a link or special file"
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm.startswith("..") or "/../" in f"/{name}/" or ":" in name:
        return f"member name {name!r} escapes the shard (path traversal)"
    return None


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is everything before the first dot of the basename."""
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(head, stem) if head else stem, ext.lower()


END_OF_ARCHIVE = b"\0" * 1024  # two zero blocks: how every tar writer ends an archive


def missing_end(tf: tarfile.TarFile) -> str | None:
    """After reading every member: why the archive looks cut short, or None. Python's
    tarfile ends iteration silently at a truncated header, so a tar cut between members
    reads as a shorter valid one; a complete tar ends with two zero blocks."""
    tf.fileobj.seek(tf.offset)
    if tf.fileobj.read(len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
        return f"archive cut short at byte {tf.offset}: no end-of-archive marker after it"
    return None


def iter_tar_samples(path: Path, unit: str) -> Iterator[Sample]:
    """Group a tar's members into samples by key, as webdataset does (members of one
    key are contiguous). Broken members become samples with `problem` set."""
    try:
        # Closed by `with tf:` below; only the open itself may fail here.
        tf = tarfile.open(path, "r:*")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Sample(
            key=None,
            unit=unit,
            origin=str(path),
            problem=UNREADABLE_SHARD,
            detail=f"{type(e).__name__}: {e}",
        )
        return
    current: Sample | None = None
    with tf:
        members = iter(tf)
        while True:
            try:
                m = next(members)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, EOFError) as e:
                # The archive ends mid-header: what was read stays, the rest is lost.
                if current is not None:
                    current.problem = current.problem or TRUNCATED_TAR_MEMBER
                    current.detail = current.detail or f"{type(e).__name__}: {e}"
                break
            if m.isdir():
                continue
            key, ext = split_member_name(m.name)
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = Sample(key=key, unit=unit, origin=f"{path.name}:{key}")
            bad = _unsafe(m)
            if bad:
                current.problem, current.detail = UNSAFE_MEMBER, bad
                continue
            try:
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise EOFError(f"{len(data)} of {m.size} bytes")
            except (tarfile.TarError, OSError, EOFError) as e:
                current.problem = current.problem or TRUNCATED_TAR_MEMBER
                current.detail = current.detail or f"{m.name}: {type(e).__name__}: {e}"
                continue
            _attach(current, ext, data)
        if current is not None:
            cut = missing_end(tf)
            if cut and current.problem is None:  # the last sample may lack members
                current.problem, current.detail = TRUNCATED_TAR_MEMBER, cut
            yield current


def _attach(sample: Sample, ext: str, data: bytes) -> None:
    if ext in IMAGE_EXTS and sample.image is None:
        sample.image = data
    elif ext == "txt":
        sample.caption = data
    elif ext == "json":
        try:
            meta = json.loads(data)
            sample.meta = meta if isinstance(meta, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            sample.meta = {"_bad_json": True}


def shard_keys(path: Path) -> list[str]:
    """Keys of the samples in a shard we wrote (one image member per key)."""
    with tarfile.open(path, "r") as tf:
        return [
            split_member_name(n)[0] for n in tf.getnames() if split_member_name(n)[1] in IMAGE_EXTS
        ]


def read_preview(path: Path, n: int) -> list[tuple[bytes, str]]:
    """The first n (image bytes, caption) pairs of a shard we wrote."""
    out: dict[str, list] = {}
    with tarfile.open(path, "r") as tf:
        for m in tf:
            key, ext = split_member_name(m.name)
            if ext in IMAGE_EXTS or ext == "txt":
                entry = out.setdefault(key, [None, ""])
                data = tf.extractfile(m).read()
                entry[0 if ext != "txt" else 1] = data if ext != "txt" else data.decode()
            if len(out) > n:
                break
    return [(img, cap) for img, cap in list(out.values())[:n] if img is not None]


def read_json_sidecars(path: Path, keys: set[str]) -> dict[str, dict]:
    """The `.json` members of the given keys in one shard we wrote (one pass over it)."""
    out = {}
    with tarfile.open(path, "r") as tf:
        for m in tf:
            key, ext = split_member_name(m.name)
            if ext == "json" and key in keys:
                out[key] = json.loads(tf.extractfile(m).read())
    return out
