"""Asset `eval_report`: the trained model's prompt following, measured exactly, and its
CLIP score; the regression gate that promotes the challenger to `champion`.

The report (HTML, grids, plots, metrics.json) is written by `models.evaluation.report` and
logged to the model's MLflow run. The gate bootstraps the per-prompt difference between
the challenger and the registered champion (models/evaluation/promotion_gate.py); the challenger
becomes `champion` only when it is not worse beyond noise, and the check
`not_worse_than_champion` reports the decision."""

import json

import dagster as dg
from mlflow import MlflowClient
from PIL import Image

from assets.diffusion_model import REGISTERED_NAME
from assets.metadata import preview_metadata
from assets.reuse import build_or_reuse
from models.evaluation.feedback_columns import MEASURES
from models.evaluation.promotion_gate import promotion_decision
from models.evaluation.report import EvalReportConfig, evaluate_model
from models.evaluation.world_judge import failing_kinds
from models.registry.model_registry import run_json_artifact, set_alias, version_by_alias

STAGE = "eval_report"
PER_PROMPT_ARTIFACT = "eval_report/per_prompt.json"


def category_table(metrics: dict) -> str:
    forms = list(metrics["forms"])
    cats = list(metrics["forms"][forms[0]]["prompt_following"])
    lines = ["| category | " + " | ".join(forms) + " |", "|---|" + "---:|" * len(forms)]
    lines += [
        f"| {c} | "
        + " | ".join(f"{metrics['forms'][f]['prompt_following'][c]:.3f}" for f in forms)
        + " |"
        for c in cats
    ]
    return "\n".join(lines)


def eval_params(project) -> dict:
    """The eval_report section of params.yaml, its suite path resolved in the project."""
    params = dict(project.params(STAGE))
    if params.get("suite"):
        params["suite"] = str(project.path / params["suite"])
    return params


def run_gate(tracking_uri: str, challenger_run: str, per_prompt: dict, judge: dict) -> dict:
    """Compare with the champion; promote the challenger when it is not worse beyond
    noise, was scored by a judge that passed its own check, and both were scored the
    same way (suite, judge weights, sampling settings)."""
    failing = failing_kinds(judge)
    if failing:
        return {"promote": False, "reason": f"the world judge is below its bar: {failing}"}
    challenger = version_by_alias(tracking_uri, REGISTERED_NAME, "challenger")
    if challenger is None or challenger.run_id != challenger_run:
        return {"promote": False, "reason": "the evaluated model is not the registered challenger"}
    champion = version_by_alias(tracking_uri, REGISTERED_NAME, "champion")
    champion_scores = None
    if champion is not None:
        if champion.version == challenger.version:
            return {"promote": True, "reason": f"version {challenger.version} is champion already"}
        theirs = run_json_artifact(tracking_uri, champion.run_id, PER_PROMPT_ARTIFACT)
        if theirs is None or "fingerprint" not in theirs:
            return {
                "promote": False,
                "reason": f"champion version {champion.version} has no comparable eval report",
            }
        if theirs["fingerprint"] != per_prompt["fingerprint"]:
            differ = sorted(
                k
                for k in per_prompt["fingerprint"]
                if theirs["fingerprint"].get(k) != per_prompt["fingerprint"][k]
            )
            return {
                "promote": False,
                "reason": f"champion version {champion.version} was scored differently "
                f"({differ}); re-score it with this suite, judge and sampling",
            }
        champion_scores = theirs["scores"]
    try:
        decision = promotion_decision(per_prompt["scores"], champion_scores)
    except ValueError as e:
        return {"promote": False, "reason": str(e)}
    decision["challenger_version"] = challenger.version
    decision["champion_version"] = champion.version if champion else None
    if decision["promote"]:
        set_alias(tracking_uri, REGISTERED_NAME, "champion", challenger.version)
    return decision


def _if_built(project, stage: str, marker: str) -> str | None:
    """The folder of an optional input (the upsampled form, the feedback columns); the
    report notes what it left out."""
    return str(project.data_path(stage)) if project.data_path(stage, marker).exists() else None


def _cell(v: float | int | None) -> str:
    return "-" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}"


