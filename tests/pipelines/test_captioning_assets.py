"""raw -> captioner -> recaptioned_dataset through Dagster on a scratch project."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets import captioner as captioner_mod
from assets import raw_alt_text_dataset as raw_mod
from assets import recaptioned_dataset as recaptioned_mod
from pipelines.definitions import build_resources
from tests.conftest import materialize_raw

pytestmark = pytest.mark.slow  # the lineage through Dagster, DVC commits included

ASSETS = [
    raw_mod.raw_alt_text_dataset,
    captioner_mod.captioner,
    captioner_mod.captions_better_than_alt_text,
    recaptioned_mod.recaptioned_dataset,
    recaptioned_mod.recaptioned_keys_match_raw,
]


def test_lineage_to_recaptioned_partitions(project_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project_dir / 'mlflow.db'}")
    resources = build_resources(str(project_dir))
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_raw(ASSETS, resources, instance).success
    shards = instance.get_dynamic_partitions("raw_shards")
    assert shards == ["00000", "00001", "00002"]  # one partition per raw shard
    res = dg.materialize(ASSETS, selection=["captioner"], resources=resources, instance=instance)
    assert res.success
    cap = res.asset_materializations_for_node("captioner")[0].metadata
    assert "| object |" in cap["caption_quality"].value
    assert "data:image/png;base64," in cap["sample_captions"].value
    check = next(
        c
        for c in res.get_asset_check_evaluations()
        if c.check_name == "captions_better_than_alt_text"
    )
    assert "object_recall_dsc" in check.metadata  # pass/fail depends on training; 2 steps here

    # One partition alone, then the rest as a single-run range: each shard once.
    one = dg.materialize(
        ASSETS,
        selection=["recaptioned_dataset"],
        partition_key="00001",
        resources=resources,
        instance=instance,
    )
    assert one.success
    mat = one.asset_materializations_for_node("recaptioned_dataset")[0]
    assert mat.metadata["dagster/row_count"].value == 20
    rest = dg.materialize(
        ASSETS,
        selection=["recaptioned_dataset"],
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": "00000",
            "dagster/asset_partition_range_end": "00002",
        },
    )
    assert rest.success
    md = rest.asset_materializations_for_node("recaptioned_dataset")[0].metadata
    assert md["shards_captioned"].value == 2 and md["shards_skipped_current"].value == 1
    checks = {c.check_name: c.passed for c in rest.get_asset_check_evaluations()}
    assert checks["recaptioned_keys_match_raw"]
    df = pd.concat(
        pd.read_parquet(p) for p in sorted((project_dir / "data/recaptioned").glob("*.parquet"))
    )
    assert len(df) == 60 and df["key"].is_unique
    lock = yaml.safe_load((project_dir / "dvc.lock").read_text())
    assert {"raw_alt_text_dataset", "captioner", "recaptioned_dataset"} <= set(lock["stages"])
