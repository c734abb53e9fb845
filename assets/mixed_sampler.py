"""Asset `mixed_sampler`: the fixed blend of synthetic captions and alt-text that the
diffusion model trains on (the DALL-E 3 report's 95%), recorded epoch by epoch.

Its parameters are params.yaml's `mixed_sampler` section, which DVC records: a run config
may repeat a value and is refused if it changes one (assets/run_config.py; change
params.yaml or run `dvc exp run -S mixed_sampler.synthetic_ratio=0.5`). A bad ratio, an
unknown caption kind or a sample without the requested synthetic caption fails here,
before any training starts."""

import dagster as dg
import pandas as pd

from assets.metadata import count_table
from assets.reuse import build_or_reuse
from assets.run_config import stage_config
from corpus.caption_mix import MixConfig, build_mixed_sampler, read_manifest

STAGE = "mixed_sampler"


class MixedSamplerConfig(dg.Config):
    """Unset fields take their value from params.yaml; a set one must equal it (DVC
    records params.yaml's: `dvc exp run -S mixed_sampler.<field>=<value>` changes one)."""

    synthetic_ratio: float | None = None
    caption_kind: str | None = None
    seed: int | None = None
    caption_dropout: float | None = None
    epochs: int | None = None


def _esc(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _ratio_table(summary: dict) -> str:
    lines = [
        "| epoch | synthetic | alt_text | dropped | realized synthetic ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for e in summary["epochs"]:
        lines.append(
            f"| {e['epoch']} | {e['synthetic']} | {e['alt_text']} | {e['dropped']} "
            f"| {e['synthetic_ratio']:.4f} |"
        )
    return "\n".join(lines)


@dg.asset(
    name=STAGE,
    deps=["recaptioned_dataset"],
    group_name="training",
    kinds={"parquet", "dvc"},
    required_resource_keys={"project", "dvc"},
    description=__doc__,
)
def mixed_sampler(
    context: dg.AssetExecutionContext, config: MixedSamplerConfig
) -> dg.MaterializeResult:
    # A run config that changes a recorded parameter is refused before anything is reused.
    cfg = stage_config(context.resources.project, STAGE, config, MixConfig.from_dict)
    return build_or_reuse(context, STAGE, lambda: _build_mixed_sampler(context, cfg))


def _build_mixed_sampler(context: dg.AssetExecutionContext, cfg: MixConfig) -> dg.MaterializeResult:
    project, dvc = context.resources.project, context.resources.dvc
    out = project.data_path(STAGE)
    summary = build_mixed_sampler(project.data_path("recaptioned"), out, cfg)
    dvc_hash = dvc.commit(STAGE)["data/mixed_sampler"]
    first = read_manifest(out, 0)
    examples = first.groupby("source").head(3).sort_values("source")
    sample_lines = ["| key | source | caption (epoch 0) |", "|---|---|---|"]
    sample_lines += [f"| {r.key} | {r.source} | {_esc(r.caption)} |" for r in examples.itertuples()]
    realized = pd.DataFrame(summary["epochs"])
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dvc_md5": dvc_hash,
            "config": dg.MetadataValue.json(summary["config"]),
            "samples": summary["samples"],
            "realized_synthetic_ratio": float(realized["synthetic_ratio"].mean()),
            "realized_dropout": float(realized["dropout"].mean()),
            "per_epoch": dg.MetadataValue.md(_ratio_table(summary)),
            "epoch_0_sources": count_table(first["source"].value_counts().to_dict(), "source"),
            "examples": dg.MetadataValue.md("\n".join(sample_lines)),
        },
        data_version=dg.DataVersion(dvc_hash),
    )
