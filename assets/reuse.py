"""Nothing is rebuilt that did not change, and every step says how long it took.

DVC already records, for each stage of dvc.yaml, the content hash of every dependency
(the code folders the stage runs, its upstream data), the stage's parameters and its
outputs: each asset writes them to dvc.lock with `dvc commit` once its files are written.
So when `dvc status <stage>` finds nothing changed, the files on disk are what the same
code, parameters and inputs made, and the asset returns its last materialization's
metadata, marked `reused`, instead of training again. A change anywhere upstream changes
the hash of a dependency downstream, so exactly the stages after it rebuild: editing
`mixed_sampler.synthetic_ratio` rebuilds the sampler, the diffusion model and the eval
report, and reuses the captioner, the autoencoder and the two evaluators.

To rebuild anyway: the environment variable `RECAPFLOW_REBUILD` (`make run REBUILD=...`)
or the run tag `recapflow/rebuild` (the UI's launchpad), either `all` or a comma-separated
list of asset names.

Every materialization gets `wall_seconds` (reused or built), which `make run`'s closing
table (pipelines/where.py) reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import dagster as dg

REBUILD_ENV = "RECAPFLOW_REBUILD"
REBUILD_TAG = "recapflow/rebuild"


def rebuild_asked(stage: str, *asked: str) -> bool:
    """One of the comma-separated lists `asked` names `stage` or `all`."""
    names = {n.strip() for text in asked for n in text.split(",") if n.strip()}
    return "all" in names or stage in names


def rebuild_requested(context: dg.AssetExecutionContext, stage: str) -> bool:
    """The run tag or the environment asks for `stage` (or `all`) to be built again."""
    return rebuild_asked(
        stage, context.run.tags.get(REBUILD_TAG, ""), os.environ.get(REBUILD_ENV, "")
    )


def _reused(context: dg.AssetExecutionContext, stage: str) -> dg.MaterializeResult | None:
    dvc = context.resources.dvc
    changes = dvc.changes(stage)
    if changes:
        context.log.info(f"{stage}: building, DVC reports changes since dvc.lock: {changes}")
        return None
    hashes = dvc.out_hashes(stage)
    last = context.instance.get_latest_materialization_event(context.asset_key)
    mat = last.asset_materialization if last else None
    previous = dict(mat.metadata) if mat else {}
    for key in ("wall_seconds", "reused", "reused_from_run"):
        previous.pop(key, None)
    context.log.info(f"{stage}: reused, its code, parameters and inputs match dvc.lock")
    return dg.MaterializeResult(
        metadata={
            **previous,
            "reused": True,
            "reused_from_run": last.run_id if last else "(built outside Dagster: dvc repro)",
            "dvc_md5": next(iter(hashes.values())),
        },
        data_version=dg.DataVersion(next(iter(hashes.values()))),
    )


def build_or_reuse(
    context: dg.AssetExecutionContext,
    stage: str,
    build: Callable[[], dg.MaterializeResult],
    reuse: bool = True,
) -> dg.MaterializeResult:
    """`build()`'s result, or the last one when DVC says `stage` is unchanged (and `reuse`
    and no rebuild was asked for); `wall_seconds` and `reused` added to its metadata."""
    start = time.perf_counter()
    result = None
    if reuse and not rebuild_requested(context, stage):
        result = _reused(context, stage)
    reused = result is not None
    if result is None:
        result = build()
    return dg.MaterializeResult(
        metadata={
            **(result.metadata or {}),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "reused": reused,
        },
        data_version=result.data_version,
        check_results=result.check_results,
    )
