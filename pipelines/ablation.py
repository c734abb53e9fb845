"""Job `caption_ablation`: the report's caption experiments, same steps and seeds.

Variants (the report's Figures 4 and 5): alt-text only, 95% short, 95% descriptive, then
65%, 80% and 90% descriptive. Each variant records its own caption blend from the
materialized `recaptioned_dataset`, trains a diffusion model through the `launcher`
(in the `gpu` pool, one at a time) with the `diffusion_model` settings of params.yaml
except the ones the job sets, and is scored by the same `eval_report` code against the
materialized `world_judge` and `reference_clip`. Every variant is an MLflow child run
under one parent run; the comparison (table, curves) goes to the parent and to
`data/ablation/summary.{json,md}` and `curves.png`.

    make ablation                       # the reduced CPU version (AblationConfig defaults)
"""

import json
import time

import dagster as dg
import mlflow
from mlflow import MlflowClient

from assets.diffusion_model import checked_training_config, training_config
from assets.eval_report import eval_params
from corpus.atomic import write_text_atomic
from corpus.caption_mix import MixConfig, build_mixed_sampler
from models.evaluation.ablation_report import ablation_table, plot_curves
from models.evaluation.report import EvalReportConfig, evaluate_model

# name -> (synthetic_ratio, caption_kind); alt-text only is ratio 0 of either kind.
VARIANTS: dict[str, tuple[float, str]] = {
    "alt_text": (0.0, "descriptive"),
    "short_95": (0.95, "short"),
    "descriptive_95": (0.95, "descriptive"),
    "descriptive_65": (0.65, "descriptive"),
    "descriptive_80": (0.80, "descriptive"),
    "descriptive_90": (0.90, "descriptive"),
}


def parse_variant(name: str) -> tuple[float, str]:
    """A named variant, or any blend as `<caption_kind>@<synthetic_ratio>` (a sweep:
    e.g. ["short@0.5", "descriptive@0.5", "short@0.8", "descriptive@0.8"])."""
    if name in VARIANTS:
        return VARIANTS[name]
    kind, _, ratio = name.partition("@")
    try:
        value = float(ratio)
    except ValueError:
        value = -1.0
    if kind not in ("short", "descriptive") or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"unknown ablation variant {name!r}: use one of {list(VARIANTS)} or "
            "'<short|descriptive>@<ratio in [0, 1]>'"
        )
    return value, kind


class AblationConfig(dg.Config):
    # dg.Config is a pydantic model: it copies mutable defaults per instance.
    variants: list[str] = list(VARIANTS)  # noqa: RUF012
    max_steps: int = 600
    eval_every: int = 200
    eval_prompts: int = 64  # colour prompts per point of the training curve
    prompts_per_category: int = 8  # of the suite, for each variant's final eval
    images_per_prompt: int = 2
    seed: int = 0
    # More diffusion_model settings for every variant (e.g. unet).
    overrides: dict = {}  # noqa: RUF012


@dg.op(out=dg.DynamicOut(dict), required_resource_keys={"project", "mlflow"})
def ablation_variants(context: dg.OpExecutionContext, config: AblationConfig):
    """Open the parent MLflow run and fan out one step per variant."""
    if not config.variants:
        raise ValueError(f"caption_ablation needs at least one variant, e.g. {list(VARIANTS)}")
    for name in config.variants:
        parse_variant(name)  # every name is checked before anything trains
    project, mlflow_res = context.resources.project, context.resources.mlflow
    # ... and the training config (params.yaml's diffusion_model with the job's overrides)
    root = project.data_path("ablation")
    checked_training_config(
        training_config(project, mlflow_res, root, root, **config.overrides, seed=config.seed)
    )
    mlflow.set_tracking_uri(mlflow_res.tracking_uri)
    exp = mlflow.set_experiment(mlflow_res.experiment)
    client = MlflowClient(mlflow_res.tracking_uri)
    # RUNNING until compare_variants ends it (FAILED as soon as a variant fails).
    parent = client.create_run(
        exp.experiment_id, run_name="caption_ablation", tags={"dagster_run_id": context.run_id}
    ).info.run_id
    for k, v in config.model_dump().items():
        client.log_param(parent, k, json.dumps(v) if isinstance(v, dict | list) else v)
    context.log.info(f"parent MLflow run {parent}")
    for name in config.variants:
        yield dg.DynamicOutput(
            {"name": name, "parent_run_id": parent, "config": config.model_dump()},
            mapping_key=name.replace("@", "_").replace(".", "_"),
        )


