"""New data: img2dataset shards dropped in the landing folder flow into the lineage.

`landing_shards` (every 30 s) registers each ready shard of the landing folder
(corpus/landing.py) as a new partition of `raw_alt_text_dataset` and requests one run
per shard that ingests it and recaptions it (`raw_alt_text_dataset` + `recaptioned_dataset`
for that partition only). A shard still being written waits; a broken one is rejected
with its reason, logged on the tick, and written to `data/operations/landing.json`; the
others go on. It also registers the configured source's shards, so a fresh instance
shows every partition in the UI.

`retrain_on_new_data` then applies the policy of params.yaml `operations.on_new_data`:
`retrain` (default) requests one `retrain` run once the landed shards are recaptioned and
no landing run is still queued or running; `manual` only records that new data arrived.
"""

import json
import time
from pathlib import Path

import dagster as dg

from assets.partitions import raw_shards
from corpus.atomic import write_text_atomic
from corpus.landing import file_fingerprint, scan_landing
from corpus.params import RawDatasetParams
from corpus.sources import make_units
from pipelines.resources.project import ProjectResource
from pipelines.retraining import retrain, retrain_tags

LANDING_TAG = "recapflow/trigger"
POLICIES = ("retrain", "manual")
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _record(project, updates: dict[str, dict]) -> None:
    """data/operations/landing.json: the latest verdict on each landed file."""
    path = project.data_path("operations", "landing.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    state.update(updates)
    write_text_atomic(path, json.dumps(state, indent=2, sort_keys=True))


@dg.sensor(
    name="landing_shards",
    target=["raw_alt_text_dataset", "recaptioned_dataset"],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def landing_shards(
    context: dg.SensorEvaluationContext, project: ProjectResource
) -> dg.SensorResult:
    params = RawDatasetParams.from_dict(project.params("raw_alt_text_dataset"))
    landing = project.path / params.landing_dir
    judged: dict[str, str] = json.loads(context.cursor or "{}")  # path -> fingerprint
    scan = scan_landing(landing, params.landing_settle_seconds, seen=set(judged.items()))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    known = set(context.instance.get_dynamic_partitions(raw_shards.name))
    wanted = [u.name for u in make_units(params)] + [s.name for s in scan.ready]
    new_partitions = [n for n in dict.fromkeys(wanted) if n not in known]
    requests = [
        dg.RunRequest(
            run_key=f"{s.name}@{s.fingerprint}",
            partition_key=s.name,
            tags={LANDING_TAG: "landing", "recapflow/landed_file": s.path.name},
        )
        for s in scan.ready
    ]
    updates = {}
    for s in scan.ready:
        judged[str(s.path)] = s.fingerprint
        updates[str(s.path)] = {"state": "requested", "partition": s.name, "at": now}
        context.log.info(f"new shard {s.path} -> partition {s.name}")
    for path, why in scan.rejected.items():
        judged[path] = file_fingerprint(Path(path))  # judged again only once replaced
        updates[path] = {"state": "rejected", "reason": why, "at": now}
        context.log.warning(f"rejected landed shard {path}: {why}")
    for path, why in scan.waiting.items():
        updates[path] = {"state": "waiting", "reason": why, "at": now}
    if updates:
        _record(project, updates)
    skip = None
    if not requests:
        skip = "no new shard in the landing folder" + (
            f"; rejected: {scan.rejected}" if scan.rejected else ""
        )
    return dg.SensorResult(
        run_requests=requests,
        skip_reason=skip,
        cursor=json.dumps(judged, sort_keys=True),
        dynamic_partitions_requests=(
            [raw_shards.build_add_request(new_partitions)] if new_partitions else []
        ),
    )


def new_data_policy(project) -> str:
    policy = (project.params("operations") or {}).get("on_new_data", "retrain")
    if policy not in POLICIES:
        raise ValueError(f"operations.on_new_data must be one of {POLICIES}, got {policy!r}")
    return policy


@dg.sensor(
    name="retrain_on_new_data",
    job=retrain,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def retrain_on_new_data(
    context: dg.SensorEvaluationContext, project: ProjectResource
) -> dg.SensorResult:
    after = int(context.cursor or 0)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("recaptioned_dataset"), after_storage_id=after),
        limit=1000,
        ascending=True,
    ).records
    # Only the landing runs' recaptions: a retrain recaptions every shard (skipping current
    # ones) and must not trigger itself again.
    runs = {r.run_id for r in records}
    from_landing = {
        run_id
        for run_id in runs
        if (run := context.instance.get_run_by_id(run_id))
        and run.tags.get(LANDING_TAG) == "landing"
    }
    landed = sorted({r.partition_key for r in records if r.run_id in from_landing})
    if not records:
        return dg.SensorResult(skip_reason="no new recaptioned shard")
    latest = str(max(r.storage_id for r in records))
    if not landed:
        return dg.SensorResult(skip_reason="no new landed shard recaptioned", cursor=latest)
    policy = new_data_policy(project)
    if policy == "manual":
        return dg.SensorResult(
            skip_reason=f"new shards {landed} recaptioned; operations.on_new_data is manual",
            cursor=latest,
        )
    busy = context.instance.get_runs(
        filters=dg.RunsFilter(tags={LANDING_TAG: "landing"}, statuses=IN_FLIGHT)
    )
    if busy:  # retrain once on the whole batch, not once per shard
        return dg.SensorResult(skip_reason=f"waiting for {len(busy)} landing runs to finish")
    tags = {
        **retrain_tags(context.instance),
        LANDING_TAG: "new_data",
        "recapflow/new_shards": ",".join(landed)[:200],
    }
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"new-data-{latest}", tags=tags)], cursor=latest
    )
