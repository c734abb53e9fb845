"""Asset `text_encoder`: the diffusion model's text encoder, its own step so that a change
to the UNet, the layout model or the diffusion settings reuses it (tiny: a CLIP text
tower pretrained contrastively on the sampler's captions; full: the pretrained encoder
that `diffusion_model.text_encoder.pretrained` names, probed only). Its metadata is the
linear probes of what its states carry (models/diffusion/text_probes.py)."""

from dataclasses import asdict

import dagster as dg
import mlflow
from lightning.pytorch.loggers import MLFlowLogger

from assets.metadata import flatten
from assets.reuse import build_or_reuse
from models.common.data import load_images
from models.diffusion.text_tower import (
    build_text_encoder,
    probe_metrics,
    sampler_captions,
    tower_settings,
)
from models.diffusion.train import DiffusionTrainConfig

STAGE = "text_encoder"


def probe_metadata(probes: dict | None) -> dict:
    """The text encoder's linear probes as one table: kinds by read-out place."""
    if not probes:
        return {}
    places = {"pooled": probes["pooled"], **probes["tokens"]}
    kinds = list(dict.fromkeys(k for acc in places.values() for k in acc))
    lines = ["| kind | " + " | ".join(places) + " |", "|---|" + "---:|" * len(places)]
    lines += [
        f"| {k} | "
        + " | ".join(f"{acc[k]:.3f}" if acc.get(k) is not None else "" for acc in places.values())
        + " |"
        for k in kinds
    ]
    return {"text_encoder_probes": dg.MetadataValue.md("\n".join(lines))}


@dg.asset(
    name=STAGE,
    deps=["raw_alt_text_dataset", "mixed_sampler", "captioner"],
    group_name="training",
    kinds={"pytorch", "mlflow", "dvc"},
    required_resource_keys={"project", "dvc", "mlflow"},
    description=__doc__,
)
def text_encoder(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return build_or_reuse(context, STAGE, lambda: _build_text_encoder(context))


def _build_text_encoder(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    # The whole section checked as the training checks it, before anything is trained.
    section = project.params("diffusion_model")
    DiffusionTrainConfig.from_dict({**section, "captioner": str(project.data_path("captioner"))})
    tcfg, seed, probes = tower_settings(section)
    resolution = project.params("autoencoder")["resolution"]
    raw, out = project.data_path("raw"), project.data_path(STAGE)
    keys, shards, texts = sampler_captions(project.data_path("mixed_sampler"))
    with mlflow_res.start_run(STAGE, tags={"dagster_run_id": context.run.run_id}) as run:
        mlflow.log_params(flatten({"text_encoder": asdict(tcfg), "seed": seed}))
        logger = MLFlowLogger(
            tracking_uri=mlflow_res.tracking_uri,
            experiment_name=mlflow_res.experiment,
            run_id=run.info.run_id,
        )
        record = build_text_encoder(
            tcfg,
            out,
            texts,
            lambda: load_images(raw, keys, shards, resolution),
            seed=seed,
            captioner=project.data_path("captioner"),
            probes=probes,
            logger=logger,
            info=context.log.info,
        )
        mlflow.log_metrics(probe_metrics(record["probes"]))
        run_meta = mlflow_res.run_metadata(run)
    dvc_hash = dvc.commit(STAGE)["data/text_encoder"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dvc_md5": dvc_hash,
            "tag": record["tag"],
            "pretrained": record["pretrained"] or "(tiny: pretrained here)",
            "pretraining": dg.MetadataValue.json(record["pretraining"] or {}),
            "seconds": dg.MetadataValue.json(record["seconds"]),
            **probe_metadata(record["probes"]),
            **run_meta,
        },
        data_version=dg.DataVersion(dvc_hash),
    )
