"""How well the layout model alone lays out the suite's prompts, per setting and minute.

The layout UNet draws the layout it is given (models/diffusion/layout.py), so what the
layout model samples bounds what the images can pass: here each prompt's sampled layouts
are judged as scenes, by the eval report's rule, without drawing them. Trained on the
`make run`'s sampler, text tower and raw scenes, as `diffusion_model` trains it:

    python -m benchmarks.layout_model --width 128 --layers 3 --steps 3000 --batch 128

prints the training time and all conditions per form and category (4 layouts per prompt).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from corpus.caption_mix import read_manifest, read_sampler
from corpus.prompt_suite import CATEGORIES, FORMS, judge_prompt, load_suite
from corpus.world import Scene
from models.diffusion.layout import train_layout_model
from models.diffusion.model import UNetConfig, build_unet
from models.diffusion.text_encoder import load_text_encoder
from models.diffusion.train import VARIANTS, _layout_tokens, _load_captions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--sampler", type=Path, default=Path("data/mixed_sampler"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--text-encoder", type=Path, default=Path("data/diffusion_model/text_encoder"))
    ap.add_argument("--out", type=Path, default=None, help="write the scores here (json)")
    a = ap.parse_args()

    captions = _load_captions(a.sampler)
    epochs = read_sampler(a.sampler)["config"]["epochs"]
    index = {v: i for i, v in enumerate(VARIANTS)}
    variants = torch.as_tensor(
        np.stack([read_manifest(a.sampler, e)["source"].map(index) for e in range(epochs)])
    )
    enc = load_text_encoder(a.text_encoder, 96)
    n = len(captions)
    states = [enc.encode_all(captions[c].tolist())[0] for c in ("synthetic", "alt_text")]
    states = torch.stack([*states, enc.encode_all([""])[0].expand(n, -1, -1)])
    masks = torch.stack(
        [enc.token_mask(captions[c].tolist()) for c in ("synthetic", "alt_text")]
        + [enc.token_mask([""]).expand(n, -1)]
    )
    cfg = UNetConfig(layout=True, layout_width=a.width, layout_layers=a.layers)
    unet = build_unet(cfg, enc.hidden_size, enc.pooled_size, (12, 16, 16))
    tokens = _layout_tokens(unet, a.raw, captions["key"].tolist(), captions["shard"].tolist())
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    loss = train_layout_model(
        unet.layout_model, states, masks, variants, tokens, a.steps, a.batch, a.lr, a.seed
    )
    seconds = time.perf_counter() - t0

    prompts = load_suite()
    k = a.images_per_prompt
    result = {
        "width": a.width,
        "layers": a.layers,
        "steps": a.steps,
        "batch": a.batch,
        "seconds": round(seconds, 1),
        "loss": round(loss, 4),
    }
    for form in FORMS:
        texts = [p.text(form) for p in prompts for _ in range(k)]
        s, _ = enc(texts)
        g = torch.Generator().manual_seed(0)
        drawn = unet.plan(s, enc.token_mask(texts), g)
        scenes = [Scene.from_dict(unet.tokens_scene(t)) for t in drawn.tolist()]
        passed = (
            np.array([judge_prompt(prompts[i // k], sc)["passed"] for i, sc in enumerate(scenes)])
            .reshape(len(prompts), k)
            .mean(1)
        )
        cats = {c: float(passed[[p.category == c for p in prompts]].mean()) for c in CATEGORIES}
        result[form] = {**cats, "overall": float(np.mean(list(cats.values())))}
    print(json.dumps(result))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
