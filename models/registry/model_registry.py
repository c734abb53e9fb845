"""The trained text-to-image model in the MLflow Model Registry.

The model is logged as an MLflow pyfunc ("models from code":
models/registry/pyfunc_text_to_image.py) whose artifact is the exported diffusers-style
folder; `predict` takes prompts and returns PNG bytes. A new version gets the alias
`challenger` and tags naming the data it was trained on (DVC hashes), so the eval
report's gate can promote it to `champion`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

PYFUNC_FILE = Path(__file__).with_name("pyfunc_text_to_image.py")
REPO = Path(__file__).resolve().parents[2]

# Without a params schema MLflow drops every `params` a caller gives `predict`. 0 steps
# and a negative guidance scale stand for the model's own sampling settings.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema(
        [
            ColSpec("string", "query"),
            ColSpec("string", "prompt"),
            ColSpec("boolean", "expanded"),
            ColSpec("binary", "png"),
        ]
    ),
    params=ParamSchema(
        [
            ParamSpec("seed", "long", 0),
            ParamSpec("steps", "long", 0),
            ParamSpec("guidance_scale", "double", -1.0),
            ParamSpec("expand", "long", 0),
        ]
    ),
)


def register_text_to_image(
    tracking_uri: str,
    run_id: str,
    model_dir: Path,
    name: str = "recapflow-text-to-image",
    alias: str = "challenger",
    tags: dict[str, str] | None = None,
    expander_dir: Path | None = None,
) -> dict[str, str]:
    """Log `model_dir` under the run as a pyfunc model, register a new version, set
    `alias` on it and tag it; returns name, version and the models:/ URI. With
    `expander_dir` (a prompt expander folder) the model also takes `params={"expand": N}`."""
    artifacts = {"pipeline": str(model_dir)}
    if expander_dir is not None:
        artifacts["expander"] = str(expander_dir)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts=artifacts,
            signature=SIGNATURE,
            code_paths=[str(REPO / "models"), str(REPO / "corpus")],
            pip_requirements=[
                "torch==2.15.0",
                "diffusers==0.42.1",
                "transformers==5.23.0",
                "safetensors",
                "pillow",
            ],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, v)
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}"}


def version_by_alias(tracking_uri: str, name: str, alias: str):
    """The model version carrying `alias`, or None when no version has it."""
    client = MlflowClient(tracking_uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


def run_json_artifact(tracking_uri: str, run_id: str, artifact_path: str) -> dict | None:
    """A JSON artifact of a run, or None when the run has no such artifact."""
    import json

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, tracking_uri=tracking_uri
        )
    except (mlflow.exceptions.MlflowException, OSError):
        return None
    return json.loads(Path(local).read_text())


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)
