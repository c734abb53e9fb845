"""The storage layer of the production topology, for real: a local PostgreSQL
(scripts/postgres.sh: Debian's server, a cluster in .pg/), Dagster on Postgres storage
through deploy/dagster.yaml itself, MLflow on a Postgres backend store with the URI form
docker-compose.yml gives the MLflow server.

Each session works in two fresh databases, dropped at the end, so that runs of the suite
never see each other's state and the cluster's `dagster`/`mlflow` databases stay as
they are. The test is skipped only when the script reports that no server is installed
and apt cannot install one; any other failure fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a PostgreSQL server, MLflow and Dagster CLI processes

SCRIPT = REPO / "scripts" / "postgres.sh"
DAGSTER_YAML = REPO / "deploy" / "dagster.yaml"
EXIT_APT_UNAVAILABLE = 77


@pytest.fixture(scope="session")
def postgres() -> dict[str, str]:
    """The cluster's connection settings (scripts/postgres.sh's KEY=VALUE output)."""
    was_running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900
    )
    if proc.returncode == EXIT_APT_UNAVAILABLE:
        pytest.skip(f"scripts/postgres.sh: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"scripts/postgres.sh start failed:\n{proc.stderr}"
    settings = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    yield settings
    if was_running != 0:  # started here: leave the machine as it was
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True)


def _connect(pg: dict[str, str], dbname: str):
    import psycopg2

    conn = psycopg2.connect(
        host=pg["RECAPFLOW_PG_HOST"],
        port=int(pg["RECAPFLOW_PG_PORT"]),
        user=pg["RECAPFLOW_PG_USER"],
        password=pg["RECAPFLOW_PG_PASSWORD"],
        dbname=dbname,
    )
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def databases(postgres) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:10]
    names = {"dagster": f"test_dagster_{suffix}", "mlflow": f"test_mlflow_{suffix}"}
    conn = _connect(postgres, "postgres")
    try:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f"CREATE DATABASE {name}")
        yield names
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        conn.close()


def mlflow_uri(pg: dict[str, str], db: str) -> str:
    # docker-compose.yml: postgresql+psycopg2://USER:PASSWORD@postgres:5432/mlflow
    return (
        f"postgresql+psycopg2://{pg['RECAPFLOW_PG_USER']}:{pg['RECAPFLOW_PG_PASSWORD']}"
        f"@{pg['RECAPFLOW_PG_HOST']}:{pg['RECAPFLOW_PG_PORT']}/{db}"
    )


def dagster_env(pg: dict[str, str], db: str) -> dict[str, str]:
    """The variables deploy/dagster.yaml reads, as docker-compose.yml sets them."""
    return {
        "DAGSTER_PG_HOST": pg["DAGSTER_PG_HOST"],
        "DAGSTER_PG_PORT": pg["DAGSTER_PG_PORT"],
        "DAGSTER_PG_USERNAME": pg["DAGSTER_PG_USERNAME"],
        "DAGSTER_PG_PASSWORD": pg["DAGSTER_PG_PASSWORD"],
        "DAGSTER_PG_DB": db,
    }


def test_script_creates_the_deploy_databases(postgres):
    assert postgres["MLFLOW_BACKEND_STORE_URI"].endswith("/mlflow")
    assert postgres["DAGSTER_PG_DB"] == "dagster"
    conn = _connect(postgres, "postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            assert {"dagster", "mlflow"} <= {row[0] for row in cur.fetchall()}
            cur.execute("SHOW listen_addresses")
            assert cur.fetchone()[0] == "127.0.0.1"
    finally:
        conn.close()
    # Idempotent: a second start reports the same cluster.
    again = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "RECAPFLOW_PG_PORT=" + postgres["RECAPFLOW_PG_PORT"] in again.stdout


def test_mlflow_on_a_postgres_backend_store(postgres, databases, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(postgres, databases["mlflow"])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp_id = mlflow.create_experiment(
            "recapflow-storage-test", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_param("synthetic_ratio", 0.95)
            mlflow.log_metric("colour_following", 0.25, step=3)
    finally:
        mlflow.set_tracking_uri(previous)

    fresh = MlflowClient(tracking_uri=uri)  # a new client: everything comes from Postgres
    stored = fresh.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"synthetic_ratio": "0.95"}
    assert stored.data.metrics == {"colour_following": 0.25}
    assert fresh.get_experiment_by_name("recapflow-storage-test").experiment_id == exp_id
    conn = _connect(postgres, databases["mlflow"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT value FROM metrics WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchall() == [(0.25,)]
    finally:
        conn.close()


def test_dagster_materializes_on_postgres_storage(
    postgres, databases, project_dir, tmp_path, monkeypatch
):
    import dagster as dg
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage
    from mlflow.tracking import MlflowClient

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DAGSTER_YAML, home / "dagster.yaml")  # deploy/dagster.yaml, unchanged
    pg_env = dagster_env(postgres, databases["dagster"])
    tracking_uri = mlflow_uri(postgres, databases["mlflow"])
    # The asset's MLflow run lands in the Postgres backend store; its artifacts in tmp
    # (the compose stack's MLflow server proxies them to the object store instead).
    MlflowClient(tracking_uri).create_experiment(
        "recapflow", artifact_location=(tmp_path / "mlartifacts").as_uri()
    )
    env = {
        **os.environ,
        **pg_env,
        "DAGSTER_HOME": str(home),
        "RECAPFLOW_PROJECT_DIR": str(project_dir),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "OMP_NUM_THREADS": "1",
    }
    dagster_cli = [sys.executable, "-m", "dagster"]
    where = [sys.executable, "-m", "pipelines.where", "--register-partitions"]
    shard_range = subprocess.run(
        where, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True
    ).stdout.strip()  # the shard partitions, registered in Postgres
    proc = subprocess.run(
        [
            *dagster_cli,
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
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The pool limit the compose daemon sets at start, through the same CLI.
    proc = subprocess.run(
        [*dagster_cli, "instance", "concurrency", "set", "gpu", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    for key, value in pg_env.items():
        monkeypatch.setenv(key, value)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1

        event = instance.get_latest_materialization_event(dg.AssetKey("raw_alt_text_dataset"))
        assert event is not None
        run = instance.get_run_by_id(event.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert [r.run_id for r in instance.get_runs()] == [run.run_id]
        mat = event.asset_materialization
        lock = yaml.safe_load((project_dir / "dvc.lock").read_text())
        dvc_md5 = lock["stages"]["raw_alt_text_dataset"]["outs"][0]["md5"]
        assert mat.metadata["dvc_md5"].value == dvc_md5
        assert mat.tags["dagster/data_version"] == dvc_md5
        assert mat.metadata["count_input"].value == 60
        mlflow_run_id = mat.metadata["mlflow_run_id"].value
    finally:
        instance.dispose()

    # Stored in Postgres, read with plain SQL.
    conn = _connect(postgres, databases["dagster"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_id = %s", (run.run_id,))
            assert cur.fetchall() == [("SUCCESS",)]
            cur.execute(
                "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                (run.run_id, "ASSET_MATERIALIZATION"),
            )
            assert cur.fetchone()[0] >= 1
    finally:
        conn.close()
    tracked = MlflowClient(tracking_uri).get_run(mlflow_run_id)
    assert tracked.data.metrics["kept"] == 60.0
    assert tracked.data.tags["dvc_hash"] == dvc_md5
    assert Path(project_dir / "data" / "raw" / "index.parquet").exists()
