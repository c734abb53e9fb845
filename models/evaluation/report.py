"""The eval report: prompt following measured exactly, and CLIP score, for one model.

Every prompt of the suite, in its short and its descriptive form, is sampled
`images_per_prompt` times with fixed seeds; with a prompt expander, a third form,
`upsampled`: each short prompt expanded `images_per_prompt` times (only expansions that
keep all its claims; the short prompt stands in for any other) and judged by the short
prompt's conditions, with the paired difference against the short form and its interval.
With the feedback models (`preference_model`, `rich_feedback_model`), their scores of the
same images, their predicted missed words against the judge's, and grids with their
heatmaps over the images (`models/evaluation/feedback_columns.py`).
The world judge reads each image back into a scene; an image passes only when every
condition of its prompt holds (GenEval's rule). Partial progress goes next to it: each
attribute's accuracy given that its object exists, and why the failed images failed
(`corpus.prompt_suite.diagnose`).
Accuracy per category and form, the mean over categories (GenEval's overall), a
bootstrap interval over prompts, and CLIP score against each form (the two panels of the
report's Figure 4) go to `metrics.json`; grids per category, plots and an HTML page
(every caption escaped) go next to it; everything is logged to the model's MLflow run.

    python -m models.evaluation.report --params params.yaml --model data/diffusion_model \
        --judge data/world_judge --reference-clip data/reference_clip --out data/eval_report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from corpus.atomic import replace_dir, write_text_atomic
from corpus.config import build_config
from corpus.preview import caption_grid
from corpus.prompt_suite import (
    ATTRIBUTES,
    CATEGORIES,
    DEFAULT_SUITE,
    FORMS,
    REASONS,
    diagnose,
    judge_prompt,
    load_suite,
)
from models.diffusion.text_to_image import load_text_to_image
from models.evaluation.feedback_columns import load_feedback_models, score_form
from models.evaluation.preference_scores import hps_v2_scores
from models.evaluation.promotion_gate import bootstrap_ci
from models.evaluation.reference_clip import load_reference_clip
from models.evaluation.report_html import write_html_report
from models.evaluation.world_judge import load_judge


@dataclass(frozen=True)
class EvalReportConfig:
    model: str
    judge: str
    reference_clip: str
    out: str
    suite: str = str(DEFAULT_SUITE)
    images_per_prompt: int = 4  # GenEval's
    prompts_per_category: int = 0  # 0: all of the suite's
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 6.0
    grid_prompts: int = 4  # prompts per category shown in the grids
    n_boot: int = 2000
    hpsv2: str | None = None  # full: a local HPS v2 checkpoint; absent: skipped, noted
    hpsv2_model: str = "ViT-H-14"
    expander: str | None = None  # a prompt expander folder: adds the `upsampled` form
    upsample_candidates: int = 16  # expansions sampled per short prompt to find faithful ones
    preference_model: str | None = None  # a preference_model folder: adds its scores
    rich_feedback_model: str | None = None  # a rich_feedback_model folder: heatmaps, words
    metrics_dir: str | None = None  # also write metrics and plot data here (dvc.yaml)
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # the model's run; default: from its metrics.json

    @classmethod
    def from_dict(cls, d: dict) -> EvalReportConfig:
        missing = [k for k in ("model", "judge", "reference_clip", "out") if not d.get(k)]
        if missing:
            raise ValueError(f"eval_report needs the paths {missing}")
        return build_config(cls, d, "eval_report")


def _select(prompts, per_category: int):
    if per_category <= 0:
        return prompts
    taken: dict[str, int] = {}
    out = []
    for p in prompts:
        if taken.get(p.category, 0) < per_category:
            out.append(p)
            taken[p.category] = taken.get(p.category, 0) + 1
    return out


def _tile(
    image: torch.Tensor,
    passed: bool,
    scale: int = 3,
    heatmaps: np.ndarray | None = None,
    full_at: float | None = None,
) -> Image.Image:
    """An image upscaled with a green (passed) or red (failed) frame; with predicted
    heatmaps, they are tinted over it (`models.feedback.rich_train.overlay`)."""
    if heatmaps is None:
        img = Image.fromarray(image.permute(1, 2, 0).numpy())
    else:
        from models.feedback.rich_train import overlay

        img = overlay(image, heatmaps, full_at)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    ImageDraw.Draw(img).rectangle(
        (0, 0, img.width - 1, img.height - 1),
        outline=(30, 170, 60) if passed else (210, 40, 40),
        width=3,
    )
    return img


def evaluate_model(
    cfg: EvalReportConfig, gate: Callable[[dict, str | None], dict] | None = None
) -> dict:
    """Sample, judge and score the suite; write and log the report. `gate(per_prompt,
    mlflow_run_id)` (the regression gate, from the assets layer) decides on promotion
    before the report is written, so the page and the run carry its decision."""
    t0 = time.time()
    out = Path(cfg.out)
    prompts = _select(load_suite(Path(cfg.suite)), cfg.prompts_per_category)
    # Sampling is the heavy part: on the best device present; judge and CLIP read the
    # uint8 images on the CPU.
    pipe = load_text_to_image(Path(cfg.model)).to("cuda" if torch.cuda.is_available() else "cpu")
    judge = load_judge(Path(cfg.judge))
    clip = load_reference_clip(Path(cfg.reference_clip))
    suite_version = json.loads(Path(cfg.suite).read_text()).get("version", "?")
    feedback = load_feedback_models(cfg.preference_model, cfg.rich_feedback_model)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "grids").mkdir(parents=True)
    records, per_prompt, by_form = [], {}, {}
    timings = {}
    upsampled = _upsampled(cfg, prompts) if cfg.expander else None
    for form in [*FORMS, "upsampled"] if upsampled else FORMS:
        if form == "upsampled":
            texts = [d.prompt for d in upsampled]
        else:
            texts = [p.text(form) for p in prompts for _ in range(cfg.images_per_prompt)]
        # An upsampled image is held to what the user asked: the short prompt's conditions.
        asked = "short" if form == "upsampled" else form
        t = time.time()
        with torch.inference_mode():
            images = pipe(texts, seed=cfg.seed, steps=cfg.steps, guidance_scale=cfg.guidance_scale)
        timings[f"generate_{form}_s"] = round(time.time() - t, 1)
        scenes = judge.predict(images)
        scores = clip.score(images, texts)
        truncated = clip.truncated(texts[:: cfg.images_per_prompt])
        hps = hps_v2_scores(cfg.hpsv2, cfg.hpsv2_model, images, texts)
        image_prompts = [prompts[i // cfg.images_per_prompt] for i in range(len(texts))]
        verdicts = [judge_prompt(p, s) for p, s in zip(image_prompts, scenes, strict=True)]
        passed = [v["passed"] for v in verdicts]
        fb_images, fb_summary, heatmaps = score_form(
            feedback, images, texts, image_prompts, scenes, passed
        )
        diagnoses = []
        for i, (scene, score) in enumerate(zip(scenes, scores, strict=True)):
            p, verdict = image_prompts[i], verdicts[i]
            diagnoses.append(diagnose(p, scene, asked))
            records.append(
                {
                    "prompt_id": p.id,
                    "category": p.category,
                    "form": form,
                    "image": i % cfg.images_per_prompt,
                    "prompt": texts[i],
                    "passed": verdict["passed"],
                    "conditions": verdict["conditions"],
                    "failure_reasons": diagnoses[-1]["reasons"],
                    "clip_score": float(score),
                    "judged_scene": scene.to_dict(),
                    **fb_images[i],
                }
            )
        passed_arr = np.array(passed).reshape(len(prompts), cfg.images_per_prompt)
        prompt_scores = passed_arr.mean(1)
        for p, s in zip(prompts, prompt_scores, strict=True):
            per_prompt.setdefault(p.id, {})[form] = float(s)
        cats = {
            c: float(prompt_scores[[p.category == c for p in prompts]].mean())
            for c in CATEGORIES
            if any(p.category == c for p in prompts)
        }
        # GenEval's overall: the mean over categories; the interval resamples prompts
        # within the same weighting (categories have equal prompt counts in the suite).
        by_form[form] = {
            "prompt_following": {**cats, "overall": float(np.mean(list(cats.values())))},
            "prompt_following_ci": bootstrap_ci(prompt_scores, cfg.n_boot),
            "clip_score": float(scores.mean()),
            "clip_score_std": float(scores.std()),
            "clip_truncated_prompts": int(sum(truncated)),
            "hps_v2": hps.get("mean"),
            **summarise_diagnoses(diagnoses),
            "drawn": drawn_objects(image_prompts, scenes),
            **({"feedback": fb_summary} if fb_summary else {}),
        }
        if form == "upsampled":
            by_form[form].update(_against_short(upsampled, per_prompt, prompts, cfg.n_boot))
        n = cfg.images_per_prompt
        for c in cats:
            shown = [i for i, p in enumerate(prompts) if p.category == c][: cfg.grid_prompts]
            js = [j for i in shown for j in range(i * n, (i + 1) * n)]  # their images
            tiles = [_tile(images[j], passed[j]) for j in js]
            caps = [texts[j] if j % n == 0 or form == "upsampled" else " " for j in js]
            grid = caption_grid(tiles, caps, cols=n, tile=96, lines=4)
            grid.save(tmp / "grids" / f"{c}-{form}.png")
            if heatmaps is not None:
                full_at = feedback.rich.cfg.repair_threshold  # what region repair resamples
                tiles = [
                    _tile(images[j], passed[j], heatmaps=heatmaps[j], full_at=full_at) for j in js
                ]
                caps = [
                    "missed: " + (", ".join(fb_images[j]["missed_words_predicted"]) or "-")
                    for j in js
                ]
                grid = caption_grid(tiles, caps, cols=n, tile=96, lines=2)
                grid.save(tmp / "grids" / f"{c}-{form}-feedback.png")

    model_metrics = json.loads((Path(cfg.model) / "metrics.json").read_text())
    metrics = {
        "suite_version": suite_version,
        "prompts": len(prompts),
        "images_per_prompt": cfg.images_per_prompt,
        "forms": by_form,
        "notes": ([hps["skipped"]] if "skipped" in hps else [])
        + ([] if upsampled else ["upsampled form skipped: no prompt expander given"])
        + [
            f"{name} columns skipped: no {name} given"
            for name, model in (
                ("preference_model", feedback.preference),
                ("rich_feedback_model", feedback.rich),
            )
            if model is None
        ],
        "judge_accuracy": json.loads((Path(cfg.judge) / "metrics.json").read_text())["accuracy"],
        "reference_clip": {
            k: v
            for k, v in json.loads((Path(cfg.reference_clip) / "metrics.json").read_text()).items()
            if k != "config"
        },
        "training_curve": model_metrics.get("curve", []),
        "model_steps": model_metrics.get("steps"),
        "seconds": {**timings, "total_s": round(time.time() - t0, 1)},
        "config": asdict(cfg),
    }
    per_prompt_doc = {
        "fingerprint": fingerprint(cfg, suite_version),
        # A prompt's score: the share of its images that pass, averaged over the suite's
        # own forms (the forms of one prompt are not independent samples for the gate;
        # the upsampled form depends on the expander too, so the gate reads it apart).
        "scores": {
            pid: float(np.mean([f[form] for form in FORMS])) for pid, f in per_prompt.items()
        },
        "by_form": per_prompt,
    }
    run_id = cfg.mlflow_run_id or model_metrics.get("mlflow_run_id")
    decision = gate(per_prompt_doc, run_id) if gate else None
    _write_outputs(tmp, metrics, records, per_prompt_doc, decision)
    replace_dir(tmp, out)
    if cfg.metrics_dir:
        write_dvc_metrics(out, Path(cfg.metrics_dir), metrics)
    if cfg.mlflow_tracking_uri and run_id:
        log_to_mlflow(cfg.mlflow_tracking_uri, run_id, out, metrics, decision)
        metrics["mlflow_run_id"] = run_id
    if decision is not None:
        metrics["gate"] = decision
    return metrics


def _upsampled(cfg: EvalReportConfig, prompts) -> list:
    """`images_per_prompt` upsampled prompts per suite prompt, prompt-major."""
    from models.expansion.model import load_expander
    from models.expansion.upsample import upsample

    expander = load_expander(Path(cfg.expander))
    queries = [p.short for p in prompts]
    return upsample(queries, cfg.images_per_prompt, expander, cfg.upsample_candidates, cfg.seed)


def _against_short(upsampled: list, per_prompt: dict, prompts, n_boot: int) -> dict:
    """How many images were drawn from an expansion, and upsampled minus short per
    prompt (the same prompts and seeds: a paired difference) with its interval."""
    diff = np.array([per_prompt[p.id]["upsampled"] - per_prompt[p.id]["short"] for p in prompts])
    return {
        "expanded_share": float(np.mean([d.expanded for d in upsampled])),
        "minus_short": float(diff.mean()),
        "minus_short_ci": bootstrap_ci(diff, n_boot),
    }


def drawn_objects(prompts: list, scenes: list) -> dict:
    """What the images hold against what their prompts ask (each image's prompt and
    judged scene): objects per image and per prompt (the reference scene's), and the
    share of drawn objects whose shape the prompt asks for; the same over one-object
    prompts alone. A model that draws several guesses passes "has a star" more often
    than one that draws one star: shape given the object and the single-object row count
    the best of the guesses, these count every one."""

    def measure(pairs: list) -> dict:
        drawn = [o for _, s in pairs for o in s.objects]
        asked = [{o.shape for o in p.scene.objects} for p, _ in pairs]
        right = sum(o.shape in a for (_, s), a in zip(pairs, asked, strict=True) for o in s.objects)
        return {
            "images": len(pairs),
            "objects_per_image": len(drawn) / max(len(pairs), 1),
            "asked_per_image": sum(len(p.scene.objects) for p, _ in pairs) / max(len(pairs), 1),
            "asked_shape_share": right / len(drawn) if drawn else None,
        }

    pairs = list(zip(prompts, scenes, strict=True))
    one = [(p, s) for p, s in pairs if len(p.scene.objects) == 1]
    return {**measure(pairs), "one_object_prompts": measure(one)}


def summarise_diagnoses(diagnoses: list[dict]) -> dict:
    """Partial progress over one form's images (`corpus.prompt_suite.diagnose`).

    attribute_accuracy: per attribute kind judged at least once, held / judged over all
    judged instances; attribute_judged: how many instances were judged, per kind (0: the
    form does not state it). failure_reasons: among failed images, the share that has
    each reason (multi-label) and the share whose primary reason it is (these add up to
    1 when any image failed).
    """
    held = {k: 0 for k in ATTRIBUTES}
    judged = {k: 0 for k in ATTRIBUTES}
    for d in diagnoses:
        for k, results in d["attributes"].items():
            held[k] += sum(results)
            judged[k] += len(results)
    failed = [d for d in diagnoses if not d["passed"]]
    n = max(len(failed), 1)
    return {
        "attribute_accuracy": {k: held[k] / judged[k] for k in ATTRIBUTES if judged[k]},
        "attribute_judged": judged,
        "failure_reasons": {
            "images": len(diagnoses),
            "failed": len(failed),
            "share_with_reason": {r: sum(r in d["reasons"] for d in failed) / n for r in REASONS},
            "share_primary": {r: sum(d["primary"] == r for d in failed) / n for r in REASONS},
        },
    }


def fingerprint(cfg: EvalReportConfig, suite_version: str) -> dict:
    """What must match for two models' per-prompt scores to be compared by the gate: the
    suite, the judge's weights and the sampling settings."""
    judge_weights = Path(cfg.judge) / "judge.safetensors"
    with open(judge_weights, "rb") as f:
        judge_digest = hashlib.file_digest(f, "sha256").hexdigest()
    with open(cfg.suite, "rb") as f:
        suite_digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "suite_version": suite_version,
        "suite_sha256": suite_digest,
        "judge_sha256": judge_digest,
        **{
            k: getattr(cfg, k)
            for k in ("images_per_prompt", "prompts_per_category", "seed", "steps")
        },
        "guidance_scale": cfg.guidance_scale,
    }


