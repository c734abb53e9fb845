"""recaptioned_dataset -> mixed_sampler -> diffusion_model through Dagster, the training
launched as its own process through Pipes, reporting back to the run."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from assets import autoencoder as autoencoder_mod
from assets import captioner as captioner_mod
from assets import diffusion_model as diffusion_mod
from assets import eval_report as eval_mod
from assets import evaluators as evaluators_mod
from assets import mixed_sampler as sampler_mod
from assets import raw_alt_text_dataset as raw_mod
from assets import recaptioned_dataset as recaptioned_mod
from pipelines.ablation import caption_ablation
from pipelines.definitions import build_resources
from tests.conftest import materialize_raw
from tests.ui.browser import check_ui, on_disk_instance

ASSETS = [
    raw_mod.raw_alt_text_dataset,
    captioner_mod.captioner,
    recaptioned_mod.recaptioned_dataset,
    sampler_mod.mixed_sampler,
    autoencoder_mod.autoencoder,
    autoencoder_mod.autoencoder_keeps_colours,
    diffusion_mod.diffusion_model,
    evaluators_mod.world_judge,
    evaluators_mod.world_judge_accurate,
    evaluators_mod.reference_clip,
    eval_mod.eval_report,
    eval_mod.not_worse_than_champion,
]


def test_pipes_training_reports_back_and_registers_a_challenger(project_dir, monkeypatch):
    tracking = f"sqlite:///{project_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    resources = build_resources(str(project_dir))
    instance = on_disk_instance(project_dir.parent / "dagster_home")  # the UI check reads it
    assert materialize_raw(ASSETS, resources, instance).success
    assert dg.materialize(
        ASSETS, selection=["captioner"], resources=resources, instance=instance
    ).success
    assert dg.materialize(
        ASSETS,
        selection=["recaptioned_dataset"],
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": "00000",
            "dagster/asset_partition_range_end": "00002",
        },
    ).success

    # A 2-step captioner writes arbitrary text; give every sample a caption, then take
    # one away: a sample without its synthetic caption stops the blend, named.
    paths = sorted((project_dir / "data" / "recaptioned").glob("*.parquet"))
    for path in paths:
        df = pd.read_parquet(path)
        df["descriptive_caption"] = "A picture of " + df["alt_text"] + "."
        df.to_parquet(path)
    df = pd.read_parquet(paths[0])
    missing_key = df.loc[df["split"] == "train", "key"].iloc[0]
    complete = df["descriptive_caption"].copy()
    df.loc[df["key"] == missing_key, "descriptive_caption"] = "  "
    df.to_parquet(paths[0])
    with pytest.raises(Exception, match=f"1 of .* lack a descriptive .*{missing_key}"):
        dg.materialize(ASSETS, selection=["mixed_sampler"], resources=resources, instance=instance)
    df["descriptive_caption"] = complete
    df.to_parquet(paths[0])

    # A bad blend fails in mixed_sampler, before any training starts.
    with pytest.raises(Exception, match=r"synthetic_ratio must be in \[0, 1\], got 1.5"):
        dg.materialize(
            ASSETS,
            selection=["mixed_sampler"],
            resources=resources,
            instance=instance,
            run_config={"ops": {"mixed_sampler": {"config": {"synthetic_ratio": 1.5}}}},
        )

    res = dg.materialize(
        ASSETS,
        selection=["mixed_sampler", "autoencoder", "diffusion_model"],
        resources=resources,
        instance=instance,
    )
    assert res.success
    sampler = res.asset_materializations_for_node("mixed_sampler")[0].metadata
    assert 0.5 < sampler["realized_synthetic_ratio"].value <= 1.0
    assert "| epoch |" in sampler["per_epoch"].value
    checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
    assert "colour_kept" in checks["autoencoder_keeps_colours"].metadata

    md = res.asset_materializations_for_node("diffusion_model")[0].metadata
    # Reported by the training process through Pipes:
    assert md["steps"].value == 6
    assert 0.0 <= md["colour_following"].value <= 1.0
    run_id = md["mlflow_run_id"].value
    # Added by the asset after the process ended:
    assert md["registered_model"].data["alias"] == "challenger"
    assert "data:image/png;base64," in md["validation_grid"].value
    assert "| 6 |" in md["colour_following_curve"].value
    logs = [e.message for e in instance.all_logs(res.run_id) if e.message]
    assert any("step 6/6" in m for m in logs)  # progress lines streamed into the run

    client = MlflowClient(tracking)
    version = client.get_model_version_by_alias(diffusion_mod.REGISTERED_NAME, "challenger")
    assert version.run_id == run_id
    assert version.tags["dvc.mixed_sampler"] == md["data_versions"].data["mixed_sampler"]
    assert version.tags["dvc.recaptioned_dataset"].endswith(".dir")
    params = client.get_run(run_id).data.params
    assert params["sampler.synthetic_ratio"] == "0.95"
    assert "data.mixed_sampler" in params

    # A retrain on unchanged data resumes the same MLflow run, now with newer code: its
    # params stay as first logged (MLflow refuses changes), the new version is a tag.
    monkeypatch.setattr(diffusion_mod, "code_version", lambda root: "newer-code")
    again = dg.materialize(
        ASSETS, selection=["diffusion_model"], resources=resources, instance=instance
    )
    assert (
        again.asset_materializations_for_node("diffusion_model")[0].metadata["mlflow_run_id"].value
        == run_id
    )
    resumed = client.get_run(run_id)
    assert resumed.data.params["code_version"] == params["code_version"]
    assert resumed.data.tags["resumed_with.code_version"] == "newer-code"
    version = client.get_model_version_by_alias(diffusion_mod.REGISTERED_NAME, "challenger")

    # The eval report of that model and its evaluators. A judge trained for 3 steps is
    # far below its 0.98 bar: its check says so and the gate promotes nothing.
    res = dg.materialize(
        ASSETS,
        selection=["world_judge", "reference_clip", "eval_report"],
        resources=resources,
        instance=instance,
    )
    assert res.success
    checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
    assert not checks["world_judge_accurate"].passed
    assert not checks["not_worse_than_champion"].passed
    md = res.asset_materializations_for_node("eval_report")[0].metadata
    assert md["promoted_to_champion"].value is False
    assert "world judge is below its bar" in md["gate"].data["reason"]
    assert "| colour_binding |" in md["prompt_following"].value
    report = project_dir / "data" / "eval_report"
    html = (report / "index.html").read_text()
    assert "grids/colour_binding-descriptive.png" in html and "not promoted" in html
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["prompts"] == 7 and metrics["images_per_prompt"] == 2
    assert set(metrics["forms"]) == {"short", "descriptive"}
    per_prompt = json.loads((report / "per_prompt.json").read_text())
    assert len(per_prompt["scores"]) == 7 and per_prompt["fingerprint"]["images_per_prompt"] == 2
    run = client.get_run(run_id)
    assert "eval/descriptive/overall" in run.data.metrics
    assert run.data.tags["eval.promoted_to_champion"] == "false"
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval_report")}
    assert {"eval_report/index.html", "eval_report/gate.json"} <= artifacts
    assert json.loads((project_dir / "metrics" / "eval_report.json").read_text())["short"]

    # With a judge that meets its (here lowered) bar, the first challenger meets no
    # champion and is promoted; evaluated again, it is not compared with itself.
    params = yaml.safe_load((project_dir / "params.yaml").read_text())
    params["world_judge"]["min_accuracy"] = 0.0
    (project_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = dg.materialize(
        ASSETS, selection=["world_judge", "eval_report"], resources=resources, instance=instance
    )
    gate = res.asset_materializations_for_node("eval_report")[0].metadata["gate"].data
    assert gate["promote"] and gate["reason"] == "no champion yet"
    champion = client.get_model_version_by_alias(diffusion_mod.REGISTERED_NAME, "champion")
    assert champion.version == version.version
    res = dg.materialize(ASSETS, selection=["eval_report"], resources=resources, instance=instance)
    gate = res.asset_materializations_for_node("eval_report")[0].metadata["gate"].data
    assert gate["promote"] and "champion already" in gate["reason"]

    # The caption ablation, quick: two variants, same steps and seeds, child runs under
    # one parent, compared in a table.
    job = dg.Definitions(jobs=[caption_ablation], resources=resources).get_job_def(
        "caption_ablation"
    )
    config = {"variants": ["alt_text", "descriptive_95"], "max_steps": 4, "eval_every": 2,
              "eval_prompts": 8, "prompts_per_category": 1, "images_per_prompt": 1}  # fmt: skip
    res = job.execute_in_process(
        run_config={"ops": {"ablation_variants": {"config": config}}}, instance=instance
    )
    assert res.success
    summary = json.loads((project_dir / "data" / "ablation" / "summary.json").read_text())
    assert [r["name"] for r in summary] == ["alt_text", "descriptive_95"]
    assert summary[0]["realized_ratio"] == 0.0 and summary[1]["realized_ratio"] > 0.5
    assert all(r["steps"] == 4 and [c["step"] for c in r["curve"]] == [2, 4] for r in summary)
    assert all("clip_score" in c for r in summary for c in r["curve"])
    table = (project_dir / "data" / "ablation" / "summary.md").read_text()
    assert "| alt_text | 0.00" in table and "| descriptive_95 | 0.95 descriptive" in table
    parent = client.get_run(summary[0]["run_id"]).data.tags["mlflow.parentRunId"]
    assert client.get_run(summary[1]["run_id"]).data.tags["mlflow.parentRunId"] == parent
    assert "descriptive_95/descriptive/overall" in client.get_run(parent).data.metrics
    statuses = {client.get_run(r).info.status for r in (parent, *(s["run_id"] for s in summary))}
    assert statuses == {"FINISHED"}

    # The UI as a user sees it: this instance in dagster-webserver, the report in Chromium.
    check_ui(instance, project_dir)


def test_training_process_detects_pipes_by_dagsters_own_variable():
    import dagster_pipes

    from models.common.pipes_report import PIPES_CONTEXT_ENV_VAR

    assert PIPES_CONTEXT_ENV_VAR == dagster_pipes.DAGSTER_PIPES_CONTEXT_ENV_VAR
