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
from assets.reuse import REBUILD_ENV
from pipelines.resources.dvc import DvcResource
from pipelines.resources.project import default_project_dir

PARTITIONED = ("raw_alt_text_dataset", "recaptioned_dataset")


def reasons(names: list[str], instance: dg.DagsterInstance, dvc: DvcResource) -> dict[str, str]:
    """{asset: why it needs a run} for the assets of `names` that need one."""
    asked = {n.strip() for n in os.environ.get(REBUILD_ENV, "").split(",") if n.strip()}
    changes = json.loads(dvc.run("status", "--json", *names) or "{}")
    partitions = instance.get_dynamic_partitions(raw_shards.name)
    why = {}
    for name in names:
        key = dg.AssetKey(name)
        if "all" in asked or name in asked:
            why[name] = f"{REBUILD_ENV} asks for it"
        elif changes.get(name):
            why[name] = f"dvc status: {changes[name]}"
        elif name in PARTITIONED:
            missing = set(partitions) - instance.get_materialized_partitions(key)
            if not partitions or missing:
                why[name] = f"{len(missing) or 'no'} partitions without a materialization"
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
