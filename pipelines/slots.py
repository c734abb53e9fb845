"""Pool slots that a dead step left claimed are given back.

Dagster frees a step's slot in its pool (`gpu`, `corpus_write`) when the step ends. A step
whose processes die without reporting an end (killed, out of memory, the terminal closed
on `make run`) keeps its slot claimed, and every later step of that pool waits with "Step
blocked by limit for pool ...". On one machine (`make run`, `dagster dev`, SQLite storage)
such a claim (or a dead run's place in a pool's queue, which blocks it as well) is found
exactly: the event log records the pid of every process that worked
on a run (the run's own and each step's), and when none of them is alive the run cannot
free its slots any more. `free_dead_slots` frees them and marks the run failed. It runs
before each of `make run`'s steps and every minute as the sensor `free_dead_slots`
(`dagster dev` and the daemon). A run that has ended but still holds a slot is freed too.

With shared storage (Postgres: several machines, the docker and k8s launchers), a pid says
nothing about another machine; there Dagster's run monitoring (`run_monitoring` in
deploy/dagster.yaml) marks dead run workers failed and frees the slots of ended runs.

    python -m pipelines.slots    # prints what it freed
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from corpus.atomic import pid_alive


@dataclass(frozen=True)
class FreedSlot:
    pool: str
    run_id: str
    step_key: str
    reason: str


def _run_pids(instance: dg.DagsterInstance, run_id: str) -> set[int]:
    return {
        e.dagster_event.pid
        for e in instance.all_logs(run_id)
        if e.dagster_event is not None and e.dagster_event.pid is not None
    }


def is_local(instance: dg.DagsterInstance) -> bool:
    """The instance's event log lives on this machine (SQLite): pids can be checked here."""
    return isinstance(instance.event_log_storage, SqliteEventLogStorage)


def free_dead_slots(instance: dg.DagsterInstance) -> list[FreedSlot]:
    """Free every slot held by a run that has ended or whose processes are all gone (the
    latter on a local instance only); mark such a run failed. Returns what was freed."""
    storage = instance.event_log_storage
    freed: list[FreedSlot] = []
    dead: dict[str, str] = {}  # run id -> why its slots are freed
    alive: set[str] = set()
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        # A dead run waiting in line blocks the pool too: slots go to pending steps in order.
        for claim in [*info.claimed_slots, *info.pending_steps]:
            if claim.run_id in alive:
                continue
            if claim.run_id not in dead:
                reason = _why_dead(instance, claim.run_id)
                if reason is None:
                    alive.add(claim.run_id)
                    continue
                dead[claim.run_id] = reason
            freed.append(FreedSlot(pool, claim.run_id, claim.step_key, dead[claim.run_id]))
    for run_id, reason in dead.items():
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.report_run_failed(run, f"recapflow: {reason}; its pool slots were freed")
        storage.free_concurrency_slots_for_run(run_id)
    return freed


def _why_dead(instance: dg.DagsterInstance, run_id: str) -> str | None:
    run = instance.get_run_by_id(run_id)
    if run is None:
        return "the run no longer exists"
    if run.is_finished:
        return f"the run ended ({run.status.value}) without freeing its slots"
    if not is_local(instance):
        return None
    pids = _run_pids(instance, run_id)
    if not pids or any(pid_alive(p) for p in pids):
        return None  # not started yet, or still working
    return f"no process of the run is alive (pids {sorted(pids)})"


@dg.sensor(
    name="free_dead_slots",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Frees pool slots held by runs whose processes died (pipelines/slots.py).",
)
def free_dead_slots_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    freed = free_dead_slots(context.instance)
    for f in freed:
        context.log.warning(f"freed pool {f.pool} slot of {f.run_id} / {f.step_key}: {f.reason}")
    return dg.SkipReason(f"freed {len(freed)} slot(s)" if freed else "no dead claims")


def main() -> None:
    for f in free_dead_slots(dg.DagsterInstance.get()):
        print(f"freed pool {f.pool} slot of run {f.run_id} step {f.step_key}: {f.reason}")


if __name__ == "__main__":
    main()
