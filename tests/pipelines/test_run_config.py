"""What reaches DVC is what the data was built with, and a bad training config fails in
the asset before anything is launched.

A Dagster run config may not change a parameter params.yaml sets for a DVC-versioned
asset (dvc.lock records params.yaml's value); it is refused, naming params.yaml and
`dvc exp run -S`. The diffusion training config is typed in the asset: a typo in
params.yaml fails there, by its dotted key, before the Pipes process starts."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets import diffusion_model as diffusion_mod
from assets import mixed_sampler as sampler_mod
from corpus.params import load_params
from pipelines.definitions import build_resources, defs
from pipelines.resources.launcher import TrainingLauncher
from tests.conftest import REPO


def _recaptioned(project, n: int = 40) -> None:
    rec = project / "data" / "recaptioned"
    rec.mkdir(parents=True)
    pd.DataFrame(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "shard": "00000",
            "split": "train",
            "alt_text": [f"alt {i}" for i in range(n)],
            "short_caption": [f"a red circle {i}" for i in range(n)],
            "descriptive_caption": [f"A large red circle, number {i}." for i in range(n)],
        }
    ).to_parquet(rec / "00000.parquet")


def _sampler_run(project, resources, **config):
    return dg.materialize(
        [sampler_mod.mixed_sampler],
        selection=["mixed_sampler"],
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"mixed_sampler": {"config": config}}},
        raise_on_error=False,
    )


def _error(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = result.get_step_failure_events()
    return str(failure.event_specific_data.error)


def test_an_override_of_a_dvc_tracked_parameter_is_refused(project_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project_dir / 'mlflow.db'}")
    _recaptioned(project_dir)
    resources = build_resources(str(project_dir))

    refused = _sampler_run(project_dir, resources, synthetic_ratio=0.5)
    assert not refused.success
    message = _error(refused)
    assert "synthetic_ratio=0.5 (params.yaml: 0.95)" in message
    assert "dvc exp run -S mixed_sampler.synthetic_ratio=0.5" in message
    assert "make dvc-exp EXP_SET='mixed_sampler.synthetic_ratio=0.5'" in message
    assert not (project_dir / "data" / "mixed_sampler").exists()  # nothing built ...
    assert not (project_dir / "dvc.lock").exists()  # ... nor recorded

    # The value params.yaml states is no override: built, committed, and the two agree.
    same = _sampler_run(project_dir, resources, synthetic_ratio=0.95, caption_kind="descriptive")
    assert same.success
    lock = yaml.safe_load((project_dir / "dvc.lock").read_text())
    recorded = lock["stages"]["mixed_sampler"]["params"]["params.yaml"]["mixed_sampler"]
    built = json.loads((project_dir / "data" / "mixed_sampler" / "sampler.json").read_text())
    assert recorded["synthetic_ratio"] == built["config"]["synthetic_ratio"] == 0.95


def test_every_run_config_of_a_dvc_asset_is_guarded_or_not_a_parameter():
    """Assets whose output DVC versions and whose run config names a params.yaml key of
    their stage: each must refuse changes (assets/run_config.py); today only the sampler."""
    params = load_params(REPO / "params.yaml")
    graph = defs.resolve_asset_graph()
    overlapping = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.assets_def.is_executable or "dvc" not in node.kinds:
            continue
        field = node.assets_def.op.config_field
        fields = set(getattr(field.config_type, "fields", {}) if field else {})
        section = params.get(key.to_user_string()) or {}
        if fields & set(section):
            overlapping[key.to_user_string()] = sorted(fields & set(section))
    assert overlapping == {
        "mixed_sampler": ["caption_dropout", "caption_kind", "epochs", "seed", "synthetic_ratio"]
    }


def test_a_typo_in_the_training_config_fails_the_asset_before_launching(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    params = load_params(REPO / "params.yaml")
    params["diffusion_model"]["diffusion"]["max_stepz"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    launched = tmp_path / "launched"
    resources = {
        **build_resources(str(project)),
        # A launch would run this "interpreter", which does not exist: a different error.
        "launcher": TrainingLauncher(python=str(launched)),
    }
    result = dg.materialize(
        [diffusion_mod.diffusion_model],
        selection=["diffusion_model"],
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    assert "diffusion_model.diffusion.max_stepz: unknown key; known: [" in _error(result)
    assert not (project / "data").exists()

    # The same check as the caption_ablation job calls it, on a wrong type this time.
    section = load_params(REPO / "params.yaml")["diffusion_model"]
    with pytest.raises(ValueError, match=r"diffusion_model\.batch_size: expected int, got str"):
        diffusion_mod.checked_training_config({**section, "batch_size": "64"})
