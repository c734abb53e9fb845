"""`make run` launches a Dagster run for a step only when one of its assets needs it."""

import json

import dagster as dg

from assets.partitions import raw_shards
from assets.reuse import REBUILD_ENV
from pipelines.stale import reasons


class FakeDvc:
    """`dvc status --json` answering with the given changes per stage."""

    def __init__(self, changes: dict):
        self.changes, self.asked = changes, []

    def run(self, *args: str) -> str:
        self.asked.append(args)
        return json.dumps({s: c for s, c in self.changes.items() if s in args})


@dg.asset(name="captioner")
def captioner() -> None:
    pass


@dg.asset(name="recaptioned_dataset", partitions_def=raw_shards)
def recaptioned() -> None:
    pass


def _instance_with_captioner_and_one_of_two_shards() -> dg.DagsterInstance:
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([captioner], instance=instance)
    instance.add_dynamic_partitions(raw_shards.name, ["00000", "00001"])
    dg.materialize([recaptioned], instance=instance, partition_key="00000")
    return instance


def test_a_step_unchanged_since_dvc_lock_and_materialized_needs_no_run(monkeypatch):
    monkeypatch.delenv(REBUILD_ENV, raising=False)
    instance = _instance_with_captioner_and_one_of_two_shards()
    dvc = FakeDvc({})
    assert reasons(["captioner"], instance, dvc) == {}
    assert dvc.asked == [("status", "--json", "captioner")]


def test_changes_rebuild_requests_and_missing_materializations_each_need_a_run(monkeypatch):
    instance = _instance_with_captioner_and_one_of_two_shards()
    monkeypatch.delenv(REBUILD_ENV, raising=False)
    changed = [{"changed deps": {"params.yaml": {"captioner": "modified"}}}]
    why = reasons(["captioner"], instance, FakeDvc({"captioner": changed}))
    assert "params.yaml" in why["captioner"]
    # One of two registered shards was never recaptioned.
    why = reasons(["recaptioned_dataset"], instance, FakeDvc({}))
    assert why == {"recaptioned_dataset": "1 partitions without a materialization"}
    why = reasons(["eval_report"], instance, FakeDvc({}))
    assert why == {"eval_report": "never materialized in this Dagster instance"}
    monkeypatch.setenv(REBUILD_ENV, "captioner")
    assert set(reasons(["captioner"], instance, FakeDvc({}))) == {"captioner"}
