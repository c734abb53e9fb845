"""Job `caption_ablation`: the report's caption experiments (its Figures 4 and 5).

Variants: alt-text only, 95% short and 95% descriptive synthetic captions (3 seeds
each), then 65%, 80% and 90% descriptive (2 seeds). Every run trains as long as
params.yaml's `diffusion_model`, through the `launcher`, one at a time in the `gpu` pool,
against one frozen text encoder pretrained once on a world of its own
(`models/diffusion/shared_text_encoder.py`), so that variants differ only in their
captions; it is scored on the whole prompt suite by the `eval_report` code. Every run is
an MLflow child run under one parent run.

A finished run leaves a record, `metrics/ablation/runs/<variant>-s<seed>.json` (its
per-prompt scores, curve and key); a later study whose run has the same key (settings,
code and every input's digest) reuses it instead of training again, so a stopped study
resumes where it stopped and may span machines. The comparison, with intervals over
prompts and seeds, goes to `data/ablation/` and `metrics/ablation.json`.

    make ablation                       # the whole study (hours on 2 CPU cores)
"""

import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
from mlflow import MlflowClient

from assets.diffusion_model import checked_training_config, training_config
from assets.eval_report import eval_params
from corpus.atomic import write_text_atomic
from corpus.caption_mix import MixConfig, build_mixed_sampler
from corpus.params import RawDatasetParams, json_digest
from models.diffusion.shared_text_encoder import build_shared_text_encoder, weights_digest
from models.diffusion.text_encoder import TextEncoderConfig
from models.evaluation.ablation_report import ablation_tables, compare, plot_curves
from models.evaluation.report import EvalReportConfig, evaluate_model

# name -> (synthetic_ratio, caption_kind, seeds); alt-text only is ratio 0 of either kind.
VARIANTS: dict[str, tuple[float, str, int]] = {
    "alt_text": (0.0, "descriptive", 3),
    "short_95": (0.95, "short", 3),
    "descriptive_95": (0.95, "descriptive", 3),
    "descriptive_65": (0.65, "descriptive", 2),
    "descriptive_80": (0.80, "descriptive", 2),
    "descriptive_90": (0.90, "descriptive", 2),
}
SWEEP_SEEDS = 2  # seeds of a `<kind>@<ratio>` blend

# What a run's result depends on besides its settings and inputs: a change here
# retrains instead of reusing a record.
CODE = [
    "models/diffusion",
    "models/common",
    "models/evaluation/report.py",
    "models/evaluation/world_judge.py",
    "models/evaluation/reference_clip.py",
    "models/evaluation/colour_following.py",
    "corpus/caption_mix.py",
    "corpus/prompt_suite.py",
    "prompts",
]
LINEAGE = ["raw", "recaptioned", "captioner", "autoencoder", "world_judge", "reference_clip"]


def parse_variant(name: str) -> tuple[float, str, int]:
    """A named variant, or any blend as `<caption_kind>@<synthetic_ratio>` (a sweep:
    e.g. ["short@0.5", "descriptive@0.5"]): (ratio, kind, default seeds)."""
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
    return value, kind, SWEEP_SEEDS


class AblationConfig(dg.Config):
    # dg.Config is a pydantic model: it copies mutable defaults per instance.
    variants: list[str] = list(VARIANTS)  # noqa: RUF012
    seeds: int = 0  # runs per variant, seeds 0..n-1; 0: each variant's own (3 or 2)
    max_steps: int = 0  # 0: params.yaml's diffusion_model.diffusion.max_steps
    eval_every: int = 0  # steps between points of the curves; 0: params.yaml's
    eval_prompts: int = 64  # colour prompts per point of the curves
    suite_prompts: int = 2  # suite prompts per category and form per point of the curves
    prompts_per_category: int = 0  # of the suite, in each run's final eval; 0: all
    images_per_prompt: int = 4
    encoder_pairs: int = 6000  # (image, caption) pairs of the shared encoder's world
    n_boot: int = 2000
    # More diffusion_model settings for every run (e.g. unet).
    overrides: dict = {}  # noqa: RUF012


