"""Asset `diffusion_model`: the text-to-image model trained on the mixed-caption blend.

Training runs as its own process (`python -m models.diffusion.train`) started through
Dagster Pipes by the `launcher` resource (a local subprocess by default; a container or
a Kubernetes pod with a GPU for users with a cluster), in the concurrency pool `gpu`. The
process streams its progress into the run's logs and reports its final metadata; this
asset then versions the output with DVC and registers the model in MLflow with the alias
`challenger`, tagged with the data versions it was trained on."""

import json
import subprocess
from dataclasses import asdict

import dagster as dg
import mlflow
from PIL import Image

from assets.metadata import flatten, preview_metadata
from assets.reuse import build_or_reuse
from assets.text_encoder import probe_metadata
from models.diffusion.train import DiffusionTrainConfig
from models.registry.model_registry import register_text_to_image

STAGE = "diffusion_model"
REGISTERED_NAME = "recapflow-text-to-image"


def code_version(root) -> str:
    """The git commit of the code (with `-dirty` for local changes), or `unknown`."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def curve_table(curve: list[dict]) -> str:
    """Markdown: colour following (chance 0.125) and images without an object, by step."""
    lines = ["| step | colour following | no object |", "|---:|---:|---:|"]
    lines += [
        f"| {c['step']} | {c['colour_following']:.3f} | {c['no_object']:.3f} |" for c in curve
    ]
    return "\n".join(lines)


def training_config(project, mlflow_res, sampler, out, **settings) -> dict:
    """The `models.diffusion.train` config of a run: params.yaml's section, the
    lineage's inputs, MLflow, then `settings` (the ablation's per-variant changes).
    `checked_training_config` types and checks it."""
    return {
        **project.params(STAGE),
        "raw": str(project.data_path("raw")),
        "sampler": str(sampler),
        "autoencoder": str(project.data_path("autoencoder")),
        "captioner": str(project.data_path("captioner")),
        "text_encoder_dir": str(project.data_path("text_encoder")),
        "out": str(out),
        "mlflow_tracking_uri": mlflow_res.tracking_uri,
        "mlflow_experiment": mlflow_res.experiment,
        **settings,
    }


def checked_training_config(config: dict) -> dict:
    """`config` built as the training process builds it, so a typo or a wrong type in
    params.yaml's `diffusion_model` section fails here, with its dotted key, before a
    process is launched; returns the typed config as the Pipes extra (plain JSON)."""
    return asdict(DiffusionTrainConfig.from_dict(config))


@dg.asset(
    name=STAGE,
    deps=["mixed_sampler", "autoencoder", "captioner", "text_encoder"],
    group_name="training",
    kinds={"pytorch", "mlflow", "dvc"},
    pool="gpu",
    required_resource_keys={"project", "dvc", "mlflow", "launcher"},
    description=__doc__,
)
def diffusion_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, mlflow_res = context.resources.project, context.resources.mlflow
    # A configuration that cannot train fails here, reused or not, before any launch.
    config = checked_training_config(
        training_config(
            project, mlflow_res, project.data_path("mixed_sampler"), project.data_path(STAGE)
        )
    )
    return build_or_reuse(context, STAGE, lambda: _build_diffusion_model(context, config))


def _build_diffusion_model(context: dg.AssetExecutionContext, config: dict) -> dg.MaterializeResult:
    project, dvc, mlflow_res, launcher = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
        context.resources.launcher,
    )
    data_versions = {
        "recaptioned_dataset": dvc.out_hashes("recaptioned_dataset")["data/recaptioned"],
        "mixed_sampler": dvc.out_hashes("mixed_sampler")["data/mixed_sampler"],
        "autoencoder": dvc.out_hashes("autoencoder")["data/autoencoder"],
        "captioner": dvc.out_hashes("captioner")["data/captioner"],
        "text_encoder": dvc.out_hashes("text_encoder")["data/text_encoder"],
    }
    invocation = launcher.run(
        context, "models.diffusion.train", extras={"config": config}, cwd=str(project.path)
    )
    reported = invocation.get_materialize_result()
    run_id = reported.metadata["mlflow_run_id"].value
    out = project.data_path(STAGE)
    dvc_hash = dvc.commit(STAGE)["data/diffusion_model"]
    tags = {
        "dagster_run_id": context.run.run_id,
        "code_version": code_version(project.path),
        "dvc.diffusion_model": dvc_hash,
        **{f"dvc.{k}": v for k, v in data_versions.items()},
    }
    with mlflow_res.start_run(STAGE, run_id=run_id) as run:
        # A resumed training continues its MLflow run, whose params are immutable: params
        # it already has keep their first value; a later one (new code) becomes a tag.
        logged = mlflow.get_run(run_id).data.params
        params = flatten({"data": data_versions, "code_version": tags["code_version"]})
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        changed = {f"resumed_with.{k}": v for k, v in params.items() if logged.get(k, v) != v}
        if changed:
            mlflow.set_tags(changed)
        mlflow.set_tags({k: v for k, v in tags.items() if k.startswith(("dagster", "dvc."))})
        run_meta = mlflow_res.run_metadata(run)
    registered = register_text_to_image(
        mlflow_res.tracking_uri, run_id, out, REGISTERED_NAME, "challenger", tags
    )
    grid = Image.open(out / "validation_grid.png")
    metrics = json.loads((out / "metrics.json").read_text())
    return dg.MaterializeResult(
        metadata={
            **reported.metadata,
            "path": dg.MetadataValue.path(str(out)),
            "dvc_md5": dvc_hash,
            "data_versions": dg.MetadataValue.json(data_versions),
            "registered_model": dg.MetadataValue.json(registered),
            "validation_grid": preview_metadata(grid, "EMA samples of single-object prompts"),
            "colour_following_curve": dg.MetadataValue.md(curve_table(metrics["curve"])),
            "train_seconds_by_part": dg.MetadataValue.json(metrics["seconds"]),
            **probe_metadata(metrics.get("text_probes")),
            **run_meta,
        },
        data_version=dg.DataVersion(dvc_hash),
    )
