"""recapflow Dagster resources: the project folder, DVC and MLflow."""
