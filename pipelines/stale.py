"""Whether a step of `make run` needs a Dagster run at all.

Each asset already reuses itself when DVC finds its code, parameters and inputs
unchanged (assets/reuse.py), but launching a Dagster run only to be told so costs
process start-ups: about a minute per command on 2 cores. So `make run` asks first, as
Dagster's "materialize unsynced" does: a step runs when one of its assets

- is named by `RECAPFLOW_REBUILD` (or `all`),
- has changes since dvc.lock (`dvc status`: its code, parameters, inputs or outputs),
- or has no materialization in this Dagster instance (for a partitioned asset: some
  registered partition has none), so that the UI shows what is on disk.

    python -m pipelines.stale ASSET[,ASSET...]

prints `build` (with each reason on stderr) or `current`; it fails, and `make run` with
it, when DVC or Dagster cannot be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import dagster as dg

from assets.partitions import raw_shards
from assets.reuse import REBUILD_ENV, rebuild_asked
from pipelines.resources.dvc import DvcResource
from pipelines.resources.project import default_project_dir


def reasons(names: list[str], instance: dg.DagsterInstance, dvc: DvcResource) -> dict[str, str]:
    """{asset: why it needs a run} for the assets of `names` that need one."""
    asked = os.environ.get(REBUILD_ENV, "")
    changes = json.loads(dvc.run("status", "--json", *names) or "{}")
    partitions = instance.get_dynamic_partitions(raw_shards.name)
    why = {}
    for name in names:
        key = dg.AssetKey(name)
        done = instance.get_materialized_partitions(key)  # empty: unpartitioned or none yet
        missing = set(partitions) - done if done else set()
        if rebuild_asked(name, asked):
            why[name] = f"{REBUILD_ENV} asks for it"
        elif changes.get(name):
            why[name] = f"dvc status: {changes[name]}"
        elif missing:
            why[name] = f"{len(missing)} partitions without a materialization"
        elif instance.get_latest_materialization_event(key) is None:
            why[name] = "never materialized in this Dagster instance"
    return why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("assets", help="comma-separated asset names (dvc.yaml stage names)")
    names = [n.strip() for n in ap.parse_args().assets.split(",") if n.strip()]
    why = reasons(names, dg.DagsterInstance.get(), DvcResource(repo_dir=default_project_dir()))
    for name in names:
        print(f"{name}: {why.get(name, 'current, no run needed')}", file=sys.stderr)
    print("build" if why else "current")


if __name__ == "__main__":
    main()