@dg.op(pool="gpu", required_resource_keys={"project", "mlflow", "launcher"})
def train_and_evaluate_variant(context: dg.OpExecutionContext, variant: dict) -> dict:
    project, mlflow_res = context.resources.project, context.resources.mlflow
    name, cfg = variant["name"], variant["config"]
    ratio, kind = parse_variant(name)
    root = project.data_path("ablation", name)
    t0 = time.time()
    mix = MixConfig.from_dict(
        {**project.params("mixed_sampler"), "synthetic_ratio": ratio, "caption_kind": kind}
    )
    sampler = build_mixed_sampler(project.data_path("recaptioned"), root / "sampler", mix)
    client = MlflowClient(mlflow_res.tracking_uri)
    exp = client.get_experiment_by_name(mlflow_res.experiment)
    child = client.create_run(
        exp.experiment_id,
        run_name=f"ablation/{name}",
        tags={"mlflow.parentRunId": variant["parent_run_id"], "ablation.variant": name},
    )
    client.log_param(child.info.run_id, "ablation.synthetic_ratio", ratio)
    client.log_param(child.info.run_id, "ablation.caption_kind", kind)
    train = training_config(
        project,
        mlflow_res,
        root / "sampler",
        root / "model",
        **cfg["overrides"],
        work=str(root / "work"),
        seed=cfg["seed"],
        mlflow_run_id=child.info.run_id,
    )
    train["diffusion"] = {**train.get("diffusion", {}), "max_steps": cfg["max_steps"]}
    train["eval"] = {
        **train.get("eval", {}),
        "every": cfg["eval_every"],
        "prompts": cfg["eval_prompts"],
        "final_prompts": cfg["eval_prompts"],
        "reference_clip": str(project.data_path("reference_clip")),
    }
    evaluation_cfg = EvalReportConfig.from_dict(
        {
            **eval_params(project),
            "model": str(root / "model"),
            "judge": str(project.data_path("world_judge")),
            "reference_clip": str(project.data_path("reference_clip")),
            "out": str(root / "eval"),
            "prompts_per_category": cfg["prompts_per_category"],
            "images_per_prompt": cfg["images_per_prompt"],
            "seed": cfg["seed"],
            "mlflow_tracking_uri": mlflow_res.tracking_uri,
            "mlflow_run_id": child.info.run_id,
        }
    )
    try:
        train = checked_training_config(train)
        context.resources.launcher.run(
            context, "models.diffusion.train", extras={"config": train}, cwd=str(project.path)
        )
        t_train = time.time() - t0
        evaluation = evaluate_model(evaluation_cfg)
    except BaseException:
        client.set_terminated(child.info.run_id, status="FAILED")
        client.set_terminated(variant["parent_run_id"], status="FAILED")
        raise
    model = json.loads((root / "model" / "metrics.json").read_text())
    result = {
        "name": name,
        "synthetic_ratio": ratio,
        "caption_kind": kind,
        "realized_ratio": sampler["epochs"][0]["synthetic_ratio"],
        "steps": model["steps"],
        "curve": model["curve"],
        "forms": {
            f: {
                "overall": m["prompt_following"]["overall"],
                "ci": m["prompt_following_ci"],
                "colour": m["prompt_following"].get("colour"),
                "clip_score": m["clip_score"],
            }
            for f, m in evaluation["forms"].items()
        },
        "colour_following": model["colour_following"],
        "run_id": child.info.run_id,
        "parent_run_id": variant["parent_run_id"],
        "seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1)},
    }
    client.set_terminated(child.info.run_id)
    context.log.info(json.dumps({k: result[k] for k in ("name", "forms", "seconds")}))
    return result


@dg.op(required_resource_keys={"project", "mlflow"})
def compare_variants(context: dg.OpExecutionContext, results: list[dict]) -> dict:
    project, mlflow_res = context.resources.project, context.resources.mlflow
    out = project.data_path("ablation")
    order = {n: i for i, n in enumerate(VARIANTS)}
    results = sorted(results, key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    table = ablation_table(results)
    write_text_atomic(out / "summary.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "summary.md", table + "\n")
    plot_curves(results, out / "curves.png")
    client = MlflowClient(mlflow_res.tracking_uri)
    parent_id = results[0]["parent_run_id"]
    for r in results:
        for form, m in r["forms"].items():
            client.log_metric(parent_id, f"{r['name']}/{form}/overall", m["overall"])
    client.log_artifact(parent_id, str(out / "summary.md"))
    client.log_artifact(parent_id, str(out / "curves.png"))
    client.set_terminated(parent_id)
    context.add_output_metadata(
        {"table": dg.MetadataValue.md(table), "summary": dg.MetadataValue.path(str(out))}
    )
    return {"parent_run_id": parent_id, "variants": len(results)}


@dg.job(description=__doc__)
def caption_ablation():
    compare_variants(ablation_variants().map(train_and_evaluate_variant).collect())