def _files_digest(root: Path, paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        path = root / p
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(root).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _weights(folder: Path) -> str:
    files = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*.safetensors"))
    return _files_digest(folder, files)


@dg.op(
    out={"plan": dg.Out(dict), "runs": dg.DynamicOut(dict)},
    required_resource_keys={"project", "mlflow"},
)
def ablation_variants(context: dg.OpExecutionContext, config: AblationConfig):
    """Check the study, open the parent MLflow run and fan out one step per run, seed
    by seed (every variant's first seed before any second), so that a study stopped
    early already compares every variant."""
    if not config.variants:
        raise ValueError(f"caption_ablation needs at least one variant, e.g. {list(VARIANTS)}")
    seeds = {n: config.seeds or parse_variant(n)[2] for n in config.variants}
    project, mlflow_res = context.resources.project, context.resources.mlflow
    missing = [n for n in LINEAGE if not project.data_path(n).exists()]
    if missing:
        raise FileNotFoundError(
            f"caption_ablation reads the materialized lineage; missing {missing} under "
            f"{project.data_path('')}: run `make run` first"
        )
    root = project.data_path("ablation")
    checked_training_config(
        training_config(project, mlflow_res, root, root, **config.overrides, seed=0)
    )
    mlflow.set_tracking_uri(mlflow_res.tracking_uri)
    exp = mlflow.set_experiment(mlflow_res.experiment)
    client = MlflowClient(mlflow_res.tracking_uri)
    # RUNNING until compare_variants ends it (FAILED as soon as a run fails).
    parent = client.create_run(
        exp.experiment_id, run_name="caption_ablation", tags={"dagster_run_id": context.run_id}
    ).info.run_id
    for k, v in config.model_dump().items():
        client.log_param(parent, k, json.dumps(v) if isinstance(v, dict | list) else v)
    context.log.info(f"parent MLflow run {parent}; runs per variant {seeds}")
    plan = {"parent_run_id": parent, "config": config.model_dump(), "seeds": seeds}
    yield dg.Output(plan, "plan")
    order = [(s, n) for s in range(max(seeds.values())) for n in config.variants if s < seeds[n]]
    for i, (seed, name) in enumerate(order):
        # Dagster starts ready steps in the order of their mapping keys, as strings.
        key = f"r{i:02d}_s{seed}_" + name.replace("@", "_").replace(".", "_")
        yield dg.DynamicOutput({**plan, "name": name, "seed": seed}, key, "runs")


@dg.op(pool="gpu", required_resource_keys={"project", "mlflow"})
def shared_text_encoder(context: dg.OpExecutionContext, plan: dict) -> dict:
    """The frozen text encoder of every run: built once (reused while its settings and
    partner are unchanged); a `full` profile's pretrained encoder is shared as it is."""
    project = context.resources.project
    params = project.params("diffusion_model")
    tcfg = TextEncoderConfig.from_dict(params.get("text_encoder", {}))
    if tcfg.pretrained:
        return {"pretrained": tcfg.pretrained, "digest": None}
    raw = RawDatasetParams.from_dict(project.params("raw_alt_text_dataset"))
    out = project.data_path("ablation", "text_encoder")
    record = build_shared_text_encoder(
        tcfg,
        out,
        project.data_path("captioner"),
        project.params("autoencoder")["resolution"],
        plan["config"]["encoder_pairs"],
        raw.world,
        raw.noise,
    )
    client = MlflowClient(context.resources.mlflow.tracking_uri)
    client.log_param(plan["parent_run_id"], "text_encoder.digest", record["digest"])
    context.add_output_metadata({"digest": record["digest"], "path": dg.MetadataValue.path(out)})
    return {"pretrained": str(out), "digest": record["digest"]}


def _run_settings(
    project, mlflow_res, run: dict, encoder: dict, sampler: Path, root: Path
) -> tuple[dict, dict]:
    """The run's training config (typed and checked) and eval report config."""
    cfg = run["config"]
    train = training_config(
        project,
        mlflow_res,
        sampler,
        root / "model",
        **cfg["overrides"],
        work=str(root / "work"),
        seed=run["seed"],
    )
    # The shared encoder, not the lineage's text_encoder asset (trained on one blend).
    train["text_encoder"] = {**train.get("text_encoder", {}), "pretrained": encoder["pretrained"]}
    train["text_encoder_dir"] = None
    if cfg["max_steps"]:
        train["diffusion"] = {**train.get("diffusion", {}), "max_steps": cfg["max_steps"]}
    train["eval"] = {
        **train.get("eval", {}),
        **({"every": cfg["eval_every"]} if cfg["eval_every"] else {}),
        "prompts": cfg["eval_prompts"],
        "final_prompts": cfg["eval_prompts"],
        "suite_prompts": cfg["suite_prompts"],
        "text_probes": 0,  # probed once: the encoder is the same in every run
        "reference_clip": str(project.data_path("reference_clip")),
        "judge": str(project.data_path("world_judge")),
    }
    evaluation = {
        **eval_params(project),
        "model": str(root / "model"),
        "judge": str(project.data_path("world_judge")),
        "reference_clip": str(project.data_path("reference_clip")),
        "out": str(root / "eval"),
        "prompts_per_category": cfg["prompts_per_category"],
        "images_per_prompt": cfg["images_per_prompt"],
        "seed": run["seed"],
        "expander": None,
        "mlflow_tracking_uri": mlflow_res.tracking_uri,
    }
    return checked_training_config(train), evaluation


def run_key(project, run: dict, train: dict, evaluation: dict, encoder: dict, sampler: Path) -> str:
    """What a run's result depends on: its variant and seed, its settings without
    paths, the code, and the digests of its sampler, encoder, judge and CLIP."""
    paths = {"raw", "sampler", "autoencoder", "captioner", "out", "work", "model"}
    settings = {k: v for k, v in train.items() if k not in paths and not k.startswith("mlflow")}
    settings["eval"] = {
        k: v for k, v in settings["eval"].items() if k not in ("judge", "reference_clip")
    }
    settings["text_encoder"] = {
        **settings["text_encoder"],
        "pretrained": encoder["digest"] or encoder["pretrained"],
    }
    dropped = paths | {"judge", "reference_clip", "suite", "mlflow_tracking_uri"}
    scoring = {k: v for k, v in evaluation.items() if k not in dropped}
    return json_digest(
        {
            "name": run["name"],
            "seed": run["seed"],
            "train": settings,
            "eval": scoring,
            "code": _files_digest(project.path, CODE),
            "sampler": _files_digest(sampler, sorted(p.name for p in sampler.iterdir())),
            "autoencoder": _weights(project.data_path("autoencoder")),
            "judge": _weights(project.data_path("world_judge")),
            "reference_clip": _weights(project.data_path("reference_clip")),
        },
        length=16,
    )


def _log_record(client: MlflowClient, run_id: str, record: dict) -> None:
    for form in record["per_prompt"]:
        client.log_metric(run_id, f"ablation/{form}/all_conditions", record["overall"][form])
        client.log_metric(run_id, f"ablation/{form}/clip_score", record["clip_score"][form])
        for kind, acc in record["attributes"][form].items():
            client.log_metric(run_id, f"ablation/{form}/attribute/{kind}", acc)
    for point in record["curve"]:
        for k, v in point.items():
            if k != "step":
                client.log_metric(run_id, f"curve/{k}", v, step=point["step"])


@dg.op(pool="gpu", required_resource_keys={"project", "mlflow", "launcher"})
def train_and_evaluate_variant(context: dg.OpExecutionContext, run: dict, encoder: dict) -> dict:
    """One variant with one seed: its caption blend, then trained and scored; or its
    record, when a finished run with the same key exists."""
    project, mlflow_res = context.resources.project, context.resources.mlflow
    name, seed = run["name"], run["seed"]
    ratio, kind, _ = parse_variant(name)
    root = project.data_path("ablation", name)
    t0 = time.time()
    mix = MixConfig.from_dict(
        {**project.params("mixed_sampler"), "synthetic_ratio": ratio, "caption_kind": kind}
    )
    sampler = build_mixed_sampler(project.data_path("recaptioned"), root / "sampler", mix)
    run_dir = root / f"seed{seed}"
    train, evaluation = _run_settings(project, mlflow_res, run, encoder, root / "sampler", run_dir)
    key = run_key(project, run, train, evaluation, encoder, root / "sampler")
    record_file = project.path / "metrics" / "ablation" / "runs" / f"{name}-s{seed}.json"
    client = MlflowClient(mlflow_res.tracking_uri)
    exp = client.get_experiment_by_name(mlflow_res.experiment)
    tags = {"mlflow.parentRunId": run["parent_run_id"], "ablation.variant": name,
            "ablation.seed": str(seed), "ablation.key": key}  # fmt: skip
    old = json.loads(record_file.read_text()) if record_file.exists() else None
    reused = bool(old and old["key"] == key)
    if reused:
        tags["ablation.reused_from"] = old["run_id"]
    child = client.create_run(
        exp.experiment_id, run_name=f"ablation/{name}/seed{seed}", tags=tags
    ).info.run_id
    for k, v in {"synthetic_ratio": ratio, "caption_kind": kind, "seed": seed}.items():
        client.log_param(child, f"ablation.{k}", v)
    if reused:
        _log_record(client, child, old)
        client.set_terminated(child)
        context.log.info(f"{name} seed {seed}: reused {record_file} (key {key})")
        return {**old, "reused": True}
    try:
        train["mlflow_run_id"] = child
        context.resources.launcher.run(
            context, "models.diffusion.train", extras={"config": train}, cwd=str(project.path)
        )
        t_train = time.time() - t0
        report = evaluate_model(EvalReportConfig.from_dict({**evaluation, "mlflow_run_id": child}))
    except BaseException:
        client.set_terminated(child, status="FAILED")
        client.set_terminated(run["parent_run_id"], status="FAILED")
        raise
    model = json.loads((run_dir / "model" / "metrics.json").read_text())
    per_prompt = json.loads((run_dir / "eval" / "per_prompt.json").read_text())["by_form"]
    images = map(json.loads, (run_dir / "eval" / "per_image.jsonl").read_text().splitlines())
    categories = {i["prompt_id"]: i["category"] for i in images}
    forms = report["forms"]
    record = {
        "key": key,
        "name": name,
        "seed": seed,
        "synthetic_ratio": ratio,
        "caption_kind": kind,
        "realized_ratio": sampler["epochs"][0]["synthetic_ratio"],
        "steps": model["steps"],
        "encoder_digest": encoder["digest"] or weights_digest(Path(encoder["pretrained"])),
        "categories": categories,
        "per_prompt": {f: {pid: s[f] for pid, s in per_prompt.items()} for f in forms},
        "overall": {f: m["prompt_following"]["overall"] for f, m in forms.items()},
        "attributes": {f: m["attribute_accuracy"] for f, m in forms.items()},
        "clip_score": {f: m["clip_score"] for f, m in forms.items()},
        "curve": model["curve"],
        "run_id": child,
        "seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1)},
    }
    record_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record_file, json.dumps(record, indent=1) + "\n")
    _log_record(client, child, record)
    client.set_terminated(child)
    context.log.info(json.dumps({k: record[k] for k in ("name", "seed", "overall", "seconds")}))
    return {**record, "reused": False}


