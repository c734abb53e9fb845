"""The Dagster code location: `dagster dev -m pipelines.definitions`."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from assets import autoencoder as autoencoder_mod
from assets import captioner as captioner_mod
from assets import diffusion_model as diffusion_mod
from assets import eval_report as eval_mod
from assets import evaluators as evaluators_mod
from assets import feedback as feedback_mod
from assets import mixed_sampler as sampler_mod
from assets import prompt_expander as expander_mod
from assets import raw_alt_text_dataset as raw_mod
from assets import recaptioned_dataset as recaptioned_mod
from assets import text_encoder as text_encoder_mod
from pipelines.ablation import caption_ablation
from pipelines.landing import landing_shards, retrain_on_new_data
from pipelines.resources.dvc import DvcResource
from pipelines.resources.launcher import TrainingLauncher
from pipelines.resources.mlflow import MlflowResource
from pipelines.resources.project import ProjectResource, default_project_dir
from pipelines.retraining import record_failed_runs, retrain, retrain_schedule
from pipelines.slots import free_dead_slots_sensor


def build_resources(project_dir: str | None = None) -> dict:
    root = project_dir or default_project_dir()
    tracking_uri = os.environ.get(
        "MLFLOW_TRACKING_URI", f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    )
    return {
        "project": ProjectResource(root=root),
        "dvc": DvcResource(repo_dir=root),
        "mlflow": MlflowResource(
            tracking_uri=tracking_uri,
            ui_url=os.environ.get("RECAPFLOW_MLFLOW_UI", "http://127.0.0.1:5000"),
        ),
        # RECAPFLOW_LAUNCHER=docker|k8s (+ RECAPFLOW_TRAINER_IMAGE) for a cluster.
        "launcher": TrainingLauncher(
            kind=os.environ.get("RECAPFLOW_LAUNCHER", "subprocess"),
            image=os.environ.get("RECAPFLOW_TRAINER_IMAGE"),
        ),
    }


ASSET_MODULES = [
    raw_mod,
    captioner_mod,
    recaptioned_mod,
    sampler_mod,
    autoencoder_mod,
    text_encoder_mod,
    diffusion_mod,
    evaluators_mod,
    eval_mod,
    expander_mod,
    feedback_mod,
]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
    jobs=[caption_ablation, retrain],
    schedules=[retrain_schedule],
    sensors=[record_failed_runs, landing_shards, retrain_on_new_data, free_dead_slots_sensor],
    resources=build_resources(),
)
