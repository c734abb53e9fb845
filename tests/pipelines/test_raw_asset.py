"""The raw_alt_text_dataset asset through Dagster, DVC and MLflow on a scratch project."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import mlflow
import pytest
import yaml

from assets import raw_alt_text_dataset as raw_mod
from pipelines.definitions import build_resources, defs
from tests.conftest import DVC, REPO, dvc_env, materialize_raw


def _materialize(project_dir):
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project_dir / 'mlflow.db'}"
    try:
        return materialize_raw(
            [raw_mod.raw_alt_text_dataset, raw_mod.raw_alt_text_dataset_conserved],
            build_resources(str(project_dir)),
            dg.DagsterInstance.ephemeral(),
        )
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_definitions_load():
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "raw_alt_text_dataset" in keys


@pytest.mark.slow  # `dvc repro` as a process
def test_materialization_is_versioned_checked_and_tracked(project_dir):
    result = _materialize(project_dir)
    assert result.success
    mat = result.asset_materializations_for_node("raw_alt_text_dataset")[0]
    md = mat.metadata
    lock = yaml.safe_load((project_dir / "dvc.lock").read_text())
    dvc_md5 = lock["stages"]["raw_alt_text_dataset"]["outs"][0]["md5"]
    assert md["dvc_md5"].value == dvc_md5
    assert mat.tags["dagster/data_version"] == dvc_md5
    assert md["count_input"].value == 60 and md["dagster/row_count"].value == 60
    assert "data:image/png;base64," in md["preview"].value
    assert "| partial |" in md["alt_text_noise_kinds"].value
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]

    mlflow.set_tracking_uri(f"sqlite:///{project_dir / 'mlflow.db'}")
    run = mlflow.get_run(md["mlflow_run_id"].value)
    assert run.data.tags["dvc_hash"] == dvc_md5
    assert run.data.metrics["kept"] == 60.0
    assert md["mlflow_run_url"].value.endswith(f"/runs/{run.info.run_id}")

    # dvc repro in DVC's own environment rebuilds the same bytes: the same hash.
    subprocess.run(
        [str(DVC), "repro", "--force", "-q"],
        cwd=project_dir,
        env=dvc_env(project_dir),
        check=True,
        capture_output=True,
    )
    relock = yaml.safe_load((project_dir / "dvc.lock").read_text())
    assert relock["stages"]["raw_alt_text_dataset"]["outs"][0]["md5"] == dvc_md5


@pytest.mark.slow  # the dagster CLI as a process
def test_string_selection_works_from_the_cli(project_dir):
    """`dagster asset materialize --select` parses selections with antlr4; DVC's pin of
    antlr4 4.9 in the same environment breaks it, hence DVC's separate environment."""
    env = {
        **os.environ,
        "RECAPFLOW_PROJECT_DIR": str(project_dir),
        "DAGSTER_HOME": str(project_dir / ".dagster_home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project_dir / 'mlflow.db'}",
    }
    (project_dir / ".dagster_home").mkdir()
    # make run's first step: register the source's shards, materialize them as one range
    where = [sys.executable, "-m", "pipelines.where", "--register-partitions"]
    shard_range = subprocess.run(
        where, cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert shard_range == "00000...00002"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "pipelines.definitions",
            "--select",
            "raw_alt_text_dataset",
            "--partition-range",
            shard_range,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stderr + proc.stdout
    manifest = json.loads((project_dir / "data" / "raw" / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 60