def summarise(records: list[dict], n_boot: int) -> tuple[list[dict], dict]:
    """Per variant (named ones first, in VARIANTS' order): its runs merged, then the
    statistics over prompts and seeds (`models.evaluation.ablation_report.compare`)."""
    order = {n: i for i, n in enumerate(VARIANTS)}
    names = sorted({r["name"] for r in records}, key=lambda n: (order.get(n, len(order)), n))
    prompt_ids = sorted(records[0]["categories"])
    forms = list(records[0]["per_prompt"])
    for r in records:
        if sorted(r["categories"]) != prompt_ids:
            raise ValueError(f"{r['name']} seed {r['seed']} was scored on other prompts")
    categories = [records[0]["categories"][p] for p in prompt_ids]
    variants, runs = [], {}
    for name in names:
        rs = sorted((r for r in records if r["name"] == name), key=lambda r: r["seed"])
        runs[name] = {
            f: np.array([[r["per_prompt"][f][p] for p in prompt_ids] for r in rs]) for f in forms
        }
        kinds = {k for r in rs for f in forms for k in r["attributes"][f]}
        variants.append(
            {
                "name": name,
                "synthetic_ratio": rs[0]["synthetic_ratio"],
                "caption_kind": rs[0]["caption_kind"],
                "realized_ratio": rs[0]["realized_ratio"],
                "seeds": [r["seed"] for r in rs],
                "steps": rs[0]["steps"],
                "attributes": {
                    f: {
                        k: float(
                            np.mean([r["attributes"][f][k] for r in rs if k in r["attributes"][f]])
                        )
                        for k in kinds
                        if any(k in r["attributes"][f] for r in rs)
                    }
                    for f in forms
                },
                "clip_score": {f: float(np.mean([r["clip_score"][f] for r in rs])) for f in forms},
                "curve": [c for r in rs for c in r["curve"]],
                "encoder_digests": sorted({r["encoder_digest"] for r in rs}),
                "run_ids": [r["run_id"] for r in rs],
                "seconds": sum(r["seconds"]["total"] for r in rs),
            }
        )
    return variants, compare(runs, categories, n_boot)


