"""New data: img2dataset shards dropped in the landing folder become new partitions of
raw_alt_text_dataset, ingested and recaptioned alone; a half-written shard waits, a broken
one is rejected with its reason; retraining follows operations.on_new_data."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets import captioner as captioner_mod
from assets import raw_alt_text_dataset as raw_mod
from assets import recaptioned_dataset as recaptioned_mod
from corpus.landing import scan_landing, write_demo_shard
from corpus.raw_dataset import build_raw_dataset
from pipelines import landing as landing_mod
from pipelines.definitions import build_resources
from tests.conftest import materialize_range, materialize_raw, small_raw_params

ASSETS = [
    raw_mod.raw_alt_text_dataset,
    raw_mod.raw_alt_text_dataset_conserved,
    captioner_mod.captioner,
    recaptioned_mod.recaptioned_dataset,
    recaptioned_mod.recaptioned_keys_match_raw,
]


def truncated_copy(src: Path, dst: Path, stats: bool) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2 + 100])
    if stats:
        (dst.parent / f"{dst.stem}_stats.json").write_text("{}")
    return dst


def test_landing_scan_waits_for_half_written_and_rejects_broken(tmp_path):
    root = tmp_path / "landing"
    good = write_demo_shard(root / "batch1", "00000", 4, seed=7)
    copied = write_demo_shard(root / "byhand", "00007", 3, seed=8, finished=False)
    truncated_copy(good, root / "batch1" / "00001.tar", stats=True)  # finished, but broken
    truncated_copy(good, root / "batch2" / "00000.tar", stats=False)  # still being written
    (root / "batch1" / "00002.tar").write_bytes(b"not a tar at all" * 64)
    (root / "batch1" / "00002_stats.json").write_text("{}")
    (root / "batch1" / ".00003.tar").write_bytes(b"")  # a copy in progress, by convention
    with tarfile.open(good) as tf:  # cut exactly before a member: tarfile reads no error
        boundary = tf.getmembers()[4].offset
    (root / "batch1" / "00004.tar").write_bytes(good.read_bytes()[:boundary])
    (root / "batch1" / "00004_stats.json").write_text("{}")

    scan = scan_landing(root, settle_seconds=60)
    assert [s.name for s in scan.ready] == ["landed-batch1--00000"]
    assert set(scan.waiting) == {str(copied), str(root / "batch2" / "00000.tar")}
    assert "no 00000_stats.json" in scan.waiting[str(root / "batch2" / "00000.tar")]
    assert set(scan.rejected) == {
        str(root / "batch1" / f"{n}.tar") for n in ("00001", "00002", "00004")
    }
    assert "no end-of-archive marker" in scan.rejected[str(root / "batch1" / "00004.tar")]
    assert re.search("truncated|unreadable", scan.rejected[str(root / "batch1" / "00001.tar")])
    assert "unreadable tar" in scan.rejected[str(root / "batch1" / "00002.tar")]

    # A tar copied in by hand is taken once it has not changed for the settle time.
    later = scan_landing(root, settle_seconds=60, now=time.time() + 61)
    assert [s.name for s in later.ready] == ["landed-batch1--00000", "landed-byhand--00007"]
    assert str(root / "batch2" / "00000.tar") in later.rejected  # finished now, and broken
    # A sensor's earlier verdicts are not read again.
    seen = {(str(good), scan.ready[0].fingerprint)}
    assert scan_landing(root, 60, seen=seen).ready == []


def test_incremental_build_keeps_other_shards_and_equals_a_full_build(tmp_path):
    params = small_raw_params()
    root = tmp_path / "landing"
    root.mkdir()
    out = tmp_path / "raw"
    build_raw_dataset(params, out, progress=False, landing_root=root)
    before = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    write_demo_shard(root / "b", "00000", 5, seed=3)

    report = build_raw_dataset(
        params, out, progress=False, shards=["landed-b--00000"], landing_root=root
    )
    assert report.manifest["built_shards"] == ["landed-b--00000"]
    assert report.counts["input"] == 65 and report.counts["kept"] == 65
    for name, inode in before.items():  # the source's shards are kept, not rewritten
        assert (out / name).stat().st_ino == inode
    index = pd.read_parquet(out / "index.parquet")
    landed = index[index["shard"] == "landed-b--00000"]
    # img2dataset keys repeat across outputs: a landed key is namespaced by its shard.
    assert list(landed["key"]) == [f"landed-b--00000_{i:09d}" for i in range(5)]
    assert report.manifest["landing"]["ingested"]["landed-b--00000"]["path"] == "b/00000.tar"

    full = tmp_path / "full"
    build_raw_dataset(params, full, progress=False, landing_root=root)
    for name in ("index.parquet", "rejected.parquet", "landed-b--00000.tar", "00001.tar"):
        assert (full / name).read_bytes() == (out / name).read_bytes(), name

    with pytest.raises(ValueError, match="not-a-shard"):
        build_raw_dataset(params, out, progress=False, shards=["not-a-shard"], landing_root=root)
    other = small_raw_params(seed=9)
    with pytest.raises(ValueError, match="other raw_alt_text_dataset params"):
        build_raw_dataset(other, out, progress=False, shards=["00001"], landing_root=root)


def _sensor(sensor, instance, resources, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return sensor(context)


@pytest.mark.slow  # the lineage through Dagster, DVC commits included
def test_dropped_shards_flow_through_alone(project_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project_dir / 'mlflow.db'}")
    resources = build_resources(str(project_dir))
    project = {"project": resources["project"]}
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_raw(ASSETS, resources, instance).success
    cap = dg.materialize(ASSETS, selection=["captioner"], resources=resources, instance=instance)
    assert cap.success
    shards = instance.get_dynamic_partitions("raw_shards")
    assert materialize_range(ASSETS, ["recaptioned_dataset"], shards, resources, instance).success
    raw, recaptioned = project_dir / "data" / "raw", project_dir / "data" / "recaptioned"
    untouched = {p: p.stat().st_mtime_ns for p in recaptioned.glob("*.parquet")}

    landing = project_dir / "landing"
    good = write_demo_shard(landing / "crawl-07", "00000", 6, seed=11)
    truncated_copy(good, landing / "crawl-07" / "00001.tar", stats=True)
    truncated_copy(good, landing / "crawl-08" / "00000.tar", stats=False)

    result = _sensor(landing_mod.landing_shards, instance, project)
    assert [r.partition_key for r in result.run_requests] == ["landed-crawl-07--00000"]
    request = result.run_requests[0]
    added = result.dynamic_partitions_requests[0]
    assert added.partitions_def_name == "raw_shards"
    assert list(added.partition_keys) == ["landed-crawl-07--00000"]  # sources' are known
    status = json.loads((project_dir / "data" / "operations" / "landing.json").read_text())
    broken = status[str(landing / "crawl-07" / "00001.tar")]
    assert broken["state"] == "rejected" and re.search("truncated|unreadable", broken["reason"])
    assert status[str(landing / "crawl-08" / "00000.tar")]["state"] == "waiting"
    # Judged once: the next tick requests nothing new.
    again = _sensor(landing_mod.landing_shards, instance, project, cursor=result.cursor)
    assert again.run_requests == [] and "no new shard" in again.skip_reason.skip_message

    # The run the sensor asks for: ingest and recaption that one partition.
    instance.add_dynamic_partitions("raw_shards", list(added.partition_keys))
    run = dg.materialize(
        ASSETS,
        selection=["raw_alt_text_dataset", "recaptioned_dataset"],
        partition_key=request.partition_key,
        resources=resources,
        instance=instance,
        tags=request.tags,
    )
    assert run.success
    assert all(c.passed for c in run.get_asset_check_evaluations())
    md = run.asset_materializations_for_node("raw_alt_text_dataset")[0].metadata
    assert md["dagster/row_count"].value == 6 and md["count_kept"].value == 66
    assert "| crawl-07/00001.tar | rejected: " in md["landing_folder"].value  # with why
    rec = run.asset_materializations_for_node("recaptioned_dataset")[0].metadata
    assert rec["shards_captioned"].value == 1 and rec["dagster/row_count"].value == 6
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # others untouched
    assert len(pd.read_parquet(raw / "index.parquet")) == 66

    # Then retraining follows operations.on_new_data.
    retrain = _sensor(landing_mod.retrain_on_new_data, instance, project)
    assert len(retrain.run_requests) == 1
    tags = retrain.run_requests[0].tags
    assert tags["recapflow/new_shards"] == "landed-crawl-07--00000"
    assert tags["dagster/asset_partition_range_start"] == "00000"  # recaptions what is stale
    assert tags["dagster/asset_partition_range_end"] == "landed-crawl-07--00000"
    done = _sensor(landing_mod.retrain_on_new_data, instance, project, cursor=retrain.cursor)
    assert done.run_requests == []
    # A retrain's own recaptioning (every shard, current ones skipped) triggers nothing.
    rerun = dg.materialize(
        ASSETS, selection=["recaptioned_dataset"], resources=resources, instance=instance,
        tags={k: v for k, v in tags.items() if k.startswith("dagster/")},
    )  # fmt: skip
    assert (
        rerun.asset_materializations_for_node("recaptioned_dataset")[0]
        .metadata["shards_skipped_current"]
        .value
        == 4
    )
    quiet = _sensor(landing_mod.retrain_on_new_data, instance, project, cursor=retrain.cursor)
    assert quiet.run_requests == []
    params = yaml.safe_load((project_dir / "params.yaml").read_text())
    params.setdefault("operations", {})["on_new_data"] = "manual"
    (project_dir / "params.yaml").write_text(yaml.safe_dump(params))
    manual = _sensor(landing_mod.retrain_on_new_data, instance, project)
    assert manual.run_requests == [] and "manual" in manual.skip_reason.skip_message

    # Replacing the broken file with a good one gets it judged again, and taken.
    shutil.copy(good, landing / "crawl-07" / "00001.tar")
    os.utime(landing / "crawl-07" / "00001.tar", ns=(time.time_ns(), time.time_ns()))
    fixed = _sensor(landing_mod.landing_shards, instance, project, cursor=result.cursor)
    assert [r.partition_key for r in fixed.run_requests] == ["landed-crawl-07--00001"]