def flat_metrics(metrics: dict) -> dict[str, float]:
    """eval/<form>/<category> accuracies, eval/<form>/clip_score, and the partial-progress
    measures eval/<form>/attribute/<kind>, eval/<form>/failure/<reason> (share of failed
    images with it), eval/<form>/failure_primary/<reason> and eval/<form>/drawn/[one_object/]
    <measure>, and the feedback models' eval/<form>/feedback/<measure>, for MLflow and DVC."""
    flat = {}
    for form, m in metrics["forms"].items():
        for c, v in m["prompt_following"].items():
            flat[f"eval/{form}/{c}"] = v
        flat[f"eval/{form}/clip_score"] = m["clip_score"]
        for k, v in m.get("attribute_accuracy", {}).items():
            flat[f"eval/{form}/attribute/{k}"] = v
        reasons = m.get("failure_reasons", {})
        for r, v in reasons.get("share_with_reason", {}).items():
            flat[f"eval/{form}/failure/{r}"] = v
        for r, v in reasons.get("share_primary", {}).items():
            flat[f"eval/{form}/failure_primary/{r}"] = v
        drawn = m.get("drawn", {})
        for scope, d in (("", drawn), ("one_object/", drawn.get("one_object_prompts", {}))):
            for k in ("objects_per_image", "asked_shape_share"):
                if d.get(k) is not None:
                    flat[f"eval/{form}/drawn/{scope}{k}"] = d[k]
        for k, v in m.get("feedback", {}).items():
            for name, x in v.items() if isinstance(v, dict) else [("", v)]:
                if x is not None:
                    flat[f"eval/{form}/feedback/{k}{'_' + name if name else ''}"] = x
    return flat