@dg.op(required_resource_keys={"project", "mlflow"})
def compare_variants(context: dg.OpExecutionContext, plan: dict, results: list[dict]) -> dict:
    project, mlflow_res = context.resources.project, context.resources.mlflow
    out = project.data_path("ablation")
    variants, stats = summarise(results, plan["config"]["n_boot"])
    table = ablation_tables(variants, stats)
    write_text_atomic(
        out / "summary.json",
        json.dumps(
            {
                "variants": variants,
                "scores": stats["variants"],
                "differences": stats["differences"],
            },
            indent=1,
        )
        + "\n",
    )
    write_text_atomic(out / "summary.md", table + "\n")
    plot_curves(variants, out / "curves.png")
    metrics = {
        "variants": {
            v["name"]: {"seeds": v["seeds"], **stats["variants"][v["name"]]} for v in variants
        },
        "differences": stats["differences"],
        "reused_runs": sum(r["reused"] for r in results),
        "runs": len(results),
    }
    (project.path / "metrics").mkdir(exist_ok=True)
    write_text_atomic(
        project.path / "metrics" / "ablation.json", json.dumps(metrics, indent=1) + "\n"
    )
    client = MlflowClient(mlflow_res.tracking_uri)
    parent = plan["parent_run_id"]
    for name, forms in stats["variants"].items():
        for form, m in forms.items():
            client.log_metric(parent, f"{name}/{form}/all_conditions", m["mean"])
    for d in stats["differences"]:
        client.log_metric(parent, f"{d['a']}-{d['b']}/{d['form']}", d["difference"])
    for f in ("summary.md", "summary.json", "curves.png"):
        client.log_artifact(parent, str(out / f))
    client.set_terminated(parent)
    context.add_output_metadata(
        {
            "table": dg.MetadataValue.md(table),
            "summary": dg.MetadataValue.path(str(out)),
            "runs": len(results),
            "reused_runs": metrics["reused_runs"],
        }
    )
    return {"parent_run_id": parent, "runs": len(results)}


@dg.job(description=__doc__)
def caption_ablation():
    plan, runs = ablation_variants()
    encoder = shared_text_encoder(plan)
    results = runs.map(lambda run: train_and_evaluate_variant(run, encoder))
    compare_variants(plan, results.collect())
