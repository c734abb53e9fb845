"""The landing folder: img2dataset shards dropped there join the raw corpus as new shards.

A shard is ready when img2dataset has finished it (it writes `<shard>_stats.json` after
closing the tar) or, for a tar copied in by hand, when it has not changed for
`settle_seconds`. Anything else is still being written and waits. A ready tar that cannot
be read to its end, or holds no image, is rejected with the reason; the others go on.

Each landed tar becomes the raw shard (and Dagster partition) `landed-<path>`, its path
under the landing folder with `/` as `--`, so shards of several img2dataset outputs
(all named 00000.tar, 00001.tar, ...) never collide.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from corpus.shards import IMAGE_EXTS, missing_end, split_member_name, write_shard

PREFIX = "landed-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class LandedShard:
    name: str  # the raw shard / partition key
    path: Path
    size: int
    mtime_ns: int

    @property
    def fingerprint(self) -> str:
        """Changes when the file is replaced: a re-dropped, fixed shard is taken again."""
        return f"{self.size}:{self.mtime_ns}"


@dataclass
class LandingScan:
    ready: list[LandedShard]
    waiting: dict[str, str]  # path -> why it is not taken yet
    rejected: dict[str, str]  # path -> why it is never taken (until it changes)


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def shard_name(root: Path, tar: Path) -> str:
    rel = tar.relative_to(root).as_posix().removesuffix(".gz").removesuffix(".tar")
    return PREFIX + _UNSAFE.sub("_", rel.replace("/", "--"))


def stats_file(tar: Path) -> Path:
    stem = tar.name.removesuffix(".gz").removesuffix(".tar")
    return tar.with_name(f"{stem}_stats.json")


def shard_problem(tar: Path) -> str | None:
    """Why a finished tar cannot be ingested, or None: it must read to its end (every
    header and member) and hold at least one image."""
    images = 0
    try:
        with tarfile.open(tar, "r:*") as tf:
            for m in tf:
                if m.isfile():
                    if len(tf.extractfile(m).read()) != m.size:
                        return f"member {m.name!r} is truncated"
                    images += split_member_name(m.name)[1] in IMAGE_EXTS
            cut = missing_end(tf)
            if cut:
                return cut
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"unreadable tar ({type(e).__name__}: {e})"
    if not images:
        return f"no image member ({', '.join(IMAGE_EXTS)})"
    return None


def scan_landing(
    root: Path,
    settle_seconds: float = 60.0,
    now: float | None = None,
    seen: set[tuple[str, str]] = frozenset(),
) -> LandingScan:
    """Sort the tars under `root` into ready, waiting and rejected. Tars whose
    (path, fingerprint) is in `seen` are left out unread (a sensor's earlier verdicts)."""
    scan = LandingScan([], {}, {})
    if not root.is_dir():
        return scan
    now = time.time() if now is None else now
    tars = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith((".tar", ".tar.gz")) and not p.name.startswith(".")
    )
    names: dict[str, Path] = {}
    for tar in tars:
        st = tar.stat()
        if (str(tar), file_fingerprint(tar)) in seen:
            continue
        age = now - st.st_mtime
        if not stats_file(tar).exists() and age < settle_seconds:
            scan.waiting[str(tar)] = (
                f"no {stats_file(tar).name} and modified {age:.0f}s ago "
                f"(taken once unchanged for {settle_seconds:.0f}s)"
            )
            continue
        name = shard_name(root, tar)
        problem = shard_problem(tar)
        if problem is None and name in names:
            problem = f"same shard name {name!r} as {names[name]}"
        if problem:
            scan.rejected[str(tar)] = problem
            continue
        names[name] = tar
        scan.ready.append(LandedShard(name, tar, st.st_size, st.st_mtime_ns))
    return scan


def write_demo_shard(folder: Path, name: str, n: int, seed: int, finished: bool = True) -> Path:
    """A shard of the synthetic world laid out as img2dataset writes one: keys
    000000000.. (which every img2dataset output reuses), `<shard>_stats.json` once
    finished. For trying the landing folder without a crawl."""
    from corpus.params import RawDatasetParams
    from corpus.sample_check import check_sample
    from corpus.sources import synthetic_sample

    params = RawDatasetParams(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = [check_sample(synthetic_sample(i, params, name), params.limits) for i in range(n)]
    tar = folder / f"{name}.tar"
    write_shard(tar, samples)  # atomic: never seen half-written
    if finished:
        stats = {"count": n, "successes": n, "failed_to_download": 0, "status_dict": {}}
        (folder / f"{name}_stats.json").write_text(json.dumps(stats))
    return tar


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a demo img2dataset shard, or scan a folder.")
    ap.add_argument("folder", type=Path, help="a folder under the landing folder")
    ap.add_argument("--demo", action="store_true", help="write a demo shard into the folder")
    ap.add_argument("--name", default="00000")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    if args.demo:
        print(write_demo_shard(args.folder, args.name, args.images, args.seed))
        return
    scan = scan_landing(args.folder)
    for s in scan.ready:
        print(f"ready     {s.path} -> {s.name}")
    for kind, items in (("waiting", scan.waiting), ("rejected", scan.rejected)):
        for path, why in items.items():
            print(f"{kind:9} {path}: {why}")


if __name__ == "__main__":
    main()
