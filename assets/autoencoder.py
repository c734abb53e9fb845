"""Asset `autoencoder`: the latent space of the diffusion model (a diffusers
AutoencoderKL trained on the synthetic world for `tiny`, loaded pretrained for `full`),
with its reconstructions checked so it is never the hidden bottleneck of prompt
following."""

import json
from dataclasses import asdict

import dagster as dg
import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from PIL import Image

from assets.metadata import flatten, preview_metadata
from assets.reuse import build_or_reuse
from models.diffusion.autoencoder import AutoencoderConfig, scene_check, train_autoencoder

STAGE = "autoencoder"


@dg.asset(
    name=STAGE,
    deps=["raw_alt_text_dataset", "world_judge"],
    group_name="training",
    kinds={"pytorch", "mlflow", "dvc"},
    required_resource_keys={"project", "dvc", "mlflow"},
    description=__doc__,
)
def autoencoder(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return build_or_reuse(context, STAGE, lambda: _build_autoencoder(context))


def _build_autoencoder(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    cfg = AutoencoderConfig.from_dict(project.params(STAGE))
    out = project.data_path(STAGE)
    with mlflow_res.start_run(STAGE, tags={"dagster_run_id": context.run.run_id}) as run:
        mlflow.log_params(flatten(asdict(cfg)))
        logger = MLFlowLogger(
            tracking_uri=mlflow_res.tracking_uri,
            experiment_name=mlflow_res.experiment,
            run_id=run.info.run_id,
        )
        metrics = train_autoencoder(
            cfg, project.data_path("raw"), out, logger, judge=project.data_path("world_judge")
        )
        kept = metrics["scene_kept"]["reconstructed"]
        mlflow.log_metrics(
            {k: metrics[k] for k in ("colour_kept", "psnr_db", "mean_abs_error", "train_seconds")}
            | {f"scene_kept_{k}": v for k, v in kept.items()}
        )
        grid = Image.open(out / "reconstructions.png")
        mlflow.log_image(grid, "reconstructions.png")
        run_meta = mlflow_res.run_metadata(run)
    dvc_hash = dvc.commit(STAGE)["data/autoencoder"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dvc_md5": dvc_hash,
            "colour_kept": metrics["colour_kept"],
            "scene_kept": dg.MetadataValue.md(scene_table(metrics["scene_kept"])),
            "psnr_db": metrics["psnr_db"],
            "mean_abs_error": metrics["mean_abs_error"],
            "latent_shape": str(tuple(metrics["latent_shape"])),
            "scaling_factor": metrics["scaling_factor"],
            "train_seconds": metrics["train_seconds"],
            "reconstructions": preview_metadata(
                grid, "held-out images (odd) and their reconstructions (even)"
            ),
            **run_meta,
        },
        data_version=dg.DataVersion(dvc_hash),
    )


def scene_table(kept: dict) -> str:
    """Markdown: the judge's accuracy per kind on renders and on their reconstructions."""
    rows = [
        f"| {k} | {kept['rendered'][k]:.3f} | {kept['reconstructed'][k]:.3f} |"
        for k in kept["reconstructed"]
    ]
    return "\n".join(
        [f"| kind ({kept['images']} scenes) | rendered | reconstructed |", "|---|---|---|", *rows]
    )


@dg.asset_check(asset=STAGE, required_resource_keys={"project"})
def autoencoder_keeps_scenes(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The world judge reads reconstructions of fresh renders as it reads the renders:
    shape, colour, size, position and count each at least `min_scene_kept` (an
    autoencoder that turns small shapes into blobs fails here, whatever its PSNR)."""
    project = context.resources.project
    metrics = json.loads(project.data_path(STAGE, "metrics.json").read_text())
    lost = scene_check(metrics)
    bar = metrics["config"]["min_scene_kept"]
    return dg.AssetCheckResult(
        passed=not lost,
        metadata={
            "scene_kept": dg.MetadataValue.md(scene_table(metrics["scene_kept"])),
            "threshold": bar,
        },
        description=(
            f"reconstructions lose {', '.join(f'{k} ({v:.3f})' for k, v in lost.items())}"
            if lost
            else f"every kind read at >= {bar} on reconstructions"
        ),
    )


@dg.asset_check(asset=STAGE, required_resource_keys={"project"})
def autoencoder_keeps_colours(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Held-out object pixels must keep their palette colour through encode -> decode."""
    project = context.resources.project
    metrics = json.loads(project.data_path(STAGE, "metrics.json").read_text())
    threshold = AutoencoderConfig.from_dict(project.params(STAGE)).min_colour_kept
    kept = metrics["colour_kept"]
    return dg.AssetCheckResult(
        passed=bool(kept >= threshold),
        metadata={"colour_kept": kept, "threshold": threshold, "psnr_db": metrics["psnr_db"]},
        description=f"{kept:.3f} of object pixels keep their colour (threshold {threshold})",
    )
