"""Asset `raw_alt_text_dataset`: the web-like corpus of images and alt-text, validated,
sharded and DVC-versioned under data/raw."""

import json
import warnings

import dagster as dg
import mlflow
import pandas as pd
import pyarrow.parquet as pq

from assets.metadata import count_table, flatten, preview_grid, preview_metadata
from assets.partitions import raw_shards
from corpus.params import RawDatasetParams
from corpus.raw_dataset import build_raw_dataset
from corpus.shards import read_preview, shard_keys

STAGE = "raw_alt_text_dataset"  # the asset key and the dvc.yaml stage name


class RawAltTextDatasetConfig(dg.Config):
    """Runtime knobs only; the dataset's parameters are params.yaml's
    `raw_alt_text_dataset` section, shared with `dvc repro`."""

    workers: int = 2
    preview_samples: int = 16


@dg.asset(
    name=STAGE,
    group_name="data",
    kinds={"python", "dvc", "mlflow"},
    required_resource_keys={"project", "dvc", "mlflow"},
    description=__doc__,
)
def raw_alt_text_dataset(
    context: dg.AssetExecutionContext, config: RawAltTextDatasetConfig
) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    params = RawDatasetParams.from_dict(project.params(STAGE))
    out = project.data_path("raw")
    context.log.info(f"building {out} from source {params.source!r}")
    report = build_raw_dataset(params, out, workers=config.workers)
    shards = sorted(p.stem for p in out.glob("*.tar"))
    new = [s for s in shards if not context.instance.has_dynamic_partition(raw_shards.name, s)]
    if new:  # each raw shard is a partition of the stages downstream (recaptioning)
        context.instance.add_dynamic_partitions(raw_shards.name, new)
    hashes = dvc.commit(STAGE)
    dvc_hash = hashes["data/raw"]
    manifest = report.manifest

    first_shard = sorted(out.glob("*.tar"))[0] if report.counts["kept"] else None
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
        "dagster/row_count": report.counts["kept"],
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
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(dvc_hash))


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
