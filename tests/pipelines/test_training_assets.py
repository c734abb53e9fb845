"""recaptioned_dataset -> mixed_sampler -> diffusion_model -> eval_report through Dagster,
the training launched as its own process through Pipes, reporting back to the run.

The lineage is materialized once per module, in stages (module-scoped fixtures, each
building on the one before, in the order a user runs them): upstream data, the blend's
refusals, the training, a retrain, the eval report, the promotion gate, the caption
ablation. Each stage keeps what its tests read, taken when the stage ran (a later stage
rewrites the eval report and the model aliases), so every behaviour is its own test and
the first failure does not hide the rest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

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
from assets.reuse import REBUILD_TAG
from models.expansion.model import expand, load_expander
from models.feedback.pool import load_pool
from models.feedback.rich_model import prompt_words
from models.serving.generate import main as generate_command
from pipelines import stale
from pipelines.ablation import caption_ablation
from pipelines.definitions import build_resources
from tests.conftest import DVC, REPO, dvc_env, make_project, materialize_raw
from tests.ui.browser import check_ui, on_disk_instance

pytestmark = pytest.mark.slow

ASSETS = [
    raw_mod.raw_alt_text_dataset,
    captioner_mod.captioner,
    recaptioned_mod.recaptioned_dataset,
    sampler_mod.mixed_sampler,
    autoencoder_mod.autoencoder,
    autoencoder_mod.autoencoder_keeps_colours,
    autoencoder_mod.autoencoder_keeps_scenes,
    text_encoder_mod.text_encoder,
    diffusion_mod.diffusion_model,
    evaluators_mod.world_judge,
    evaluators_mod.world_judge_accurate,
    evaluators_mod.reference_clip,
    eval_mod.eval_report,
    eval_mod.not_worse_than_champion,
    expander_mod.prompt_expander,
    expander_mod.prompt_expander_faithful,
    feedback_mod.feedback_pool,
    feedback_mod.feedback_pool_annotators_calibrated,
    feedback_mod.preference_model,
    feedback_mod.preference_model_near_ceiling,
    feedback_mod.rich_feedback_model,
]


def _raised(call) -> Exception | None:
    """The exception `call()` raised, or None: a stage keeps it for its test to match."""
    try:
        call()
    except Exception as e:
        return e
    return None


def _reraise(error: Exception | None) -> None:
    if error is not None:
        raise error


# --- the stages ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """One project, Dagster instance (on disk: the UI check reads it), resources and MLflow
    store for the module, with MLFLOW_TRACKING_URI and any patches set until it ends."""
    root = tmp_path_factory.mktemp("training_assets")
    project_dir = make_project(root / "project")
    tracking = f"sqlite:///{project_dir / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking)
        yield SimpleNamespace(
            project_dir=project_dir,
            tracking=tracking,
            resources=build_resources(str(project_dir)),
            instance=on_disk_instance(root / "dagster_home"),
            client=MlflowClient(tracking),
            monkeypatch=mp,
        )


def _materialize(lin, selection, **kwargs):
    return dg.materialize(
        ASSETS, selection=selection, resources=lin.resources, instance=lin.instance, **kwargs
    )


@pytest.fixture(scope="module")
def upstream(lineage):
    """raw_alt_text_dataset, captioner and recaptioned_dataset, as `make run` runs them."""
    return SimpleNamespace(
        raw=materialize_raw(ASSETS, lineage.resources, lineage.instance),
        captioner=_materialize(lineage, ["captioner"]),
        recaptioned=_materialize(
            lineage,
            ["recaptioned_dataset"],
            tags={
                "dagster/asset_partition_range_start": "00000",
                "dagster/asset_partition_range_end": "00002",
            },
        ),
    )


@pytest.fixture(scope="module")
def partitions_side_by_side(lineage, upstream):
    """Two shards recaptioned again by two `dagster asset materialize --partition` processes
    started together on the module's instance, as a backfill launches one run per shard."""
    out = lineage.project_dir / "data" / "recaptioned"
    shards = ["00000", "00001"]
    for shard in shards:
        (out / f"{shard}.parquet").unlink()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(Path(lineage.instance.root_directory)),
        "RECAPFLOW_PROJECT_DIR": str(lineage.project_dir),
    }
    dagster = str(Path(sys.executable).parent / "dagster")
    cmd = [dagster, "asset", "materialize", "-m", "pipelines.definitions",
           "--select", "recaptioned_dataset", "--partition"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*cmd, shard],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for shard in shards
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    runs = lineage.instance.get_run_records(limit=2)
    status = subprocess.run(
        [str(DVC), "status", "--json", "recaptioned_dataset"],
        cwd=lineage.project_dir, env=dvc_env(lineage.project_dir),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return SimpleNamespace(
        codes=[p.returncode for p in procs],
        outputs=outputs,
        runs=runs,
        out=out,
        dvc_status=json.loads(status.stdout or "{}"),
    )


@pytest.fixture(scope="module")
def blend_refusals(lineage, upstream):
    """mixed_sampler refused twice: a sample without its synthetic caption, a bad ratio.

    A 2-step captioner writes arbitrary text; every sample is given a caption, then one
    taken away for the first refusal and given back after it."""
    paths = sorted((lineage.project_dir / "data" / "recaptioned").glob("*.parquet"))
    for path in paths:
        df = pd.read_parquet(path)
        df["descriptive_caption"] = "A picture of " + df["alt_text"] + "."
        df.to_parquet(path)
    df = pd.read_parquet(paths[0])
    missing_key = df.loc[df["split"] == "train", "key"].iloc[0]
    complete = df["descriptive_caption"].copy()
    df.loc[df["key"] == missing_key, "descriptive_caption"] = "  "
    df.to_parquet(paths[0])
    missing_caption = _raised(lambda: _materialize(lineage, ["mixed_sampler"]))
    df["descriptive_caption"] = complete
    df.to_parquet(paths[0])

    bad_ratio = _raised(
        lambda: _materialize(
            lineage,
            ["mixed_sampler"],
            run_config={"ops": {"mixed_sampler": {"config": {"synthetic_ratio": 1.5}}}},
        )
    )
    return SimpleNamespace(
        missing_key=missing_key, missing_caption=missing_caption, bad_ratio=bad_ratio
    )


@pytest.fixture(scope="module")
def trained(lineage, blend_refusals):
    """mixed_sampler, world_judge (the autoencoder's scene check reads it), autoencoder,
    text_encoder and diffusion_model (the training process via Pipes)."""
    res = _materialize(
        lineage, ["mixed_sampler", "world_judge", "autoencoder", "text_encoder", "diffusion_model"]
    )
    md = res.asset_materializations_for_node("diffusion_model")[0].metadata
    run_id = md["mlflow_run_id"].value
    client = lineage.client
    return SimpleNamespace(
        res=res,
        sampler=res.asset_materializations_for_node("mixed_sampler")[0].metadata,
        encoder=res.asset_materializations_for_node("text_encoder")[0].metadata,
        checks={c.check_name: c for c in res.get_asset_check_evaluations()},
        md=md,
        run_id=run_id,
        logs=[e.message for e in lineage.instance.all_logs(res.run_id) if e.message],
        version=client.get_model_version_by_alias(diffusion_mod.REGISTERED_NAME, "challenger"),
        params=client.get_run(run_id).data.params,
    )


@pytest.fixture(scope="module")
def retrained(lineage, trained):
    """diffusion_model again on unchanged data, with newer code (patched for the module)."""
    lineage.monkeypatch.setattr(diffusion_mod, "code_version", lambda root: "newer-code")
    again = _materialize(lineage, ["diffusion_model"], tags={REBUILD_TAG: "diffusion_model"})
    client = lineage.client
    return SimpleNamespace(
        md=again.asset_materializations_for_node("diffusion_model")[0].metadata,
        run=client.get_run(trained.run_id),
        version=client.get_model_version_by_alias(diffusion_mod.REGISTERED_NAME, "challenger"),
    )


FEEDBACK = ["feedback_pool", "preference_model", "rich_feedback_model"]


@pytest.fixture(scope="module")
def evaluated(lineage, trained, retrained, expanded):
    """world_judge, reference_clip, the feedback pool and models, and eval_report of the
    retrained challenger (with the prompt expander: the upsampled form; with the feedback
    models: their columns). A judge trained for 3 steps is far below its 0.98 bar: its
    check says so, the gate promotes nothing. The report's files are read now: the
    promotion below rewrites them."""
    res = _materialize(lineage, ["world_judge", "reference_clip", *FEEDBACK, "eval_report"])
    report = lineage.project_dir / "data" / "eval_report"
    client = lineage.client
    return SimpleNamespace(
        res=res,
        checks={c.check_name: c for c in res.get_asset_check_evaluations()},
        md=res.asset_materializations_for_node("eval_report")[0].metadata,
        html=(report / "index.html").read_text(),
        metrics=json.loads((report / "metrics.json").read_text()),
        per_image=[json.loads(x) for x in (report / "per_image.jsonl").read_text().splitlines()],
        per_prompt=json.loads((report / "per_prompt.json").read_text()),
        dvc_metrics=json.loads((lineage.project_dir / "metrics" / "eval_report.json").read_text()),
        run=client.get_run(trained.run_id),
        artifacts={a.path for a in client.list_artifacts(trained.run_id, "eval_report")},
    )


@pytest.fixture(scope="module")
def expanded(lineage, upstream):
    """prompt_expander on the lineage's recaptions: a captioner trained for 3 steps writes
    no usable caption, so nothing is learnt and the asset check says so."""
    res = _materialize(lineage, ["prompt_expander"])
    return SimpleNamespace(
        res=res,
        md=res.asset_materializations_for_node("prompt_expander")[0].metadata,
        folder=lineage.project_dir / "data" / "prompt_expander",
    )


@pytest.fixture(scope="module")
def feedback(lineage, evaluated):
    """feedback_pool from the trained model (EMA and raw weights, two guidance scales),
    preference_model and rich_feedback_model on it (built for the eval report); then the
    pool again, which draws nothing."""
    res = evaluated.res
    pool_dir = lineage.project_dir / "data" / "feedback_pool"
    summary = json.loads((pool_dir / "pool.json").read_text())
    again = _materialize(lineage, ["feedback_pool"], tags={REBUILD_TAG: "feedback_pool"})
    return SimpleNamespace(
        res=res,
        summary=summary,
        pairs=[json.loads(x) for x in (pool_dir / "pairs.jsonl").read_text().splitlines()],
        checks={c.check_name: c for c in res.get_asset_check_evaluations()},
        pool_md=res.asset_materializations_for_node("feedback_pool")[0].metadata,
        md=res.asset_materializations_for_node("preference_model")[0].metadata,
        metrics=json.loads(
            (lineage.project_dir / "data" / "preference_model" / "metrics.json").read_text()
        ),
        again=again.asset_materializations_for_node("feedback_pool")[0].metadata,
        rich_md=res.asset_materializations_for_node("rich_feedback_model")[0].metadata,
        rich=json.loads(
            (lineage.project_dir / "data" / "rich_feedback_model" / "metrics.json").read_text()
        ),
    )


@pytest.fixture(scope="module")
def promoted(lineage, evaluated):
    """The judge's bar lowered so that it is met: eval_report with the gate open, twice."""
    params_file = lineage.project_dir / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["world_judge"]["min_accuracy"] = 0.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    first = _materialize(lineage, ["world_judge", "eval_report"])
    champion = lineage.client.get_model_version_by_alias(diffusion_mod.REGISTERED_NAME, "champion")
    again = _materialize(lineage, ["eval_report"], tags={REBUILD_TAG: "eval_report"})
    return SimpleNamespace(
        first_gate=first.asset_materializations_for_node("eval_report")[0].metadata["gate"].data,
        champion=champion,
        again_gate=again.asset_materializations_for_node("eval_report")[0].metadata["gate"].data,
    )


@pytest.fixture(scope="module")
def ablation(lineage, promoted):
    """The caption ablation, quick: two variants, two seeds each, same steps; then the
    same study again, which trains nothing (every run's record is reused)."""
    job = dg.Definitions(jobs=[caption_ablation], resources=lineage.resources).get_job_def(
        "caption_ablation"
    )
    config = {"variants": ["alt_text", "descriptive_95"], "seeds": 2, "max_steps": 4,
              "eval_every": 2, "eval_prompts": 8, "suite_prompts": 1, "prompts_per_category": 1,
              "images_per_prompt": 1, "encoder_pairs": 300, "n_boot": 200}  # fmt: skip
    run_config = {"ops": {"ablation_variants": {"config": config}}}
    res = job.execute_in_process(run_config=run_config, instance=lineage.instance)
    out = lineage.project_dir / "data" / "ablation"
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((lineage.project_dir / "metrics" / "ablation.json").read_text())
    records = sorted((lineage.project_dir / "metrics" / "ablation" / "runs").glob("*.json"))
    client = lineage.client
    children = [client.get_run(i) for v in summary["variants"] for i in v["run_ids"]]
    parent_id = children[0].data.tags["mlflow.parentRunId"]
    again = job.execute_in_process(run_config=run_config, instance=lineage.instance)
    return SimpleNamespace(
        res=res,
        summary=summary,
        metrics=metrics,
        records=[json.loads(r.read_text()) for r in records],
        table=(out / "summary.md").read_text(),
        children=children,
        parent_id=parent_id,
        parent=client.get_run(parent_id),
        again=again.output_for_node("compare_variants"),
        again_metrics=json.loads((lineage.project_dir / "metrics" / "ablation.json").read_text()),
    )


STEPS = ["world_judge", "reference_clip", "autoencoder", "mixed_sampler", "text_encoder",
         "diffusion_model", "eval_report"]  # fmt: skip


@pytest.fixture(scope="module")
def reuse(lineage, ablation):
    """Every step after the recaptions, three times: to settle what the stages before left
    changed; again with nothing changed (then what a UNet-only edit of params.yaml would
    rebuild, asked only); then with mixed_sampler.synthetic_ratio edited in params.yaml.
    Last in the module: it changes the blend."""
    _materialize(lineage, STEPS)
    same = _materialize(lineage, STEPS)
    stale_when_same = stale.reasons(STEPS, lineage.instance, lineage.resources["dvc"])
    params_file = lineage.project_dir / "params.yaml"
    before = params_file.read_text()
    params = yaml.safe_load(before)
    params["diffusion_model"]["diffusion"]["lr"] = 0.0005  # the UNet's, not the encoder's
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    stale_when_unet = stale.reasons(STEPS, lineage.instance, lineage.resources["dvc"])
    params = yaml.safe_load(before)
    params["mixed_sampler"]["synthetic_ratio"] = 0.5
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    stale_when_edited = stale.reasons(STEPS, lineage.instance, lineage.resources["dvc"])
    edited = _materialize(lineage, STEPS)

    def metadata(res):
        return {n: res.asset_materializations_for_node(n)[0].metadata for n in STEPS}

    return SimpleNamespace(
        same=metadata(same),
        edited=metadata(edited),
        stale_when_same=stale_when_same,
        stale_when_unet=stale_when_unet,
        stale_when_edited=stale_when_edited,
    )


# --- upstream and the blend -----------------------------------------------------------------


def test_raw_data_captioner_and_recaptions_materialize_for_the_training(upstream):
    assert upstream.raw.success
    assert upstream.captioner.success
    assert upstream.recaptioned.success


def test_two_partition_runs_side_by_side_write_every_key_once(lineage, partitions_side_by_side):
    side = partitions_side_by_side
    assert side.codes == [0, 0], side.outputs
    # The two runs overlapped in time: one started before the other ended.
    first, second = sorted(side.runs, key=lambda r: r.start_time)
    assert second.start_time < first.end_time
    index = pd.read_parquet(lineage.project_dir / "data" / "raw" / "index.parquet")
    df = pd.concat([pd.read_parquet(p) for p in sorted(side.out.glob("*.parquet"))])
    assert df["key"].is_unique and sorted(df["key"]) == sorted(index["key"])
    assert not list(side.out.glob(".*"))  # no temp file left
    assert side.dvc_status == {}  # the last commit recorded both shards


def test_a_sample_without_its_synthetic_caption_stops_the_blend_naming_it(blend_refusals):
    key = blend_refusals.missing_key
    with pytest.raises(Exception, match=f"1 of .* lack a descriptive .*{key}"):
        _reraise(blend_refusals.missing_caption)


def test_a_bad_synthetic_ratio_fails_in_mixed_sampler_before_any_training(blend_refusals):
    with pytest.raises(Exception, match=r"synthetic_ratio must be in \[0, 1\], got 1.5"):
        _reraise(blend_refusals.bad_ratio)


# --- the training -------------------------------------------------------------------------


def test_blend_autoencoder_and_training_materialize(trained):
    assert trained.res.success


def test_mixed_sampler_reports_the_realized_synthetic_ratio_per_epoch(trained):
    assert 0.5 < trained.sampler["realized_synthetic_ratio"].value <= 1.0
    assert "| epoch |" in trained.sampler["per_epoch"].value


def test_autoencoder_check_reports_the_colours_it_keeps(trained):
    assert "colour_kept" in trained.checks["autoencoder_keeps_colours"].metadata


def test_autoencoder_scene_check_shows_the_judge_on_renders_and_reconstructions(trained):
    # A few-step test autoencoder returns blobs: the check fails and says what it lost.
    check = trained.checks["autoencoder_keeps_scenes"]
    assert not check.passed
    assert "reconstructions lose" in check.description and "shape" in check.description
    table = check.metadata["scene_kept"].value
    assert "| shape |" in table and "reconstructed" in table


def test_the_text_encoder_is_a_step_of_its_own_with_its_probes_and_the_training_reads_it(
    trained,
):
    assert "| shape |" in trained.encoder["text_encoder_probes"].value
    assert trained.md["data_versions"].data["text_encoder"] == trained.encoder["dvc_md5"].value
    assert trained.md["text_encoder_probes"].value == trained.encoder["text_encoder_probes"].value


def test_training_process_reports_steps_and_colour_following_through_pipes(trained):
    assert trained.md["steps"].value == 6
    assert 0.0 <= trained.md["colour_following"].value <= 1.0
    assert any("step 6/6" in m for m in trained.logs)  # progress lines streamed into the run


def test_asset_registers_a_challenger_with_validation_grid_and_curve(trained):
    # Added by the asset after the training process ended:
    assert trained.md["registered_model"].data["alias"] == "challenger"
    assert "data:image/png;base64," in trained.md["validation_grid"].value
    assert "| 6 |" in trained.md["colour_following_curve"].value


def test_challenger_version_records_its_run_and_data_versions(trained):
    assert trained.version.run_id == trained.run_id
    mixed = trained.md["data_versions"].data["mixed_sampler"]
    assert trained.version.tags["dvc.mixed_sampler"] == mixed
    assert trained.version.tags["dvc.recaptioned_dataset"].endswith(".dir")


def test_mlflow_run_logs_the_blend_and_its_data_versions_as_params(trained):
    assert trained.params["sampler.synthetic_ratio"] == "0.95"
    assert "data.mixed_sampler" in trained.params


def test_a_retrain_on_unchanged_data_resumes_the_same_mlflow_run_tagging_newer_code(
    trained, retrained
):
    # Its params stay as first logged (MLflow refuses changes); the new version is a tag.
    assert retrained.md["mlflow_run_id"].value == trained.run_id
    assert retrained.run.data.params["code_version"] == trained.params["code_version"]
    assert retrained.run.data.tags["resumed_with.code_version"] == "newer-code"


# --- the eval report and the promotion gate -------------------------------------------------


def test_eval_report_and_its_evaluators_materialize(evaluated):
    assert evaluated.res.success


def test_a_judge_below_its_bar_fails_its_check_and_the_gate_promotes_nothing(evaluated):
    assert not evaluated.checks["world_judge_accurate"].passed
    assert not evaluated.checks["not_worse_than_champion"].passed
    assert evaluated.md["promoted_to_champion"].value is False
    assert "world judge is below its bar" in evaluated.md["gate"].data["reason"]


def test_eval_report_metadata_holds_the_prompt_following_table(evaluated):
    assert "| colour_binding |" in evaluated.md["prompt_following"].value


def test_eval_report_metadata_shows_partial_progress_per_form(evaluated):
    table = evaluated.md["partial_progress"].value
    assert table.startswith("| | short | descriptive |")
    # Background is judged in the descriptive form only (the short form does not state it).
    assert "| background | - | " in table and "| failed: no_object (primary) |" in table
    # Every drawn object counts, not the best of several guesses.
    assert "| one-object prompts: objects per image |" in table


def test_eval_report_html_shows_the_grids_and_the_gate_decision(evaluated):
    html = evaluated.html
    assert "grids/colour_binding-descriptive.png" in html and "not promoted" in html
    assert "<h2>What is drawn</h2>" in html


def test_eval_report_writes_its_metrics_and_per_prompt_scores(evaluated):
    metrics = evaluated.metrics
    assert metrics["prompts"] == 7 and metrics["images_per_prompt"] == 2
    assert set(metrics["forms"]) == {"short", "descriptive", "upsampled"}
    per_prompt = evaluated.per_prompt
    assert len(per_prompt["scores"]) == 7 and per_prompt["fingerprint"]["images_per_prompt"] == 2
    # The gate's score of a prompt is over the suite's two forms; the upsampled one is apart.
    for pid, forms in per_prompt["by_form"].items():
        assert set(forms) == {"short", "descriptive", "upsampled"}
        assert per_prompt["scores"][pid] == pytest.approx(
            (forms["short"] + forms["descriptive"]) / 2
        )
    assert evaluated.dvc_metrics["short"]
    # Partial progress per form: attribute scores in [0, 1]; every failed image has a
    # reason, so the primary-reason shares add up to 1 when any image failed.
    for form, m in metrics["forms"].items():
        assert all(0.0 <= v <= 1.0 for v in m["attribute_accuracy"].values()), form
        fr = m["failure_reasons"]
        assert sum(fr["share_primary"].values()) == pytest.approx(1.0 if fr["failed"] else 0.0)
        assert evaluated.dvc_metrics[form]["failure_reasons"] == fr
    assert "size" not in metrics["forms"]["short"]["attribute_accuracy"]


def test_eval_report_is_logged_to_the_challengers_mlflow_run(evaluated):
    assert "eval/descriptive/overall" in evaluated.run.data.metrics
    assert evaluated.run.data.tags["eval.promoted_to_champion"] == "false"
    assert {"eval_report/index.html", "eval_report/gate.json"} <= evaluated.artifacts


def test_the_report_holds_the_short_prompts_upsampled_by_the_expander(evaluated):
    metrics = evaluated.metrics
    assert "upsampled form skipped: no prompt expander given" not in metrics["notes"]
    assert evaluated.md["upsampled_minus_short"].data["expanded_share"] == 0.0
    forms = metrics["forms"]
    up, short = forms["upsampled"], forms["short"]
    # The lineage's expander learnt nothing, so every image is drawn from the short prompt
    # itself, with its seed: the same images, the same scores, a difference of exactly 0.
    assert up["expanded_share"] == 0.0
    assert up["prompt_following"] == short["prompt_following"]
    assert up["minus_short"] == 0.0 and up["minus_short_ci"] == [0.0, 0.0]


def test_prompt_expander_reports_its_faithfulness_and_a_check_says_why_it_fails(lineage, expanded):
    assert expanded.res.success
    assert "| suite_short | 112 |" in expanded.md["faithfulness"].value
    assert "| suite_short |" in expanded.md["diversity_bits"].value
    # nothing learnt, so no DPO round: the table has its header and no row
    assert expanded.md["dpo_rounds"].value.count("\n") == 1
    assert 0 <= expanded.md["suite_short_unfaithful"].value <= 1
    assert expanded.md["pairs"].value == 0 and expanded.md["trained_steps"].value == 0
    [check] = expanded.res.get_asset_check_evaluations()
    assert not check.passed
    assert check.description.startswith("no usable caption to learn from: skipped {")
    run = lineage.client.get_run(expanded.md["mlflow_run_id"].value)
    assert "suite_short_unfaithful" in run.data.metrics
    model, tok = load_expander(expanded.folder)
    assert len(expand(model, tok, ["a red circle"], n=2, max_new_tokens=4)[0]) == 2


def test_the_feedback_pool_draws_every_prompt_from_every_generator(lineage, feedback):
    s = feedback.summary
    gens = ["default/ema/g1", "default/ema/g3", "default/raw/g1", "default/raw/g3"]
    assert s["generators"] == gens
    assert s["held_out"] == ["default/ema/g1", "default/raw/g1"]
    assert s["images"] == s["prompts"] * len(gens) * 2  # 2 images per generator
    per_prompt = len(gens) * 2
    assert s["pairs"] == s["prompts"] * per_prompt * (per_prompt - 1) // 2
    # annotators calibrated to HPD v2's agreement, the ceiling above it, and the check says so
    assert s["annotator_agreement"] == pytest.approx(0.781, abs=1e-3)
    assert feedback.checks["feedback_pool_annotators_calibrated"].passed
    # raw weights draw other images than the EMA ones: four generators, not two
    assert "| default/raw/g3 |" in feedback.pool_md["generators"].value
    assert "data:image/png;base64," in feedback.pool_md["examples"].value
    # a pair joins images of one prompt, and is held out when it touches a held-out generator
    pool = load_pool(lineage.project_dir / "data" / "feedback_pool")
    for pair in feedback.pairs:
        a, b = pool.labels[pair["a"]], pool.labels[pair["b"]]
        assert a["prompt"] == b["prompt"] == pair["prompt"]
        assert pair["held_out"] == (a["generator"].endswith("g1") or b["generator"].endswith("g1"))


def test_a_second_pool_build_draws_nothing_again(feedback):
    assert feedback.again["reused_generators"].value == 4
    # and writes the same pool, so that the models trained on it are not rebuilt
    assert feedback.again["dvc_md5"].value == feedback.pool_md["dvc_md5"].value


def test_a_new_labelling_rule_labels_the_kept_images_again_without_drawing(
    lineage, feedback, tmp_path, monkeypatch
):
    from models.feedback import build_pool as build_mod
    from models.feedback.pool import PoolConfig

    pool_dir = tmp_path / "pool"
    shutil.copytree(lineage.project_dir / "data" / "feedback_pool", pool_dir)
    before = {f.name: f.read_bytes() for f in (pool_dir / "generators").iterdir()}

    def draw(*args, **kwargs):
        raise AssertionError("drew images that were kept")

    monkeypatch.setattr(build_mod, "_draw", draw)
    monkeypatch.setattr(build_mod, "LABELS_RULE", "a rule of a later version")
    params = yaml.safe_load((lineage.project_dir / "params.yaml").read_text())
    cfg = PoolConfig.from_dict(params["feedback_pool"])
    judge = lineage.project_dir / "data" / "world_judge"
    summary = build_mod.build_pool(cfg, judge, pool_dir, root=lineage.project_dir)
    assert summary["reused_generators"] == [] and len(summary["relabelled_generators"]) == 4
    for name, data in before.items():
        now = (pool_dir / "generators" / name).read_bytes()
        if name.endswith(".safetensors"):
            assert now == data  # the kept images
        else:  # the same labels under a new key
            assert now.splitlines()[1:] == data.splitlines()[1:]
            assert now.splitlines()[0] != data.splitlines()[0]
    assert summary["bayes_ceiling"] == feedback.summary["bayes_ceiling"]


def test_a_model_that_samples_otherwise_is_drawn_again(lineage, feedback, tmp_path, monkeypatch):
    """The same weights with another sampling setting (train_config.json's `eval`) draw
    other images: the kept ones are not reused."""
    from models.feedback import build_pool as build_mod
    from models.feedback.pool import PoolConfig

    project = lineage.project_dir
    root = tmp_path / "root"
    shutil.copytree(project / "data" / "diffusion_model", root / "data" / "diffusion_model")
    (root / "data" / "work").symlink_to(project / "data" / "work")  # the raw checkpoints
    config = root / "data" / "diffusion_model" / "train_config.json"
    train_config = json.loads(config.read_text())
    train_config["eval"]["layout_guidance"] = 2.0
    config.write_text(json.dumps(train_config))
    pool_dir = tmp_path / "pool"
    shutil.copytree(project / "data" / "feedback_pool", pool_dir)
    drawn = []

    def draw(gen, texts, cfg, root):
        drawn.append(gen.name)
        return load_file(str(pool_dir / "generators" / f"{gen.slug}.safetensors"))["images"]

    monkeypatch.setattr(build_mod, "_draw", draw)
    params = yaml.safe_load((project / "params.yaml").read_text())
    cfg = PoolConfig.from_dict(params["feedback_pool"])
    summary = build_mod.build_pool(cfg, project / "data" / "world_judge", pool_dir, root=root)
    assert drawn == feedback.summary["generators"]
    assert summary["reused_generators"] == [] and summary["relabelled_generators"] == []


def test_the_preference_model_is_measured_against_the_ceiling_and_clip_score(feedback):
    m = feedback.metrics
    test = m["preference_model"]["test"]
    assert test["pairs"] > 0 and 0.5 <= test["ceiling"] <= 1
    assert 0 <= test["agreement"] <= 1
    assert set(m["ablations"]) == {
        "without_alignment",
        "without_plausibility",
        "without_composition",
    }
    assert m["best_of_n"]["n"] == 2
    assert "| test |" in feedback.md["measures"].value
    assert "| default/" in feedback.md["generators_ranked"].value
    assert "| preference model | all_conditions |" in feedback.md["best_of_n"].value
    # trained 2 steps: far from the ceiling; the check fails and says by how much
    check = feedback.checks["preference_model_near_ceiling"]
    assert "ceiling" in check.description


def test_the_rich_feedback_model_is_measured_with_rahfs_metrics_per_kind(feedback):
    m = feedback.rich
    # every pool image, and one corruption per pool prompt
    assert m["examples"]["generated"] == feedback.summary["images"]
    assert sum(m["examples"].values()) == feedback.summary["images"] + feedback.summary["prompts"]
    assert set(m["test"]["scores"]) == {"plausibility", "alignment", "composition", "overall"}
    assert {"precision", "recall", "f1"} <= set(m["test"]["keywords"])
    assert "generated" in m["by_kind"]
    table = feedback.rich_md["rich_feedback"].value
    assert "| implausibility auc_judd |" in table and "0.905" in table  # the reproduction's
    assert "data:image/png;base64," in feedback.rich_md["overlays"].value
    uses = m["uses"]
    assert uses["repair"]["images"] == 4 and uses["selection"]["k"] == 2
    assert "| repair (" in feedback.rich_md["uses"].value


def test_with_a_judge_meeting_its_bar_the_first_challenger_is_promoted(retrained, promoted):
    gate = promoted.first_gate
    assert gate["promote"] and gate["reason"] == "no champion yet"
    assert promoted.champion.version == retrained.version.version


def test_the_generate_command_draws_through_the_champion_with_expansion(
    lineage, promoted, expanded, tmp_path
):
    out = tmp_path / "generated"
    expand_args = ["--expand", "2", "--expander", str(expanded.folder)]
    where = ["--tracking-uri", lineage.tracking, "--out", str(out)]
    rows = generate_command(["a red circle", *expand_args, "--steps", "2", *where])
    # The lineage's expander learnt nothing (no usable caption): the prompt itself is drawn.
    assert [(r.prompt, r.expanded) for r in rows] == [("a red circle", False)] * 2
    assert json.loads((out / "prompts.json").read_text())[1]["image"] == "001.png"
    assert (out / "grid.png").is_file()


def test_the_report_shows_the_feedback_models_view_of_its_images(evaluated):
    """Preference and rich-feedback scores of every image, the predicted missed words
    against the judge's, and the grids with heatmaps, in the files, the page and the UI."""
    m = evaluated.metrics
    assert not any("columns skipped" in n for n in m["notes"])
    for form, fm in m["forms"].items():
        fb = fm["feedback"]
        assert math.isfinite(fb["preference"]) and 0.0 <= fb["rich_overall"] <= 1.0
        assert set(fb["missed_words"]) == {"precision", "recall", "f1"}
        assert f"grids/colour_binding-{form}-feedback.png" in evaluated.html
    for r in evaluated.per_image:
        assert set(r["rich_scores"]) == {"plausibility", "alignment", "composition", "overall"}
        # The judge's missed words are words of the prompt, and only failed images miss any.
        assert set(r["missed_words_judged"]) <= set(prompt_words(r["prompt"])) or (
            r["form"] == "upsampled"
        )
        assert bool(r["missed_words_judged"]) == (not r["passed"])
        assert isinstance(r["preference"], float)
    assert "The feedback models on these images" in evaluated.html
    assert "| missed words: recall |" in evaluated.md["feedback"].value
    assert "data:image/png;base64," in evaluated.md["grid_colour_binding_feedback"].value


def test_a_champion_evaluated_again_is_not_compared_with_itself(promoted):
    gate = promoted.again_gate
    assert gate["promote"] and "champion already" in gate["reason"]


# --- reuse: nothing is rebuilt that did not change ----------------------------------------


def test_a_second_run_with_nothing_changed_reuses_every_step(reuse):
    assert {n: md["reused"].value for n, md in reuse.same.items()} == dict.fromkeys(STEPS, True)
    assert all(md["wall_seconds"].value >= 0 for md in reuse.same.values())
    # The reused materialization still shows what was built: the model, its run, its grid.
    assert "mlflow_run_id" in reuse.same["diffusion_model"]
    assert "validation_grid" in reuse.same["diffusion_model"]


def test_make_run_launches_no_step_when_nothing_changed_and_the_sampler_when_its_ratio_did(
    reuse,
):
    assert reuse.stale_when_same == {}
    # The first stale step of the command; what follows it sees the new blend once built.
    assert set(reuse.stale_when_edited) == {"mixed_sampler"}
    # dvc status names the changed params section: {"params.yaml": {"mixed_sampler": ...}}
    assert "params.yaml" in reuse.stale_when_edited["mixed_sampler"]


def test_editing_the_synthetic_ratio_rebuilds_only_the_sampler_and_what_follows(reuse):
    rebuilt = {n for n, md in reuse.edited.items() if not md["reused"].value}
    # The text encoder learns from the blend's captions: a new blend, a new encoder.
    assert rebuilt == {"mixed_sampler", "text_encoder", "diffusion_model", "eval_report"}
    assert reuse.edited["mixed_sampler"]["dvc_md5"] != reuse.same["mixed_sampler"]["dvc_md5"]


def test_a_change_to_the_unets_training_leaves_the_text_encoder_current(reuse):
    assert set(reuse.stale_when_unet) == {"diffusion_model"}


def test_the_rebuild_tag_builds_an_unchanged_step_again(retrained):
    assert retrained.md["reused"].value is False


# --- the caption ablation -------------------------------------------------------------------


def test_caption_ablation_trains_each_variant_and_seed_for_the_same_steps(ablation):
    assert ablation.res.success
    variants = ablation.summary["variants"]
    assert [v["name"] for v in variants] == ["alt_text", "descriptive_95"]
    assert [v["seeds"] for v in variants] == [[0, 1], [0, 1]]
    assert variants[0]["realized_ratio"] == 0.0 and variants[1]["realized_ratio"] > 0.5
    assert [(r["name"], r["seed"]) for r in ablation.records] == [
        ("alt_text", 0), ("alt_text", 1), ("descriptive_95", 0), ("descriptive_95", 1)
    ]  # fmt: skip
    for r in ablation.records:
        assert r["steps"] == 4 and [c["step"] for c in r["curve"]] == [2, 4]
        assert {"clip_score", "all_conditions/short", "all_conditions/descriptive"} <= set(
            r["curve"][-1]
        )


def test_caption_ablation_shares_one_text_encoder_across_variants(ablation):
    assert len({r["encoder_digest"] for r in ablation.records}) == 1


def test_caption_ablation_reports_differences_with_intervals(ablation):
    variants = ablation.metrics["variants"]
    for form in ("short", "descriptive"):
        m = variants["descriptive_95"][form]
        assert m["low"] <= m["mean"] <= m["high"] and len(m["per_seed"]) == 2
    diffs = {(d["a"], d["b"], d["form"]) for d in ablation.metrics["differences"]}
    assert diffs == {("descriptive_95", "alt_text", f) for f in ("short", "descriptive")}
    table = ablation.table
    assert "| alt_text | 0.00" in table and "| descriptive_95 - alt_text | short |" in table


def test_caption_ablation_runs_are_children_of_one_finished_parent(ablation):
    assert len(ablation.children) == 4
    assert all(c.data.tags["mlflow.parentRunId"] == ablation.parent_id for c in ablation.children)
    assert "descriptive_95/descriptive/all_conditions" in ablation.parent.data.metrics
    statuses = {r.info.status for r in (ablation.parent, *ablation.children)}
    assert statuses == {"FINISHED"}


def test_caption_ablation_run_again_reuses_every_finished_run(ablation):
    assert ablation.again["runs"] == 4 and ablation.again_metrics["reused_runs"] == 4
    assert ablation.again_metrics["variants"] == ablation.metrics["variants"]


# --- the UI -----------------------------------------------------------------------------------


def test_ui_shows_the_lineage_and_the_eval_report(lineage, ablation):
    # This instance in dagster-webserver, the report in Chromium.
    check_ui(lineage.instance, lineage.project_dir)


def test_training_process_detects_pipes_by_dagsters_own_variable():
    import dagster_pipes

    from models.common.pipes_report import PIPES_CONTEXT_ENV_VAR

    assert PIPES_CONTEXT_ENV_VAR == dagster_pipes.DAGSTER_PIPES_CONTEXT_ENV_VAR
