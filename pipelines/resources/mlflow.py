"""MLflow tracking as a Dagster resource (dagster-mlflow is stale for MLflow 3)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dagster as dg
import mlflow


class MlflowResource(dg.ConfigurableResource):
    """Opens MLflow runs against an explicit tracking URI: MLflow 3 refuses the implicit
    file store, so there is never a default one."""

    tracking_uri: str
    experiment: str = "recapflow"
    ui_url: str = "http://127.0.0.1:5000"

    @contextlib.contextmanager
    def start_run(
        self, run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None
    ) -> Iterator[mlflow.ActiveRun]:
        mlflow.set_tracking_uri(self.tracking_uri)
        exp = mlflow.set_experiment(self.experiment)
        with mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else run_name,
            experiment_id=exp.experiment_id,
            tags=tags,
        ) as run:
            yield run

    def run_url(self, run: mlflow.ActiveRun | Any) -> str:
        info = run.info
        return f"{self.ui_url.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"

    def run_metadata(self, run: mlflow.ActiveRun | Any) -> dict[str, Any]:
        return {
            "mlflow_run_id": run.info.run_id,
            "mlflow_run_url": dg.MetadataValue.url(self.run_url(run)),
        }