def feedback_table(metrics: dict) -> str | None:
    """The feedback models' measures per form (Markdown), or None without them."""
    forms = [f for f, m in metrics["forms"].items() if "feedback" in m]
    if not forms:
        return None
    fb = [metrics["forms"][f]["feedback"] for f in forms]
    rows = ["| | " + " | ".join(forms) + " |", "|---|" + "---:|" * len(forms)]
    cells = [[m.get(k) for m in fb] for k, _ in MEASURES]
    cells += [[m.get("missed_words", {}).get(k) for m in fb] for k in ("precision", "recall", "f1")]
    labels = [label for _, label in MEASURES] + [
        f"missed words: {k}" for k in ("precision", "recall", "F1")
    ]
    for label, row in zip(labels, cells, strict=True):
        if any(v is not None for v in row):
            rows.append(f"| {label} | " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(rows)


def partial_progress_table(metrics: dict) -> str:
    """Attribute accuracy given that the object exists, and the primary reason failed
    images failed, one column per prompt form (Markdown for the asset's metadata)."""
    forms = list(metrics["forms"])
    head = "| | " + " | ".join(forms) + " |\n|---|" + "---:|" * len(forms)
    rows = [head]
    attributes = {k for m in metrics["forms"].values() for k in m["attribute_accuracy"]}
    for k in sorted(attributes):
        cells = [metrics["forms"][f]["attribute_accuracy"].get(k) for f in forms]
        rows.append(
            f"| {k} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |"
        )
    reasons = next(iter(metrics["forms"].values()))["failure_reasons"]["share_primary"]
    for r in reasons:
        cells = [metrics["forms"][f]["failure_reasons"]["share_primary"][r] for f in forms]
        rows.append(f"| failed: {r} (primary) | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    if all("drawn" in m for m in metrics["forms"].values()):
        one = [metrics["forms"][f]["drawn"]["one_object_prompts"] for f in forms]
        names = {"objects_per_image": "objects per image", "asked_shape_share": "asked shape"}
        for k, name in names.items():
            cells = ["-" if d[k] is None else f"{d[k]:.3f}" for d in one]
            rows.append(f"| one-object prompts: {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@dg.asset(
    name=STAGE,
    deps=[
        "diffusion_model",
        "world_judge",
        "reference_clip",
        "prompt_expander",
        "preference_model",
        "rich_feedback_model",
    ],
    group_name="evaluation",
    kinds={"pytorch", "mlflow", "dvc"},
    pool="gpu",  # samples the model: one GPU job at a time (dagster.yaml)
    required_resource_keys={"project", "dvc", "mlflow"},
    description=__doc__,
)
def eval_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return build_or_reuse(context, STAGE, lambda: _build_eval_report(context))


def _build_eval_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    cfg = EvalReportConfig.from_dict(
        {
            **eval_params(project),
            "model": str(project.data_path("diffusion_model")),
            "judge": str(project.data_path("world_judge")),
            "reference_clip": str(project.data_path("reference_clip")),
            "expander": _if_built(project, "prompt_expander", "config.json"),
            "preference_model": _if_built(project, "preference_model", "metrics.json"),
            "rich_feedback_model": _if_built(project, "rich_feedback_model", "metrics.json"),
            "out": str(project.data_path(STAGE)),
            "metrics_dir": str(project.path / "metrics"),
            "mlflow_tracking_uri": mlflow_res.tracking_uri,
        }
    )
    judge = json.loads(project.data_path("world_judge", "metrics.json").read_text())

    def gate(per_prompt: dict, run_id: str | None) -> dict:
        if not run_id:
            return {"promote": False, "reason": "the model has no MLflow run"}
        return run_gate(mlflow_res.tracking_uri, run_id, per_prompt, judge)

    metrics = evaluate_model(cfg, gate)
    out, gate_decision, run_id = (
        project.data_path(STAGE),
        metrics["gate"],
        metrics.get("mlflow_run_id"),
    )
    html = out / "index.html"
    dvc_hash = dvc.commit(STAGE)["data/eval_report"]
    meta = {
        "report_html": dg.MetadataValue.path(str(html)),
        "path": dg.MetadataValue.path(str(out)),
        "dvc_md5": dvc_hash,
        "prompt_following": dg.MetadataValue.md(category_table(metrics)),
        "partial_progress": dg.MetadataValue.md(partial_progress_table(metrics)),
        "gate": dg.MetadataValue.json(gate_decision),
        "promoted_to_champion": bool(gate_decision.get("promote")),
        "plot": preview_metadata(
            Image.open(out / "plots" / "prompt_following.png"), "prompt following by category"
        ),
        "grid_colour_binding": preview_metadata(
            Image.open(out / "grids" / "colour_binding-descriptive.png"),
            "colour binding, descriptive prompts (green: passed)",
        ),
        "eval_seconds": metrics["seconds"]["total_s"],
    }
    table = feedback_table(metrics)
    if table:
        meta["feedback"] = dg.MetadataValue.md(table)
    overlays = out / "grids" / "colour_binding-descriptive-feedback.png"
    if overlays.exists():
        meta["grid_colour_binding_feedback"] = preview_metadata(
            Image.open(overlays),
            "the same images, predicted implausibility (red), misalignment (blue), missed words",
        )
    for form, m in metrics["forms"].items():
        meta[f"{form}_overall"] = m["prompt_following"]["overall"]
        meta[f"{form}_clip_score"] = m["clip_score"]
    if "upsampled" in metrics["forms"]:
        up = metrics["forms"]["upsampled"]
        meta["upsampled_minus_short"] = dg.MetadataValue.json(
            {k: up[k] for k in ("minus_short", "minus_short_ci", "expanded_share")}
        )
    if run_id:
        meta.update(mlflow_res.run_metadata(MlflowClient(mlflow_res.tracking_uri).get_run(run_id)))
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(dvc_hash))


@dg.asset_check(asset=STAGE, required_resource_keys={"project"})
def not_worse_than_champion(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Fails when the challenger is worse than the champion beyond noise (bootstrap CI over
    prompts) or could not be compared; the challenger was promoted only if this passes."""
    gate = json.loads(context.resources.project.data_path(STAGE, "gate.json").read_text())
    return dg.AssetCheckResult(
        passed=bool(gate.get("promote")),
        metadata={k: v for k, v in gate.items() if isinstance(v, int | float | str | bool)},
        description=gate.get("reason", ""),
    )
