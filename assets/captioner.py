"""Asset `captioner`: the report's image captioner (CLIP image embedding -> causal LM),
pretrained on alt-text then fine-tuned to short (SSC) and descriptive (DSC) captions, with
its caption quality measured exactly on the held-out split."""

import json
import math
from dataclasses import asdict

import dagster as dg
import mlflow
import pandas as pd
from PIL import Image

from assets.metadata import flatten, preview_metadata
from assets.reuse import build_or_reuse
from corpus.caption_metrics import quality_table_markdown
from corpus.preview import caption_grid
from models.captioning.train import CaptionerTrainConfig, train_captioner
from models.common.data import load_images

STAGE = "captioner"
# The report's claim, as a gate: descriptive captions state more of what is in the image.
GATED_KINDS = ("object", "colour")


@dg.asset(
    name=STAGE,
    deps=["raw_alt_text_dataset"],
    group_name="captioning",
    kinds={"pytorch", "mlflow", "dvc"},
    required_resource_keys={"project", "dvc", "mlflow"},
    description=__doc__,
)
def captioner(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return build_or_reuse(context, STAGE, lambda: _build_captioner(context))


def _build_captioner(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, dvc, mlflow_res = (
        context.resources.project,
        context.resources.dvc,
        context.resources.mlflow,
    )
    cfg = CaptionerTrainConfig.from_dict(project.params(STAGE))
    raw, out = project.data_path("raw"), project.data_path("captioner")
    with mlflow_res.start_run(
        STAGE, tags={"dagster_run_id": context.run.run_id, "asset": STAGE}
    ) as run:
        mlflow.log_params(flatten(asdict(cfg)))
        report = train_captioner(cfg, raw, out, run.info.run_id, mlflow_res.tracking_uri)
        quality = report["quality"]
        mlflow.log_metrics(quality_metrics(quality))
        table = quality_table_markdown(quality)
        mlflow.log_text(table, "caption_quality.md")
        mlflow.log_dict(report["samples"], "sample_captions.json")
        grid = _samples_grid(raw, report["samples"])
        mlflow.log_image(grid, "sample_captions.png")
        run_meta = mlflow_res.run_metadata(run)
    dvc_hash = dvc.commit(STAGE)["data/captioner"]
    dsc, alt = quality["descriptive_caption"], quality["alt_text"]
    metadata = {
        "path": dg.MetadataValue.path(str(out)),
        "dvc_md5": dvc_hash,
        "caption_quality": dg.MetadataValue.md(table),
        "dsc_object_recall": dsc["object"]["recall"],
        "dsc_colour_recall": dsc["colour"]["recall"],
        "dsc_hallucination_rate": dsc["overall"]["hallucination_rate"],
        "alt_text_object_recall": alt["object"]["recall"],
        "train_seconds": dg.MetadataValue.json(report["seconds"]),
        "sample_captions": preview_metadata(grid, "held-out images with SSC and DSC captions"),
        **run_meta,
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(dvc_hash))


def quality_metrics(quality: dict) -> dict[str, float]:
    """Flat MLflow metric names: quality.<caption set>.<kind>.<precision|recall>."""
    out = {}
    for name, kinds in quality.items():
        for kind, vals in kinds.items():
            for stat, v in vals.items():
                if isinstance(v, float | int) and not math.isnan(v):
                    out[f"quality.{name}.{kind}.{stat}"] = float(v)
    return out


def _samples_grid(raw, samples: dict) -> Image.Image:
    """Held-out images, each with its alt-text, SSC and DSC caption."""
    index = pd.read_parquet(raw / "index.parquet").set_index("key")
    keys = samples["key"][:8]
    images = load_images(raw, keys, list(index.loc[keys, "shard"]), int(index["width"].max()))
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    texts = [
        f"ALT: {a or '(empty)'} | SSC: {s} | DSC: {d}"
        for a, s, d in zip(
            samples["alt_text"],
            samples["short_caption"],
            samples["descriptive_caption"],
            strict=False,
        )
    ]
    return caption_grid(pil, texts[: len(pil)], cols=4, tile=224, lines=12)


@dg.asset_check(asset=STAGE, required_resource_keys={"project"})
def captions_better_than_alt_text(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """DSC recall of objects and colours on held-out images must exceed alt-text's."""
    metrics = json.loads(
        context.resources.project.data_path("captioner", "metrics.json").read_text()
    )
    q = metrics["quality"]
    rows, passed = {}, True
    for kind in GATED_KINDS:
        dsc, alt = q["descriptive_caption"][kind]["recall"], q["alt_text"][kind]["recall"]
        rows[f"{kind}_recall_dsc"], rows[f"{kind}_recall_alt_text"] = dsc, alt
        passed &= bool(dsc > alt)
    rows["dsc_hallucination_rate"] = q["descriptive_caption"]["overall"]["hallucination_rate"]
    return dg.AssetCheckResult(
        passed=passed,
        metadata=rows,
        description="DSC recall above alt-text recall for " + ", ".join(GATED_KINDS)
        if passed
        else "descriptive captions do not state more objects/colours than alt-text",
    )
