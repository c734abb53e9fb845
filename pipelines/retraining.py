"""Scheduled retraining and the record of failed runs.

`retrain` refreshes the lineage from the recaptioned corpus on: `recaptioned_dataset` over
every raw shard (one run; shards already captioned by the current captioner are skipped,
so only new or stale ones cost anything), the caption blend, the diffusion model
(launched through the `launcher`) and its eval report, whose gate promotes the new
challenger to `champion` only when it is not worse beyond noise. Its runs cover the
partition range of every raw shard (`retrain_tags`). The cron comes from params.yaml
(`operations.retrain_cron`, weekly by default); the schedule is off until turned on in
the UI or with `dagster schedule start retrain_schedule`.

`record_failed_runs` appends every failed run to `data/operations/failures.jsonl` with the
failed steps, the error and a link to the run in the Dagster UI (`RECAPFLOW_DAGSTER_UI`).
The world judge and the reference CLIP are frozen evaluators: retraining reuses them.
"""

import json
import os
import time
from pathlib import Path

import dagster as dg

from assets.partitions import raw_shards
from corpus.atomic import write_text_atomic
from corpus.params import load_params
from pipelines.resources.project import default_project_dir

RETRAIN_SELECTION = [
    "recaptioned_dataset",
    "mixed_sampler",
    "text_encoder",
    "diffusion_model",
    "eval_report",
]
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00


def retrain_cron(project_dir: str | None = None) -> str:
    params = load_params(os.path.join(project_dir or default_project_dir(), "params.yaml"))
    return (params.get("operations") or {}).get("retrain_cron", DEFAULT_CRON)


retrain = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets(*RETRAIN_SELECTION),
    description="Recaption what is new, blend, train, evaluate and gate: the weekly retraining.",
)


def partition_range_tags(keys: list[str]) -> dict[str, str]:
    """Run tags of a single-run partition range, as `--partition-range first...last`."""
    return {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }


def retrain_tags(instance: dg.DagsterInstance) -> dict[str, str] | None:
    """Run tags of a retrain over every raw shard, or None before any shard exists."""
    keys = instance.get_dynamic_partitions(raw_shards.name)
    return partition_range_tags(keys) if keys else None


@dg.schedule(
    name="retrain_schedule",
    job=retrain,
    cron_schedule=retrain_cron(),
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def retrain_schedule(context: dg.ScheduleEvaluationContext):
    tags = retrain_tags(context.instance)
    if tags is None:
        return dg.SkipReason("no raw shard partitions yet: materialize raw_alt_text_dataset")
    return dg.RunRequest(tags=tags)


def ui_url() -> str:
    return os.environ.get("RECAPFLOW_DAGSTER_UI", "http://127.0.0.1:3000")


@dg.run_failure_sensor(name="record_failed_runs", default_status=dg.DefaultSensorStatus.RUNNING)
def record_failed_runs(context: dg.RunFailureSensorContext) -> None:
    run = context.dagster_run
    record = {
        "run_id": run.run_id,
        "job": run.job_name,
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "error": context.failure_event.message,
        "steps": [e.step_key for e in context.get_step_failure_events()],
        "url": f"{ui_url().rstrip('/')}/runs/{run.run_id}",
    }
    path = Path(default_project_dir()) / "data" / "operations" / "failures.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text_atomic(path, previous + json.dumps(record) + "\n")
    context.log.info(f"recorded failed run {run.run_id}: {record['url']}")
