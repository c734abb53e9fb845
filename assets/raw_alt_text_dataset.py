"""Asset `raw_alt_text_dataset`: the web-like corpus of images and alt-text, validated,
sharded and DVC-versioned under data/raw. One partition per raw shard: the source's
shards and the img2dataset shards dropped in the landing folder (`landed-...`), so a new
shard is ingested, and then recaptioned, alone."""

import json
import warnings

import dagster as dg
import mlflow
import pandas as pd
import pyarrow.parquet as pq

from assets.metadata import (
    count_table,
    file_md5,
    flatten,
    md_escape,
    preview_grid,
    preview_metadata,
)
from assets.partitions import raw_shards
from assets.reuse import build_or_reuse
from corpus.params import RawDatasetParams
from corpus.raw_dataset import build_raw_dataset
from corpus.shards import read_preview, shard_keys
from corpus.sources import landed_units, make_units

STAGE = "raw_alt_text_dataset"  # the asset key and the dvc.yaml stage name


class RawAltTextDatasetConfig(dg.Config):
    """Runtime knobs only; the dataset's parameters are params.yaml's
    `raw_alt_text_dataset` section, shared with `dvc repro`."""

    workers: int = 2
    preview_samples: int = 16


def shard_names(project) -> list[str]:
    """Every raw shard the configured source and the landing folder define now."""
    params = RawDatasetParams.from_dict(project.params(STAGE))
    landed, _ = landed_units(params, project.path / params.landing_dir)
    return [u.name for u in make_units(params)] + [u.name for u in landed]


def register_shards(instance: dg.DagsterInstance, project) -> list[str]:
    """Add the missing shards as partitions; returns every partition, in Dagster's order
    (the order of registration), for a `first...last` partition range."""
    known = set(instance.get_dynamic_partitions(raw_shards.name))
    new = [n for n in shard_names(project) if n not in known]
    if new:
        instance.add_dynamic_partitions(raw_shards.name, new)
    return list(instance.get_dynamic_partitions(raw_shards.name))


@dg.asset(
    name=STAGE,
    partitions_def=raw_shards,
    # Partition runs (one per landed shard) rewrite the shared index and DVC stage:
    # one writer at a time (the pool's limit is 1, dagster.yaml).
    pool="corpus_write",
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="data",
    kinds={"python", "dvc", "mlflow"},
    required_resource_keys={"project", "dvc", "mlflow"},
    description=__doc__,
)
def raw_alt_text_dataset(
    context: dg.AssetExecutionContext, config: RawAltTextDatasetConfig
) -> dg.MaterializeResult:
    # Per shard, what is already ingested is skipped inside; the step is only timed here.
    return build_or_reuse(context, STAGE, lambda: _build(context, config), reuse=False)


def _build(
    context: dg.AssetExecutionContext, config: RawAltTextDatasetConfig
) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    params = RawDatasetParams.from_dict(project.params(STAGE))
    out = project.data_path("raw")
    landing = project.path / params.landing_dir
    landing.mkdir(parents=True, exist_ok=True)  # a dependency of the DVC stage
    shards = list(context.partition_keys)
    context.log.info(f"building shards {shards[0]}..{shards[-1]} of {out}")
    report = build_raw_dataset(
        params, out, workers=config.workers, shards=shards, landing_root=landing
    )
    hashes = dvc.commit(STAGE)
    dvc_hash = hashes["data/raw"]
    manifest = report.manifest
    built = [s for s in shards if (out / f"{s}.tar").exists()]
    # One partition: its shard's md5 (what DVC records for it); a range: the folder's hash.
    version = file_md5(out / f"{shards[0]}.tar") if len(shards) == 1 and built else dvc_hash

    first_shard = out / f"{built[0]}.tar" if built else None
    grid = preview_grid(read_preview(first_shard, config.preview_samples)) if first_shard else None
    with mlflow_res.start_run(
        STAGE, tags={"dagster_run_id": context.run.run_id, "dvc_hash": dvc_hash, "asset": STAGE}
    ) as run:
        mlflow.log_params(flatten(manifest["params"]))
        mlflow.log_metrics({k: float(v) for k, v in report.counts.items()})
        mlflow.log_metrics(
            {f"rejected.{k}": float(v) for k, v in manifest["rejected_by_reason"].items()}
        )
        mlflow.log_dict(manifest, "manifest.json")
        if grid is not None:
            mlflow.log_image(grid, "preview.png")
        index = pd.read_parquet(out / "index.parquet")
        with warnings.catch_warnings():  # mlflow's schema-inference hints about int columns
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                index, source=str(out), name=STAGE, digest=dvc_hash[:32]
            )
        mlflow.log_input(dataset, context="raw")
        run_meta = mlflow_res.run_metadata(run)

    metadata = {
        "path": dg.MetadataValue.path(str(out)),
        "dvc_md5": dvc_hash,
        "dagster/row_count": int(index["shard"].isin(shards).sum()),
        "shards_built": dg.MetadataValue.json(manifest["built_shards"]),
        **{f"count_{k}": v for k, v in report.counts.items()},
        "rejected_by_reason": count_table(manifest["rejected_by_reason"], "reason"),
        "repaired_by_kind": count_table(manifest["repaired_by_kind"], "repair"),
        "params": dg.MetadataValue.json(manifest["params"]),
        **run_meta,
    }
    if manifest["noise_kinds"]:
        metadata["alt_text_noise_kinds"] = count_table(manifest["noise_kinds"], "noise kind")
    if grid is not None:
        metadata["preview"] = preview_metadata(grid, "sample images with their alt-text")
    landing_state = {
        **{p: f"ingested as {n}" for n, p in _landed_paths(manifest).items()},
        **{p: f"rejected: {why}" for p, why in manifest["landing"]["rejected"].items()},
        **{p: f"waiting: {why}" for p, why in report.landing_waiting.items()},
    }
    if landing_state:
        metadata["landing_folder"] = dg.MetadataValue.md(
            "| shard file | state |\n|---|---|\n"
            + "\n".join(f"| {md_escape(p)} | {md_escape(v)} |" for p, v in landing_state.items())
        )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


def _landed_paths(manifest: dict) -> dict[str, str]:
    return {n: info["path"] for n, info in manifest["landing"]["ingested"].items()}


@dg.asset_check(asset=STAGE, required_resource_keys={"project"}, blocking=True)
def raw_alt_text_dataset_conserved(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every input sample is either kept or rejected with a reason: input = kept + rejected,
    keys are unique, and the shards hold exactly the indexed samples."""
    out = context.resources.project.data_path("raw")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    index_keys = pq.read_table(out / "index.parquet", columns=["key"]).column("key").to_pylist()
    n_rejected = pq.read_metadata(out / "rejected.parquet").num_rows
    in_shards = [k for tar in sorted(out.glob("*.tar")) for k in shard_keys(tar)]
    n_input = manifest["counts"]["input"]
    problems = []
    if n_input != len(index_keys) + n_rejected:
        problems.append(f"input {n_input} != kept {len(index_keys)} + rejected {n_rejected}")
    if len(set(index_keys)) != len(index_keys):
        problems.append(f"{len(index_keys) - len(set(index_keys))} duplicate keys in the index")
    if sorted(in_shards) != sorted(index_keys):
        problems.append(f"shards hold {len(in_shards)} samples, the index {len(index_keys)}")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "input = kept + rejected",
        metadata={
            "input": n_input,
            "kept": len(index_keys),
            "rejected": n_rejected,
            "in_shards": len(in_shards),
        },
    )
