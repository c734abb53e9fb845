"""Asset `recaptioned_dataset`: every image of the raw corpus with its alt-text and the
captioner's short and descriptive captions, one parquet per raw shard (a partition), so
a new shard is recaptioned alone and a partition range runs as one resumable run."""

import dagster as dg
import pandas as pd

from assets.metadata import file_md5, md_escape
from assets.partitions import raw_shards
from assets.reuse import build_or_reuse
from models.captioning.recaption import (
    SCHEMA,
    RecaptionConfig,
    make_backend,
    recaption,
    shard_rejections,
    worker_pool,
)

STAGE = "recaptioned_dataset"


def _samples_table(df: pd.DataFrame, n: int = 6) -> str:
    """Markdown: alt-text next to the synthetic captions, text escaped for Markdown."""

    esc = md_escape
    lines = ["| key | alt_text | short_caption | descriptive_caption |", "|---|---|---|---|"]
    for r in df.head(n).itertuples():
        cells = [r.key, esc(r.alt_text), esc(r.short_caption), esc(r.descriptive_caption)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dg.asset(
    name=STAGE,
    deps=["raw_alt_text_dataset", "captioner"],
    partitions_def=raw_shards,
    # Partition runs may go side by side: each writes only its shards' files (temp + rename,
    # the temp named by its writer) and DVC's commit waits for its lock. How many at once
    # is this pool's limit (1 by default: on one CPU machine they would share its cores).
    pool="recaption",
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="captioning",
    kinds={"pytorch", "parquet", "dvc"},
    required_resource_keys={"project", "dvc"},
    description=__doc__,
)
def recaptioned_dataset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    # Shards already captioned by this captioner are skipped inside; the step is only timed.
    return build_or_reuse(context, STAGE, lambda: _build(context), reuse=False)


def _build(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    project, dvc = context.resources.project, context.resources.dvc
    cfg = RecaptionConfig.from_dict(project.params(STAGE))
    out = project.data_path("recaptioned")
    captioner = project.data_path("captioner")
    backend = make_backend(cfg, captioner)
    shards = list(context.partition_keys)
    with worker_pool(cfg, captioner) as pool:
        status = recaption(backend, project.data_path("raw"), out, shards, cfg.batch_size, pool)
    dvc_hash = dvc.commit(STAGE)["data/recaptioned"]
    written = [s for s in shards if status[s] != "no_raw_images"]
    empty = sorted(set(shards) - set(written))
    if empty:
        context.log.warning(f"raw shards without images, nothing to caption: {empty}")
    frames = [pd.read_parquet(out / f"{s}.parquet") for s in written]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCHEMA.names)
    # One partition: its file's md5 (what DVC records for it); a range: the folder's hash.
    version = file_md5(out / f"{written[0]}.parquet") if len(shards) == 1 and written else dvc_hash
    rejected = {k: r for s in written for k, r in shard_rejections(out / f"{s}.parquet").items()}
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "dvc_md5": dvc_hash,
            "dagster/row_count": len(df),
            "shards_captioned": sum(v == "captioned" for v in status.values()),
            "shards_skipped_current": sum(v == "skipped" for v in status.values()),
            "shards_without_raw_images": dg.MetadataValue.json(empty),
            "rejected_images": len(rejected),
            "rejected_examples": dg.MetadataValue.json(dict(list(rejected.items())[:10])),
            "captioner_id": backend.id,
            "captioner_version": backend.version,
            "generation_config": dg.MetadataValue.json(backend.generation_config()),
            "samples": dg.MetadataValue.md(_samples_table(df)),
            "mean_words": dg.MetadataValue.json(
                {
                    c: float(df[c].str.split().str.len().mean())
                    for c in ("alt_text", "short_caption", "descriptive_caption")
                }
            ),
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset_check(asset=STAGE, required_resource_keys={"project"})
def recaptioned_keys_match_raw(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Every raw image of a recaptioned shard has exactly one row or one recorded
    rejection: no duplicate, no hole."""
    project = context.resources.project
    index = pd.read_parquet(project.data_path("raw", "index.parquet"), columns=["key", "shard"])
    out = project.data_path("recaptioned")
    problems, n_rows = [], 0
    for path in sorted(out.glob("*.parquet")):
        rows = pd.read_parquet(path, columns=["key"])["key"]
        n_rows += len(rows)
        rejected = set(shard_rejections(path))
        expected = set(index.loc[index["shard"] == path.stem, "key"]) - rejected
        if not rows.is_unique:
            problems.append(f"{path.name}: {len(rows) - rows.nunique()} duplicate keys")
        if set(rows) != expected:
            problems.append(
                f"{path.name}: {len(expected - set(rows))} missing, "
                f"{len(set(rows) - expected)} unknown keys"
            )
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "every raw key of each shard appears exactly once",
        metadata={"rows": n_rows, "problems": dg.MetadataValue.json(problems)},
    )
