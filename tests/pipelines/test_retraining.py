"""The retraining schedule and the failed-run record, evaluated with Dagster's testing APIs."""

from __future__ import annotations

import json

import dagster as dg
import yaml

from pipelines import retraining
from tests.conftest import REPO


def test_schedule_takes_its_cron_from_params_and_targets_blend_to_gate(tmp_path):
    assert retraining.retrain_schedule.cron_schedule == retraining.retrain_cron(str(REPO))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["operations"]["retrain_cron"] == retraining.retrain_schedule.cron_schedule
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"operations": {"retrain_cron": "5 4 * * *"}})
    )
    assert retraining.retrain_cron(str(tmp_path)) == "5 4 * * *"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({}))
    assert retraining.retrain_cron(str(tmp_path)) == retraining.DEFAULT_CRON

    from pipelines.definitions import defs

    job = defs.resolve_job_def("retrain")
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert keys == {
        "recaptioned_dataset",
        "mixed_sampler",
        "text_encoder",
        "diffusion_model",
        "eval_report",
    }
    # A schedule context needs a persistent instance, and must be closed: it enters the
    # instance it opens from the ref, which sets Dagster's current defs-state storage for
    # everything that follows in this process (a dangling one breaks later tests).
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(instance=instance, scheduled_execution_time=None) as context,
    ):
        skipped = retraining.retrain_schedule.evaluate_tick(context)
        assert skipped.run_requests == [] and "no raw shard" in skipped.skip_message
        instance.add_dynamic_partitions("raw_shards", ["00000", "00001", "landed-x--00000"])
        request = retraining.retrain_schedule.evaluate_tick(context).run_requests[0]
    assert request.job_name in (None, "retrain")
    assert request.tags["dagster/asset_partition_range_start"] == "00000"  # every shard:
    assert request.tags["dagster/asset_partition_range_end"] == "landed-x--00000"  # one run
    assert retraining.retrain_schedule.default_status == dg.DefaultScheduleStatus.STOPPED


@dg.op
def broken_step():
    raise RuntimeError("the training process exited with code 137")


@dg.job
def broken_job():
    broken_step()


def test_failed_runs_are_recorded_with_a_link(tmp_path, monkeypatch):
    monkeypatch.setenv("RECAPFLOW_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("RECAPFLOW_DAGSTER_UI", "http://dagster.example:3000")
    instance = dg.DagsterInstance.ephemeral()
    result = broken_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
    context = dg.build_run_status_sensor_context(
        sensor_name="record_failed_runs",
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=failure,
    ).for_run_failure()
    retraining.record_failed_runs(context)
    lines = (tmp_path / "data" / "operations" / "failures.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["run_id"] == result.run_id and record["job"] == "broken_job"
    assert record["url"] == f"http://dagster.example:3000/runs/{result.run_id}"
    assert record["steps"] == ["broken_step"]
    retraining.record_failed_runs(context)  # appended, nothing lost
    assert len((tmp_path / "data" / "operations" / "failures.jsonl").read_text().splitlines()) == 2


def test_sweep_variants_are_named_blends_and_bad_ones_are_refused():
    import pytest

    from pipelines.ablation import parse_variant

    assert parse_variant("short_95") == (0.95, "short", 3)  # (ratio, kind, seeds)
    assert parse_variant("descriptive@0.8") == (0.8, "descriptive", 2)
    for bad in ("long@0.5", "short@1.5", "short@x", "nope"):
        with pytest.raises(ValueError, match="unknown ablation variant"):
            parse_variant(bad)


def test_the_example_sweep_config_is_valid_for_the_job():
    from pipelines.definitions import defs

    config = yaml.safe_load((REPO / "configs" / "sweep-blend.yaml").read_text())
    assert dg.validate_run_config(defs.resolve_job_def("caption_ablation"), config)
