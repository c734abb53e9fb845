"""Assets `world_judge` and `reference_clip`: the frozen evaluators of the eval report.

Both are trained once on ground-truth renders of the synthetic world drawn from seeds
disjoint from the corpus (or, for `full`, the reference CLIP is loaded pretrained), and
prove themselves on held-out renders before they judge any generated image."""

import json
from dataclasses import asdict

import dagster as dg
import mlflow
from lightning.pytorch.loggers import MLFlowLogger

from assets.metadata import flatten
from assets.reuse import build_or_reuse
from models.evaluation.reference_clip import ReferenceClipConfig, train_reference_clip
from models.evaluation.world_judge import ATTRIBUTE_KINDS, JudgeConfig, failing_kinds, train_judge


def _accuracy_table(accuracy: dict[str, float], threshold: float) -> dg.MetadataValue:
    lines = ["| attribute | accuracy | >= threshold |", "|---|---:|:---:|"]
    lines += [
        f"| {k} | {accuracy[k]:.4f} | {'yes' if accuracy[k] >= threshold else 'NO'} |"
        for k in ATTRIBUTE_KINDS
    ]
    return dg.MetadataValue.md("\n".join(lines))


def _robustness_table(metrics: dict) -> dg.MetadataValue:
    """Accuracy per kind on the held-out renders, clean and perturbed."""
    columns = {"clean": metrics["accuracy"], **metrics["robustness"]}
    lines = [
        "| attribute | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [
        f"| {k} | " + " | ".join(f"{c[k]:.3f}" for c in columns.values()) + " |"
        for k in ATTRIBUTE_KINDS
    ]
    return dg.MetadataValue.md("\n".join(lines))


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "mlflow", "dvc"},
    pool="gpu",  # training: one at a time, like diffusion_model (dagster.yaml)
    required_resource_keys={"project", "dvc", "mlflow"},
    description="GenEval-style judge of shape, colour, size, position, count, word and "
    "background, trained on ground-truth renders (models/evaluation/world_judge.py).",
)
def world_judge(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return build_or_reuse(context, "world_judge", lambda: _build_world_judge(context))


def _build_world_judge(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    cfg = JudgeConfig.from_dict(project.params("world_judge"))
    out = project.data_path("world_judge")
    with mlflow_res.start_run("world_judge", tags={"dagster_run_id": context.run.run_id}) as run:
        mlflow.log_params(flatten(asdict(cfg)))
        metrics = train_judge(
            cfg, out, log=lambda m, step: mlflow.log_metrics(m, step=step), progress=False
        )
        run_meta = mlflow_res.run_metadata(run)
    dvc_hash = dvc.commit("world_judge")["data/world_judge"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dvc_md5": dvc_hash,
            "held_out_accuracy": _accuracy_table(metrics["accuracy"], cfg.min_accuracy),
            "robustness": _robustness_table(metrics),
            "min_accuracy": min(metrics["accuracy"].values()),
            "eval_images": metrics["eval_images"],
            "train_seconds": metrics["seconds"]["train"],
            **run_meta,
        },
        data_version=dg.DataVersion(dvc_hash),
    )


@dg.asset_check(asset="world_judge", required_resource_keys={"project"})
def world_judge_accurate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every attribute kind must be read right on held-out renders (0.98 by default)."""
    project = context.resources.project
    metrics = json.loads(project.data_path("world_judge", "metrics.json").read_text())
    threshold, below = metrics["min_accuracy"], failing_kinds(metrics)
    return dg.AssetCheckResult(
        passed=not below,
        metadata={f"accuracy_{k}": v for k, v in metrics["accuracy"].items()},
        description=(
            f"below {threshold}: {below}" if below else f"every kind >= {threshold} on held-out"
        ),
    )


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "mlflow", "dvc"},
    pool="gpu",  # training: one at a time, like diffusion_model (dagster.yaml)
    required_resource_keys={"project", "dvc", "mlflow"},
    description="The CLIP behind CLIP score: tiny open_clip trained on ground-truth "
    "descriptive captions, or pretrained ViT-B/32 for full (models/evaluation/reference_clip.py).",
)
def reference_clip(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return build_or_reuse(context, "reference_clip", lambda: _build_reference_clip(context))


def _build_reference_clip(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    cfg = ReferenceClipConfig.from_dict(project.params("reference_clip"))
    out = project.data_path("reference_clip")
    with mlflow_res.start_run("reference_clip", tags={"dagster_run_id": context.run.run_id}) as run:
        mlflow.log_params(flatten(asdict(cfg)))
        logger = MLFlowLogger(
            tracking_uri=mlflow_res.tracking_uri,
            experiment_name=mlflow_res.experiment,
            run_id=run.info.run_id,
        )
        metrics = train_reference_clip(cfg, out, logger)
        mlflow.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "trained"}
        )
        run_meta = mlflow_res.run_metadata(run)
    dvc_hash = dvc.commit("reference_clip")["data/reference_clip"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dvc_md5": dvc_hash,
            "model_name": cfg.model_name,
            "trained_here": metrics["trained"],
            "image_to_text_top1": metrics["image_to_text_top1"],
            "chance_top1": metrics["chance_top1"],
            "clip_score_true_pairs": metrics["clip_score_true_pairs"],
            "clip_score_shuffled_pairs": metrics["clip_score_shuffled_pairs"],
            "context_length": metrics["context_length"],
            "held_out_captions_cut_at_context": metrics["truncated_share"],
            **run_meta,
        },
        data_version=dg.DataVersion(dvc_hash),
    )