def _write_outputs(
    tmp: Path, metrics: dict, records: list[dict], per_prompt: dict, gate: dict | None
) -> None:
    from models.evaluation.plots import write_plots

    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (tmp / "per_prompt.json").write_text(json.dumps(per_prompt, indent=1) + "\n")
    if gate is not None:
        (tmp / "gate.json").write_text(json.dumps(gate, indent=2) + "\n")
    with open(tmp / "per_image.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    plots = tmp / "plots"
    plots.mkdir()
    # Plot data for `dvc plots show` (declared in dvc.yaml) and the PNGs of the report.
    rows = [
        {"label": f"{c} ({form})", "category": c, "form": form, "accuracy": v}
        for form, m in metrics["forms"].items()
        for c, v in m["prompt_following"].items()
    ]
    (plots / "prompt_following.json").write_text(json.dumps(rows, indent=1) + "\n")
    (plots / "training_curve.json").write_text(
        json.dumps(metrics["training_curve"], indent=1) + "\n"
    )
    write_plots(metrics, records, plots)
    write_html_report(tmp, metrics, records, gate)


def write_dvc_metrics(report: Path, metrics_dir: Path, metrics: dict) -> None:
    """The metrics and plot data `dvc metrics show` / `dvc plots show` read (git-tracked,
    outside the report folder that DVC caches)."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "suite_version": metrics["suite_version"],
        "model_steps": metrics["model_steps"],
        **{
            form: {
                "prompt_following": m["prompt_following"],
                "clip_score": m["clip_score"],
                "attribute_accuracy": m["attribute_accuracy"],
                "failure_reasons": m["failure_reasons"],
                **({"drawn": _defined(m["drawn"])} if "drawn" in m else {}),
                **({"feedback": _defined(m["feedback"])} if "feedback" in m else {}),
            }
            for form, m in metrics["forms"].items()
        },
    }
    write_text_atomic(metrics_dir / "eval_report.json", json.dumps(summary, indent=2) + "\n")
    for name in ("prompt_following.json", "training_curve.json"):
        write_text_atomic(metrics_dir / name, (report / "plots" / name).read_text())


def _defined(d: dict) -> dict:
    """`d` without its undefined (None) measures and the sections left empty: `dvc metrics`
    drops both, so the file would not read back as written."""
    out = {}
    for k, v in d.items():
        v = _defined(v) if isinstance(v, dict) else v
        if v is not None and v != {}:
            out[k] = v
    return out


def log_to_mlflow(
    tracking_uri: str, run_id: str, out: Path, metrics: dict, gate: dict | None = None
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    step = metrics.get("model_steps") or 0
    for k, v in flat_metrics(metrics).items():
        client.log_metric(run_id, k, v, step=step)
    client.log_artifacts(run_id, str(out), artifact_path="eval_report")
    if gate is not None:
        client.set_tag(run_id, "eval.promoted_to_champion", str(bool(gate["promote"])).lower())


def main() -> None:
    from models.common.cli_config import add_config_flags, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flags(ap, EvalReportConfig)
    args = ap.parse_args()
    cfg = config_from_args(
        EvalReportConfig,
        args,
        "eval_report",
        mlflow_tracking_uri=args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    metrics = evaluate_model(cfg)
    print(json.dumps({f: m["prompt_following"] for f, m in metrics["forms"].items()}, indent=2))


if __name__ == "__main__":
    main()
