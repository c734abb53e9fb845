"""A step killed while it holds its pool slot does not block the pool's next step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.slots import free_dead_slots

pytestmark = pytest.mark.slow

DEFS = """
import time

import dagster as dg


@dg.asset(pool="gpu")
def long_training():
    time.sleep(600)


@dg.asset(pool="gpu")
def next_training():
    return 1


defs = dg.Definitions(assets=[long_training, next_training])
"""
DAGSTER = str(Path(sys.executable).parent / "dagster")


@pytest.fixture
def dagster_home(tmp_path):
    """(DAGSTER_HOME with pools of one slot, the definitions file, its instance)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"
    )
    defs = tmp_path / "defs.py"
    defs.write_text(DEFS)
    return home, defs, dg.DagsterInstance.from_config(str(home))


@pytest.fixture
def processes():
    """Started `dagster` processes, killed with their step workers whatever the outcome."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _materialize(home: Path, defs: Path, asset: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.Popen(
        [DAGSTER, "asset", "materialize", "-f", str(defs), "--select", asset],
        env=env,
        start_new_session=True,  # its own process group: killed with its step workers
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kwargs,
    )


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_a_killed_step_frees_its_pool_slot_and_the_next_step_runs(dagster_home, processes):
    home, defs, instance = dagster_home
    storage = instance.event_log_storage

    def started_step():
        claims = (
            storage.get_concurrency_info("gpu").claimed_slots
            if "gpu" in (storage.get_concurrency_keys())
            else []
        )
        runs = instance.get_runs()
        started = runs and any(
            e.dagster_event.event_type_value == "STEP_START"
            for e in instance.all_logs(runs[0].run_id)
            if e.dagster_event
        )
        return claims if started else None

    first = _materialize(home, defs, "long_training")
    processes.append(first)
    claims = _wait_for(started_step, 120, "long_training to start holding the gpu slot")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_run = claims[0].run_id
    time.sleep(1)
    # What Dagster leaves: the dead step still holds the only slot, so the next one waits.
    assert [c.run_id for c in storage.get_concurrency_info("gpu").claimed_slots] == [killed_run]
    blocked = _materialize(home, defs, "next_training")
    processes.append(blocked)
    with pytest.raises(subprocess.TimeoutExpired):
        blocked.wait(timeout=45)
    os.killpg(blocked.pid, signal.SIGKILL)
    blocked.wait()

    freed = free_dead_slots(instance)

    # The killed step's slot, and the place in line of the run killed while it waited.
    assert ("gpu", killed_run, "long_training") in [(f.pool, f.run_id, f.step_key) for f in freed]
    assert {f.step_key for f in freed} == {"long_training", "next_training"}
    assert all("no process of the run is alive" in f.reason for f in freed)
    assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE
    info = storage.get_concurrency_info("gpu")
    assert info.claimed_slots == [] and info.pending_steps == []
    nxt = _materialize(home, defs, "next_training")
    processes.append(nxt)
    assert nxt.wait(timeout=180) == 0


def test_a_running_step_keeps_its_slot(dagster_home, processes):
    home, defs, instance = dagster_home
    storage = instance.event_log_storage
    processes.append(_materialize(home, defs, "long_training"))
    _wait_for(
        lambda: (
            "gpu" in storage.get_concurrency_keys()
            and storage.get_concurrency_info("gpu").claimed_slots
        ),
        120,
        "the gpu slot to be claimed",
    )
    assert free_dead_slots(instance) == []
    assert len(storage.get_concurrency_info("gpu").claimed_slots) == 1
