"""Build `data/raw`: validated webdataset shards, `index.parquet`, `rejected.parquet` and
`manifest.json` from any source. The Dagster asset and the DVC stage both call
`build_raw_dataset`, so `dvc repro` and a materialization write the same bytes.

Resume: the work goes to `<out>.partial-<params hash>`; each finished shard leaves its
tar and a `.result.json` there, so a killed run redoes only unfinished shards. The final
folder is swapped in only when everything is written.

Growth: the ready img2dataset shards of the landing folder (corpus/landing.py) are built
as shards `landed-...` next to the source's. Building only some shards (a new Dagster
partition) keeps the other shards of data/raw as they are (hard links) and merges the
index, the rejections and the manifest, which records each shard's input count.

    python -m corpus.raw_dataset --params params.yaml --out data/raw
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from corpus.atomic import write_text_atomic
from corpus.landing import LandingScan
from corpus.params import RawDatasetParams, load_section
from corpus.sample_check import DUPLICATE_KEY, CleanSample, Rejection, check_sample
from corpus.shards import write_shard
from corpus.sources import Unit, landed_units, make_units, split_of, unit_fingerprint

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("alt_text", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("has_human_captions", pa.bool_()),
        ("split", pa.string()),
        ("short_caption", pa.string()),
        ("descriptive_caption", pa.string()),
        ("noise_kind", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [(n, pa.string()) for n in ("key", "shard", "origin", "reason", "detail")]
)


@dataclass
class BuildReport:
    out_dir: Path
    manifest: dict
    landing_waiting: dict[str, str] = field(default_factory=dict)  # path -> why not yet

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]


def _index_row(s: CleanSample, shard: str, eval_fraction: float) -> dict:
    split = split_of(s.key, eval_fraction)
    short, desc = s.meta.get("short_caption"), s.meta.get("descriptive_caption")
    human = split == "train" and bool(short) and bool(desc)
    return {
        "key": s.key,
        "shard": shard,
        "alt_text": s.alt_text,
        "width": s.width,
        "height": s.height,
        "has_human_captions": human,
        "split": split,
        "short_caption": short if human else None,
        "descriptive_caption": desc if human else None,
        "noise_kind": s.meta.get("noise_kind"),
    }


def _process_unit(unit: Unit, params: RawDatasetParams, work: Path, seen: set[str] | None) -> dict:
    """Validate one unit's samples and write its shard. With `seen`, keys already taken
    by earlier units (or earlier in this one) are rejected as duplicates."""
    kept: list[CleanSample] = []
    rows, rejected, repairs, n_input = [], [], Counter(), 0
    local_seen: set[str] = set()
    for sample in unit.samples():
        n_input += 1
        result = check_sample(sample, params.limits)
        if isinstance(result, CleanSample):
            if result.key in local_seen or (seen is not None and result.key in seen):
                result = Rejection(
                    result.key,
                    unit.name,
                    sample.origin,
                    DUPLICATE_KEY,
                    "key already ingested from an earlier sample",
                )
            else:
                local_seen.add(result.key)
        if isinstance(result, Rejection):
            rejected.append(result.as_row())
            continue
        repairs.update(result.repairs)
        kept.append(result)
        rows.append(_index_row(result, unit.name, params.eval_fraction))
    if kept:
        write_shard(work / f"{unit.name}.tar", kept)
    result = {
        "unit": unit.name,
        "fingerprint": unit_fingerprint(unit),
        "input": n_input,
        "rows": rows,
        "rejected": rejected,
        "repairs": dict(repairs),
    }
    write_text_atomic(work / f"{unit.name}.result.json", json.dumps(result))
    return result


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


def _count(items) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))


def params_hash(params: RawDatasetParams) -> str:
    blob = json.dumps(params.to_dict(), sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _swap_in(work: Path, out_dir: Path) -> None:
    """Replace out_dir by work with two renames; a crash between them leaves `.old`,
    which the next build removes."""
    old = out_dir.with_name(f"{out_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old.exists():
        shutil.rmtree(old)


def _previous_build(out_dir: Path) -> tuple[dict, list[dict], list[dict]] | None:
    """The manifest, index rows and rejected rows of the build in out_dir, if any."""
    if not (out_dir / "manifest.json").exists():
        return None
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    index = pq.read_table(out_dir / "index.parquet").to_pylist()
    rejected = pq.read_table(out_dir / "rejected.parquet").to_pylist()
    return manifest, index, rejected


def _as_json(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True, default=list))


def _select(
    units: list[Unit], shards: Collection[str] | None, params: RawDatasetParams, landing: Path
) -> list[Unit]:
    if shards is None:
        return units
    known = {u.name for u in units}
    unknown = sorted(set(shards) - known)
    if unknown:
        raise ValueError(
            f"raw shards {unknown}: neither a shard of source {params.source!r} nor a ready "
            f"shard in the landing folder {landing} (known: {len(known)} shards)"
        )
    return [u for u in units if u.name in set(shards)]


def _kept_from_previous(
    previous: tuple | None, shards: Collection[str] | None, params: RawDatasetParams
) -> list[str]:
    """Shards of the existing build that an incremental build keeps as they are."""
    if shards is None or previous is None:
        return []
    manifest, index, rejected = previous
    built = set(manifest.get("per_shard") or {r["shard"] for r in index + rejected})
    kept = sorted(built - set(shards))
    if kept and ("per_shard" not in manifest or manifest["params"] != _as_json(params.to_dict())):
        raise ValueError(
            "data/raw was built with other raw_alt_text_dataset params (or by an older "
            f"recapflow): building only {sorted(shards)[:5]} would mix two corpora. "
            "Materialize every partition of raw_alt_text_dataset (make run does) or run "
            "`dvc repro raw_alt_text_dataset`"
        )
    return kept


def _process(todo: list[Unit], params: RawDatasetParams, work: Path, workers: int, seen, bar):
    done = {}
    synthetic = [u for u in todo if u.source == "synthetic"]
    if synthetic and workers > 1 and len(synthetic) > 1:
        # Synthetic keys are unique by construction, so units need no shared state.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_process_unit, u, params, work, None) for u in synthetic]
            for fut in futures:
                r = fut.result()
                done[r["unit"]] = r
                seen.update(row["key"] for row in r["rows"])
                bar.update()
    for u in todo:
        if u.name in done:
            continue
        r = _process_unit(u, params, work, seen)
        seen.update(row["key"] for row in r["rows"])
        done[u.name] = r
        bar.update()
    return done


def build_raw_dataset(
    params: RawDatasetParams,
    out_dir: str | Path,
    workers: int = 2,
    progress: bool = True,
    shards: Collection[str] | None = None,
    landing_root: str | Path | None = None,
) -> BuildReport:
    """Build the corpus of the configured source plus the ready shards of the landing
    folder `landing_root` (the CLI and the asset pass params.landing_dir). With `shards`,
    only those are (re)built and the other shards of the existing build are kept as they are (a new
    Dagster partition); without, everything is rebuilt."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    landing = Path(landing_root) if landing_root is not None else None
    work = out_dir.with_name(f"{out_dir.name}.partial-{params_hash(params)}")
    for stale in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
        if stale != work:  # a killed build with other params: not resumable
            shutil.rmtree(stale)
    work.mkdir(exist_ok=True)
    landed, scan = landed_units(params, landing) if landing else ([], LandingScan([], {}, {}))
    units = make_units(params) + landed
    selected = _select(units, shards, params, landing)
    previous = _previous_build(out_dir)
    kept = _kept_from_previous(previous, shards, params)

    done = {}
    for u in selected:
        f = work / f"{u.name}.result.json"
        if f.exists():
            r = json.loads(f.read_text(encoding="utf-8"))
            if r.get("fingerprint") == unit_fingerprint(u):  # same input files
                done[u.name] = r
    todo = [u for u in selected if u.name not in done]
    seen = {row["key"] for row in previous[1] if row["shard"] in set(kept)} if kept else set()
    for r in done.values():
        seen.update(row["key"] for row in r["rows"])
    bar = tqdm(
        total=len(selected),
        initial=len(done),
        desc="raw shards",
        unit="shard",
        disable=not progress,
    )
    done.update(_process(todo, params, work, workers, seen, bar))
    bar.close()

    per_shard = {
        u.name: {"input": done[u.name]["input"], "repairs": done[u.name]["repairs"]}
        for u in selected
    }
    rows_by = {u.name: done[u.name]["rows"] for u in selected}
    rejected_by = {u.name: done[u.name]["rejected"] for u in selected}
    landed_info = {}
    if previous is not None and kept:
        manifest, old_index, old_rejected = previous
        for name in kept:
            per_shard[name] = manifest["per_shard"][name]
            rows_by[name] = [r for r in old_index if r["shard"] == name]
            rejected_by[name] = [r for r in old_rejected if r["shard"] == name]
            if name in manifest.get("landing", {}).get("ingested", {}):
                landed_info[name] = manifest["landing"]["ingested"][name]
            if (out_dir / f"{name}.tar").exists():  # unchanged: linked, not copied
                _link_or_copy(out_dir / f"{name}.tar", work / f"{name}.tar")
    for u in selected:
        if u.key_prefix:  # paths relative to the landing folder: the same bytes anywhere
            path = u.paths[0]
            landed_info[u.name] = {
                "path": path.relative_to(landing).as_posix(),
                "bytes": path.stat().st_size,
            }
    order = sorted(per_shard)
    rows = [row for n in order for row in rows_by[n]]
    rejected = [row for n in order for row in rejected_by[n]]
    repairs = Counter()
    for n in order:
        repairs.update(per_shard[n]["repairs"])
    for f in work.glob("*.result.json"):
        f.unlink()
    _write_parquet(work / "index.parquet", rows, INDEX_SCHEMA)
    _write_parquet(work / "rejected.parquet", rejected, REJECTED_SCHEMA)
    manifest = {
        "params": params.to_dict(),
        "counts": {
            "input": sum(per_shard[n]["input"] for n in order),
            "kept": len(rows),
            "rejected": len(rejected),
            "shards": sum(1 for n in order if rows_by[n]),
            "train": sum(1 for r in rows if r["split"] == "train"),
            "eval": sum(1 for r in rows if r["split"] == "eval"),
            "human_captioned": sum(1 for r in rows if r["has_human_captions"]),
            "empty_alt_text": sum(1 for r in rows if not r["alt_text"]),
        },
        "rejected_by_reason": _count(r["reason"] for r in rejected),
        "repaired_by_kind": dict(sorted(repairs.items())),
        "noise_kinds": _count(r["noise_kind"] for r in rows if r["noise_kind"]),
        "per_shard": {n: per_shard[n] for n in order},
        "built_shards": sorted(u.name for u in selected),
        # What the folder held at build time; what still waits is transient, so it goes
        # to the report, not the manifest (the same inputs give the same bytes).
        "landing": {
            "ingested": dict(sorted(landed_info.items())),
            "rejected": {_rel(p, landing): why for p, why in scan.rejected.items()},
        },
    }
    write_text_atomic(work / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    _swap_in(work, out_dir)
    waiting = {_rel(p, landing): why for p, why in scan.waiting.items()}
    return BuildReport(out_dir, manifest, waiting)


def _rel(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/raw")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    params = RawDatasetParams.from_dict(load_section(args.params, "raw_alt_text_dataset"))
    report = build_raw_dataset(
        params, args.out, workers=args.workers, landing_root=Path(params.landing_dir)
    )
    print(json.dumps(report.counts))


if __name__ == "__main__":
    main()
