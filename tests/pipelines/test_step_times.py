"""`make run` ends with the wall time of each step it materialized, built or reused."""

import time
from types import SimpleNamespace

import dagster as dg

from assets.reuse import REBUILD_ENV, REBUILD_TAG, build_or_reuse, rebuild_requested
from pipelines.where import step_table, step_times, summary


@dg.asset(name="captioner")
def fake_captioner(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return build_or_reuse(
        context, "captioner", lambda: dg.MaterializeResult(metadata={"n": 1}), reuse=False
    )


@dg.asset(name="recaptioned_dataset", partitions_def=dg.StaticPartitionsDefinition(["a", "b"]),
          backfill_policy=dg.BackfillPolicy.single_run())  # fmt: skip
def fake_recaptions(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    def build() -> dg.MaterializeResult:
        time.sleep(0.2)
        return dg.MaterializeResult()

    return build_or_reuse(context, "recaptioned_dataset", build, reuse=False)


def test_each_step_is_timed_once_per_run_and_only_after_the_start():
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([fake_captioner], instance=instance)
    since = time.time()
    dg.materialize([fake_captioner], instance=instance)
    dg.materialize(
        [fake_recaptions],
        instance=instance,
        tags={"dagster/asset_partition_range_start": "a", "dagster/asset_partition_range_end": "b"},
    )
    rows = step_times(instance, since)
    assert [(name, how) for name, _, how in rows] == [
        ("captioner", "built"),
        ("recaptioned_dataset", "built"),
    ]
    # Two partitions in one run: the run's time once, not once per partition.
    assert 0.2 <= rows[1][1] < 0.4
    table = step_table(rows, 12.0)
    assert "recaptioned_dataset" in table and "0m12s" in table


def test_rebuild_is_asked_by_environment_or_run_tag(monkeypatch):
    tags = {REBUILD_TAG: "diffusion_model, eval_report"}
    context = SimpleNamespace(run=SimpleNamespace(tags=tags))
    monkeypatch.delenv(REBUILD_ENV, raising=False)
    assert rebuild_requested(context, "eval_report")
    assert not rebuild_requested(context, "captioner")
    monkeypatch.setenv(REBUILD_ENV, "all")
    assert rebuild_requested(context, "captioner")


def test_a_step_make_run_did_not_launch_is_shown_current():
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([fake_captioner], instance=instance)
    since = time.time()
    assert step_times(instance, since) == [("captioner", 0.0, "current, not run")]


def test_the_printout_says_how_faithful_the_prompt_expander_is(tmp_path):
    folder = tmp_path / "data" / "prompt_expander"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text('{"suite_short": {"unfaithful": 0.25}}')
    line = [ln for ln in summary(tmp_path).splitlines() if "prompt expander" in ln]
    assert line == [
        f"  prompt expander       {folder}  (suite short prompts: 0.250 of expansions "
        "drop or contradict a claim as sampled)"
    ]
