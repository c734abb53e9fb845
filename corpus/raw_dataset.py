"""Build `data/raw`: validated webdataset shards, `index.parquet`, `rejected.parquet` and
`manifest.json` from any source. The Dagster asset and the DVC stage both call
`build_raw_dataset`, so `dvc repro` and a materialization write the same bytes.

Resume: the work goes to `<out>.partial-<params hash>`; each finished shard leaves its
tar and a `.result.json` there, so a killed run redoes only unfinished shards. The final
folder is swapped in only when everything is written.

    python -m corpus.raw_dataset --params params.yaml --out data/raw
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from corpus.atomic import write_text_atomic
from corpus.params import RawDatasetParams, load_params
from corpus.sample_check import DUPLICATE_KEY, CleanSample, Rejection, check_sample
from corpus.shards import write_shard
from corpus.sources import Unit, make_units, split_of

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


def build_raw_dataset(
    params: RawDatasetParams, out_dir: str | Path, workers: int = 2, progress: bool = True
) -> BuildReport:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.with_name(f"{out_dir.name}.partial-{params_hash(params)}")
    for stale in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
        if stale != work:  # a killed build with other params: not resumable
            shutil.rmtree(stale)
    work.mkdir(exist_ok=True)
    units = make_units(params)
    done = {}
    for u in units:
        f = work / f"{u.name}.result.json"
        if f.exists():
            done[u.name] = json.loads(f.read_text(encoding="utf-8"))
    todo = [u for u in units if u.name not in done]
    bar = tqdm(
        total=len(units), initial=len(done), desc="raw shards", unit="shard", disable=not progress
    )
    if params.source == "synthetic" and workers > 1 and len(todo) > 1:
        # Synthetic keys are unique by construction, so units need no shared state.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_process_unit, u, params, work, None) for u in todo]
            for fut in futures:
                r = fut.result()
                done[r["unit"]] = r
                bar.update()
    else:
        seen: set[str] = set()
        for u in units:
            if u.name in done:
                seen.update(row["key"] for row in done[u.name]["rows"])
                continue
            r = _process_unit(u, params, work, seen)
            seen.update(row["key"] for row in r["rows"])
            done[u.name] = r
            bar.update()
    bar.close()

    results = [done[u.name] for u in units]
    rows = [row for r in results for row in r["rows"]]
    rejected = [row for r in results for row in r["rejected"]]
    repairs = Counter()
    for r in results:
        repairs.update(r["repairs"])
    for r in results:
        (work / f"{r['unit']}.result.json").unlink()
    _write_parquet(work / "index.parquet", rows, INDEX_SCHEMA)
    _write_parquet(work / "rejected.parquet", rejected, REJECTED_SCHEMA)
    manifest = {
        "params": params.to_dict(),
        "counts": {
            "input": sum(r["input"] for r in results),
            "kept": len(rows),
            "rejected": len(rejected),
            "shards": sum(1 for r in results if r["rows"]),
            "train": sum(1 for r in rows if r["split"] == "train"),
            "eval": sum(1 for r in rows if r["split"] == "eval"),
            "human_captioned": sum(1 for r in rows if r["has_human_captions"]),
            "empty_alt_text": sum(1 for r in rows if not r["alt_text"]),
        },
        "rejected_by_reason": _count(r["reason"] for r in rejected),
        "repaired_by_kind": dict(sorted(repairs.items())),
        "noise_kinds": _count(r["noise_kind"] for r in rows if r["noise_kind"]),
    }
    write_text_atomic(work / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    _swap_in(work, out_dir)
    return BuildReport(out_dir, manifest)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/raw")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    params = RawDatasetParams.from_dict(load_params(args.params).get("raw_alt_text_dataset", {}))
    report = build_raw_dataset(params, args.out, workers=args.workers)
    print(json.dumps(report.counts))


if __name__ == "__main__":
    main()
