"""Prompts to images through the registered champion, optionally expanded first.

    python -m models.serving.generate "a red star" "two blue circles" --expand 4 \\
        --expander data/prompt_expander --out generated/

`--model` is a registered model (`models:/recapflow-text-to-image@champion`, the default,
read from MLFLOW_TRACKING_URI) or an exported folder (`data/diffusion_model`). With
`--expand N` each prompt becomes N expanded prompts from the prompt expander, and only
expansions that keep every claim of the prompt are drawn (models/expansion/
faithfulness.py checks each of `--candidates` samples); where fewer than N are faithful,
the prompt itself fills the rest, so no image is drawn from a prompt that dropped or
contradicted what the user asked. The output folder gets `grid.png` (a row per prompt),
one PNG per image and `prompts.json` (which prompt drew which image, and whether it was
expanded). `text_to_images` is also what the MLflow pyfunc model's `predict` runs.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from corpus.atomic import write_atomic, write_text_atomic
from models.diffusion.text_to_image import TextToImagePipeline, load_text_to_image
from models.expansion.upsample import Drawn, upsample

CHAMPION = "models:/recapflow-text-to-image@champion"


def text_to_images(
    pipeline: TextToImagePipeline,
    queries: list[str],
    expand: int = 0,
    expander=None,
    candidates: int = 16,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> tuple[torch.Tensor, list[Drawn]]:
    """uint8 (N, 3, H, W) images and what drew each: one per query, or `expand` per query
    through `expander` (a (model, tokenizer) pair from `load_expander`, or a few-shot LLM
    from `models.expansion.few_shot.load_few_shot`)."""
    if not queries or any(not q.strip() for q in queries):
        raise ValueError(f"every prompt must be non-empty text, got {queries!r}")
    if expand < 0:
        raise ValueError(f"expand must be >= 0, got {expand}")
    if expand and expander is None:
        raise ValueError(
            f"expand={expand} needs a prompt expander: the command's --expander <folder> "
            "(the prompt_expander asset writes data/prompt_expander), or a pyfunc model "
            "logged with register_text_to_image(..., expander_dir=...)"
        )
    if expand:
        rows = upsample(queries, expand, expander, candidates, seed)
    else:
        rows = [Drawn(q, q, False) for q in queries]
    images = pipeline(
        [r.prompt for r in rows], seed=seed, steps=steps, guidance_scale=guidance_scale
    )
    return images, rows


def resolve_model(model: str, tracking_uri: str | None = None) -> Path:
    """The exported folder of `model`: itself, or the registered model's `pipeline`
    artifact downloaded from MLflow (no pickle: the pyfunc is logged as code)."""
    if not model.startswith("models:/"):
        return Path(model)
    import mlflow
    from mlflow.models import Model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except mlflow.exceptions.MlflowException as e:
        raise FileNotFoundError(
            f"no registered model at {model} in {mlflow.get_tracking_uri()}: {e.message}. "
            "Run `make run` (its eval report promotes a champion), or give --model a folder "
            "such as data/diffusion_model."
        ) from e
    flavor = Model.load(local / "MLmodel").flavors["python_function"]
    return local / flavor["artifacts"]["pipeline"]["path"]


def write_outputs(out: Path, images: torch.Tensor, rows: list[Drawn], per_row: int) -> None:
    from PIL import Image

    from models.diffusion.autoencoder import image_grid

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, row) in enumerate(zip(images, rows, strict=True)):
        name = f"{i:03d}.png"
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        write_atomic(out / name, lambda p, pil=pil: pil.save(p, format="PNG"))
        records.append({"image": name, **asdict(row)})
    grid = image_grid(images, nrow=per_row, scale=4)
    write_atomic(out / "grid.png", lambda p: grid.save(p, format="PNG"))
    write_text_atomic(out / "prompts.json", json.dumps(records, indent=2))


def main(argv: list[str] | None = None) -> list[Drawn]:
    ap = argparse.ArgumentParser(description="Draw prompts with the registered champion.")
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--model", default=CHAMPION, help="models:/ URI or exported folder")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    ap.add_argument("--expand", type=int, default=0, help="expanded prompts per prompt")
    ap.add_argument("--expander", type=Path, help="a prompt expander folder")
    ap.add_argument(
        "--few-shot-llm",
        help="expand with an instruction-following LLM (hub id or folder) used few-shot, "
        "as the DALL-E 3 report did, instead of a trained expander",
    )
    ap.add_argument("--candidates", type=int, default=16, help="samples checked per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance-scale", type=float)
    ap.add_argument("--out", type=Path, default=Path("generated"))
    args = ap.parse_args(argv)
    expander = None
    if args.expand:
        if args.few_shot_llm:
            from models.expansion.few_shot import load_few_shot

            expander = load_few_shot(args.few_shot_llm)
        elif args.expander is None:
            ap.error(
                "--expand needs --expander (the prompt_expander asset's data/prompt_expander) "
                "or --few-shot-llm"
            )
        else:
            from models.expansion.model import load_expander

            expander = load_expander(args.expander)
    pipeline = load_text_to_image(resolve_model(args.model, args.tracking_uri))
    images, rows = text_to_images(
        pipeline,
        args.prompts,
        args.expand,
        expander,
        args.candidates,
        args.seed,
        args.steps,
        args.guidance_scale,
    )
    write_outputs(args.out, images, rows, per_row=max(args.expand, 1))
    for row in rows:
        print(f"{row.query!r} -> {row.prompt!r}" + ("" if row.expanded else " (as given)"))
    print(f"{len(rows)} images: {args.out / 'grid.png'}, {args.out / 'prompts.json'}")
    return rows


if __name__ == "__main__":
    main()
