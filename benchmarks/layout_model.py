"""How well the layout model alone lays out the suite's prompts, per setting and minute.

The layout UNet draws the layout it is given (models/diffusion/layout.py), so what the
layout model samples bounds what the images can pass: here each prompt's sampled layouts
are judged as scenes, by the eval report's rule, without drawing them. Trained on the
`make run`'s sampler, text tower and raw scenes, as `diffusion_model` trains it:

    python -m benchmarks.layout_model --width 128 --layers 3 --steps 3000 --batch 128
    python -m benchmarks.layout_model --width 64 --layers 2 --lr 0.003 --short-share 0.3
    python -m benchmarks.layout_model --model data/diffusion_model   # a trained one
    python -m benchmarks.layout_model --model data/diffusion_model --guidance 3

prints the training time and all conditions per form and category (`--images-per-prompt`
layouts per prompt, sampled with `--guidance` against the empty caption, which with
`--guide-nothing` also guides whether a cell is filled), and how often
the alt texts of the training rows that name a shape name only shapes their scene has.
`--short-share P` gives that share of the rows whose caption is synthetic in an epoch
their short synthetic caption instead (from `--recaptioned`): what the layout model
learns of short captions when it sees some.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from corpus.caption_mix import read_manifest, read_sampler
from corpus.prompt_suite import CATEGORIES, FORMS, judge_prompt, load_suite
from corpus.world import SHAPES, Scene
from models.diffusion.layout import train_layout_model
from models.diffusion.model import UNetConfig, build_unet
from models.diffusion.text_encoder import load_text_encoder
from models.diffusion.text_to_image import load_text_to_image
from models.diffusion.train import VARIANTS, _layout_tokens, _load_captions

_SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")(?:e?s)?\b")


def alt_text_shapes(alt_texts: list[str], scenes: list[dict]) -> dict:
    """Of the alt texts that name a shape, the share whose every named shape is in the
    scene."""
    named = [
        (set(_SHAPE.findall((a or "").lower())), sc)
        for a, sc in zip(alt_texts, scenes, strict=True)
    ]
    named = [(n, sc) for n, sc in named if n]
    right = sum(n <= {o["shape"] for o in sc["objects"]} for n, sc in named)
    return {"rows": len(alt_texts), "naming_a_shape": len(named), "right": right / len(named)}


def judge_layouts(
    unet, enc, k: int, temperature: float = 1.0, guidance: float = 1.0, keep_nothing: bool = True
) -> dict:
    """All conditions per form and category of `k` layouts per suite prompt, and the
    objects per layout; `guidance` against the empty caption (`LayoutModel.sample`)."""
    prompts, result = load_suite(), {}
    empty = (enc([""])[0], enc.token_mask([""]))
    for form in FORMS:
        texts = [p.text(form) for p in prompts for _ in range(k)]
        s, _ = enc(texts)
        g = torch.Generator().manual_seed(0)
        mask = enc.token_mask(texts)
        drawn = unet.layout_model.sample(s, mask, g, temperature, guidance, empty, keep_nothing)
        scenes = [Scene.from_dict(unet.tokens_scene(t)) for t in drawn.tolist()]
        passed = (
            np.array([judge_prompt(prompts[i // k], sc)["passed"] for i, sc in enumerate(scenes)])
            .reshape(len(prompts), k)
            .mean(1)
        )
        cats = {c: float(passed[[p.category == c for p in prompts]].mean()) for c in CATEGORIES}
        result[form] = {
            **cats,
            "overall": float(np.mean(list(cats.values()))),
            "objects": float(np.mean([len(sc.objects) for sc in scenes])),
        }
    return result


def _train(a: argparse.Namespace, captions: pd.DataFrame) -> tuple:
    epochs = read_sampler(a.sampler)["config"]["epochs"]
    index = {v: i for i, v in enumerate(VARIANTS)}
    variants = torch.as_tensor(
        np.stack([read_manifest(a.sampler, e)["source"].map(index) for e in range(epochs)])
    )
    enc = load_text_encoder(a.text_encoder, 96)
    n = len(captions)
    texts = [captions["synthetic"].tolist(), captions["alt_text"].tolist(), [""] * n]
    if a.short_share:
        files = sorted(glob.glob(str(a.recaptioned / "*.parquet")))
        short = pd.concat(pd.read_parquet(f, columns=["key", "short_caption"]) for f in files)
        texts.append(short.set_index("key").loc[captions["key"], "short_caption"].tolist())
        g = torch.Generator().manual_seed(a.seed)
        swap = (variants == index["synthetic"]) & (
            torch.rand(variants.shape, generator=g) < a.short_share
        )
        variants[swap] = len(VARIANTS)
    states = torch.stack([enc.encode_all(t)[0] for t in texts])
    masks = torch.stack([enc.token_mask(t) for t in texts])
    cfg = UNetConfig(layout=True, layout_width=a.width, layout_layers=a.layers)
    unet = build_unet(cfg, enc.hidden_size, enc.pooled_size, (12, 16, 16))
    tokens = _layout_tokens(unet, a.raw, captions["key"].tolist(), captions["shard"].tolist())
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    loss = train_layout_model(
        unet.layout_model, states, masks, variants, tokens, a.steps, a.batch, a.lr, a.seed
    )
    trained = {
        "width": a.width,
        "layers": a.layers,
        "steps": a.steps,
        "batch": a.batch,
        "lr": a.lr,
        "short_share": a.short_share,
        "seconds": round(time.perf_counter() - t0, 1),
        "loss": round(loss, 4),
    }
    return unet, enc, trained, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="judge this model's layout model")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--short-share", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--guidance", type=float, default=1.0, help="against the empty caption")
    ap.add_argument(
        "--guide-nothing", action="store_true", help="guide whether a cell is filled too"
    )
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--sampler", type=Path, default=Path("data/mixed_sampler"))
    ap.add_argument("--recaptioned", type=Path, default=Path("data/recaptioned"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--text-encoder", type=Path, default=Path("data/text_encoder"))
    ap.add_argument("--out", type=Path, default=None, help="write the scores here (json)")
    a = ap.parse_args()

    captions = _load_captions(a.sampler)
    if a.model:
        model = load_text_to_image(a.model)
        unet, enc, result = model.unet, model.text_encoder, {"model": str(a.model)}
        keys, shards = captions["key"].tolist(), captions["shard"].tolist()
        tokens = _layout_tokens(unet, a.raw, keys, shards)
    else:
        unet, enc, result, tokens = _train(a, captions)
    scenes = [unet.tokens_scene(t) for t in tokens.tolist()]
    result["alt_text_shapes"] = alt_text_shapes(captions["alt_text"].tolist(), scenes)
    result["temperature"], result["guidance"] = a.temperature, a.guidance
    result["guide_nothing"] = a.guide_nothing
    k, keep = a.images_per_prompt, not a.guide_nothing
    result.update(judge_layouts(unet, enc, k, a.temperature, a.guidance, keep))
    print(json.dumps(result))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
