"""Print where a `make run` left its results and how to open the UIs.

`--partition-range` prints the first...last raw shard partition instead (for
`dagster asset materialize --partition-range`); `--register-partitions` first adds the
shards that the configured source and the landing folder define now; `--retrain-tags`
prints the run tags of a `retrain` over every shard (`dagster job execute --tags`);
`--since T` adds the wall time of each step materialized after the Unix time T, built or
reused (assets/reuse.py), as `make run` ends."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipelines.resources.project import default_project_dir


def partition_range(register: bool = False) -> str:
    import dagster as dg

    from assets.partitions import raw_shards

    instance = dg.DagsterInstance.get()
    if register:
        from assets.raw_alt_text_dataset import register_shards
        from pipelines.resources.project import ProjectResource

        register_shards(instance, ProjectResource(root=default_project_dir()))
    keys = instance.get_dynamic_partitions(raw_shards.name)
    if not keys:
        raise SystemExit("no raw shard partitions yet: materialize raw_alt_text_dataset first")
    return f"{keys[0]}...{keys[-1]}"


LINEAGE = (
    "raw_alt_text_dataset",
    "captioner",
    "recaptioned_dataset",
    "world_judge",
    "reference_clip",
    "autoencoder",
    "mixed_sampler",
    "text_encoder",
    "diffusion_model",
    "prompt_expander",
    "feedback_pool",
    "preference_model",
    "rich_feedback_model",
    "eval_report",
)


def step_times(instance, since: float) -> list[tuple[str, float, str]]:
    """(asset, wall seconds, how) for each lineage step materialized after `since`, and
    (asset, 0, "current, not run") for one materialized only before (`make run` launched
    no run for it: pipelines/stale.py). A partitioned step writes one materialization per
    partition with the same metadata: one per run is counted."""
    import dagster as dg

    rows = []
    for name in LINEAGE:
        key = dg.AssetKey(name)
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_timestamp=since), limit=10_000
        ).records
        if not records and instance.get_latest_materialization_event(key) is not None:
            rows.append((name, 0.0, "current, not run"))
            continue
        per_run: dict[str, tuple[float, bool]] = {}
        for r in records:
            meta = r.asset_materialization.metadata
            if "wall_seconds" in meta:
                per_run[r.run_id] = (meta["wall_seconds"].value, meta["reused"].value)
        if per_run:
            seconds = sum(s for s, _ in per_run.values())
            how = "reused" if all(u for _, u in per_run.values()) else "built"
            rows.append((name, seconds, how))
    return rows


def step_table(rows: list[tuple[str, float, str]], wall: float) -> str:
    lines = [
        "",
        "step times of this run",
        f"  {'step':<22} {'wall':>9}  built, reused or current",
        "  " + "-" * 48,
    ]
    lines += [f"  {name:<22} {_clock(s):>9}  {how}" for name, s, how in rows]
    lines.append(f"  {'(all, start to end)':<22} {_clock(wall):>9}")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s"


def _json(path: Path) -> dict | None:
    """A stage's JSON output, or None when the stage has not written it yet."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def summary(root: Path) -> str:
    tracking = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    lines = ["", "recapflow: lineage materialized"]
    manifest = root / "data" / "raw" / "manifest.json"
    if raw := _json(manifest):
        counts = raw["counts"]
        lines.append(
            f"  raw alt-text dataset  {manifest.parent}"
            f"  ({counts['kept']} kept, {counts['rejected']} rejected)"
        )
    metrics = root / "data" / "captioner" / "metrics.json"
    if captioner := _json(metrics):
        q = captioner["quality"]
        dsc, alt = q["descriptive_caption"], q["alt_text"]
        lines.append(
            f"  captioner             {metrics.parent}  (held-out DSC object/colour recall "
            f"{dsc['object']['recall']:.3f}/{dsc['colour']['recall']:.3f} vs alt-text "
            f"{alt['object']['recall']:.3f}/{alt['colour']['recall']:.3f}; DSC hallucination "
            f"{dsc['overall']['hallucination_rate']:.3f})"
        )
    recaptioned = root / "data" / "recaptioned"
    if recaptioned.exists():
        n = len(list(recaptioned.glob("*.parquet")))
        lines.append(f"  recaptioned dataset   {recaptioned}  ({n} shards)")
    sampler = root / "data" / "mixed_sampler" / "sampler.json"
    if info := _json(sampler):
        ratio = sum(e["synthetic_ratio"] for e in info["epochs"]) / len(info["epochs"])
        lines.append(
            f"  mixed sampler         {sampler.parent}  ({info['config']['caption_kind']}, "
            f"ratio {info['config']['synthetic_ratio']} configured, {ratio:.4f} realized)"
        )
    model = root / "data" / "diffusion_model" / "metrics.json"
    if m := _json(model):
        lines.append(
            f"  diffusion model       {model.parent}  ({m['steps']} steps; single-object colour "
            f"following {m['colour_following']:.3f} vs chance {m['colour_following_chance']:.3f}; "
            f"validation grid {model.parent / 'validation_grid.png'})"
        )
        lines.append(
            "  registered model      models:/recapflow-text-to-image@challenger (MLflow registry)"
        )
    judge = root / "data" / "world_judge" / "metrics.json"
    if judged := _json(judge):
        acc = judged["accuracy"]
        lines.append(
            f"  world judge           {judge.parent}  (held-out accuracy, lowest kind "
            f"{min(acc.values()):.3f})"
        )
    report = root / "data" / "eval_report" / "metrics.json"
    if m := _json(report):
        scores = ", ".join(
            f"{form} prompts {f['prompt_following']['overall']:.3f} (CLIP score "
            f"{f['clip_score']:.1f})"
            for form, f in m["forms"].items()
        )
        gate = report.parent / "gate.json"
        promoted = bool((_json(gate) or {}).get("promote"))
        lines.append(f"  eval report           {report.parent / 'index.html'}")
        lines.append(f"                        prompt following: {scores}")
        lines.append(
            "                        gate: "
            + ("promoted to champion" if promoted else f"not promoted (see {gate})")
        )
    expander = root / "data" / "prompt_expander" / "metrics.json"
    if expanded := _json(expander):
        suite = expanded["suite_short"]
        lines.append(
            f"  prompt expander       {expander.parent}  (suite short prompts: "
            f"{suite['unfaithful']:.3f} of expansions drop or contradict a claim as sampled)"
        )
    preference = root / "data" / "preference_model" / "metrics.json"
    if pm := _json(preference):
        test = pm["preference_model"]["test"]
        base = pm["clip_score_baseline"]["test"]["agreement"]
        lines.append(
            f"  preference model      {preference.parent}  (agrees with annotators on "
            f"{test['agreement']:.3f} of held-out pairs; ceiling {test['ceiling']:.3f}, "
            f"CLIP score {base:.3f})"
        )
    lines += [
        '  draw prompts          make generate PROMPT="a red star" EXPAND=4  -> generated/grid.png',
        f"  Dagster UI            make ui      -> http://127.0.0.1:3000  ({root}/.dagster_home)",
        f"  MLflow UI             make mlflow  -> http://127.0.0.1:5000  ({tracking})",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partition-range", action="store_true")
    ap.add_argument("--register-partitions", action="store_true")
    ap.add_argument("--retrain-tags", action="store_true")
    ap.add_argument("--since", type=float, default=None)
    args = ap.parse_args()
    if args.retrain_tags:
        import dagster as dg

        from pipelines.retraining import retrain_tags

        tags = retrain_tags(dg.DagsterInstance.get())
        if tags is None:
            raise SystemExit("no raw shard partitions yet: run `make run` first")
        print(json.dumps(tags))
    elif args.partition_range or args.register_partitions:
        print(partition_range(register=args.register_partitions))
    else:
        print(summary(Path(default_project_dir())))
        if args.since is not None:
            import time

            import dagster as dg

            rows = step_times(dg.DagsterInstance.get(), args.since)
            print(step_table(rows, time.time() - args.since))


if __name__ == "__main__":
    main()
