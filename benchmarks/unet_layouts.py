"""UNet layouts side by side: training images/s of candidate layouts, of channels-last
memory, of the fused AdamW kernel, of bf16 autocast, of torch.compile and of batch 64, each
as a ratio to params.yaml's default in the same run.

The default is params.yaml's `diffusion_model.unet` on the patch autoencoder's latents
(16x16x12 for 32 px) with its layout map; each candidate changes one thing. Every run
trains `--steps` plain optimizer steps (after `--warmup`; compiled runs warm up four
times as long, compilation included, and the compile time is reported) on random
latents and text states of the right shapes; rounds alternate over the runs so drift in
the machine's speed hits all of them; the median round is reported.

    python -m benchmarks.unet_layouts [--steps 20] [--rounds 3] [--batch N] [--compile]
        [--only "default (params.yaml)" "channels-last memory" ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

from corpus.params import load_params
from models.diffusion.model import DiffusionConfig, LatentDiffusion, UNetConfig, build_unet

TEXT_WIDTH = 64
LATENT = (12, 16, 16)  # recapflow-tiny-patch on 32 px
_ATTN_AT_4 = {
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# Cross-attention at the finest level too: each place of the 16x16 latent reads the caption.
_ATTN_AT_16 = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
}
_ATTN_AT_16_UP = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
}

# No attention at all: with unet.layout the map says what stands at each place.
_NO_ATTN = {
    "down_block_types": ["DownBlock2D"] * 3,
    "up_block_types": ["UpBlock2D"] * 3,
    "mid_block_type": "UNetMidBlock2D",
}


@dataclass(frozen=True)
class Run:
    overrides: dict = field(default_factory=dict)  # on top of params.yaml's
    channels_last: bool = False
    compile: bool = False
    bf16: bool = False  # autocast; Lightning's bf16-mixed on a CPU
    fused: bool = False  # AdamW's fused kernel; False: torch's default on a CPU (per tensor)
    batch: int | None = None  # None: --batch


RUNS = {
    "default (params.yaml)": Run(),
    "attention at 4x4 only": Run(overrides=_ATTN_AT_4),
    "widths 32/64/64": Run(overrides={"block_out_channels": [32, 64, 64]}),
    "channels-last memory": Run(channels_last=True),
    "fused AdamW": Run(fused=True),
    "channels-last memory, fused AdamW": Run(channels_last=True, fused=True),
    "bf16 autocast": Run(bf16=True),
    "batch 64": Run(batch=64),
    "cross-attention at 16x16 too": Run(overrides=_ATTN_AT_16),
    "cross-attention at 16x16, up path only": Run(overrides=_ATTN_AT_16_UP),
    "cross-attention at 16x16, no self-attention there": Run(
        overrides={**_ATTN_AT_16, "only_cross_attention": [True, False, False]}
    ),
    "no attention (convolutions only)": Run(overrides=_NO_ATTN),
}


def training_module(unet_params: dict, run: Run) -> LatentDiffusion:
    torch.manual_seed(0)
    cfg = UNetConfig(
        config=unet_params.get("config", "recapflow-tiny-unet"),
        overrides={**(unet_params.get("overrides") or {}), **run.overrides},
        text_map_channels=unet_params.get("text_map_channels", 0),
        layout=unet_params.get("layout", False),
    )
    unet = build_unet(cfg, TEXT_WIDTH, TEXT_WIDTH, LATENT)
    if run.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    module = LatentDiffusion(unet, DiffusionConfig(max_steps=10_000, prediction_type="sample"))
    if run.compile:
        module.unet = torch.compile(module.unet)
    return module


def _batch(n: int, context: int, channels_last: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, *LATENT, generator=g)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    return {
        "latents": latents,
        "states": torch.randn(n, context, TEXT_WIDTH, generator=g),
        "pooled": torch.randn(n, TEXT_WIDTH, generator=g),
    }


def _images_per_s(
    module: LatentDiffusion,
    batch: dict,
    steps: int,
    warmup: int,
    bf16: bool = False,
    fused: bool = False,
) -> float:
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-4, fused=fused or None)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.diffusion_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(batch["latents"]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: params.yaml's")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--compile", action="store_true", help="also the default, compiled")
    ap.add_argument("--out", default="benchmarks/results/unet_layouts.json")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these runs (and the default)")
    args = ap.parse_args()
    section = load_params(args.params)["diffusion_model"]
    unet_params, context = section["unet"], section["text_encoder"]["context_length"]
    args.batch = args.batch or section["batch_size"]
    runs = dict(RUNS)
    if args.only:
        unknown = sorted(set(args.only) - set(runs))
        if unknown:
            ap.error(f"unknown runs {unknown}; known: {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k == "default (params.yaml)" or k in args.only}
    if args.compile:
        runs["torch.compile"] = Run(compile=True)
    modules = {name: training_module(unet_params, run) for name, run in runs.items()}
    params = {name: sum(p.numel() for p in m.unet.parameters()) for name, m in modules.items()}
    batches = {
        name: _batch(run.batch or args.batch, context, run.channels_last)
        for name, run in runs.items()
    }
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    first_round_s: dict[str, float] = {}
    for r in range(args.rounds):
        for name, module in modules.items():
            warmup = args.warmup * (4 if runs[name].compile else 1)
            t0 = time.perf_counter()
            speeds[name].append(
                _images_per_s(
                    module, batches[name], args.steps, warmup, runs[name].bf16, runs[name].fused
                )
            )
            if r == 0:
                first_round_s[name] = time.perf_counter() - t0
    base = statistics.median(speeds["default (params.yaml)"])
    rows = {
        name: {
            "params_M": round(params[name] / 1e6, 2),
            "batch": runs[name].batch or args.batch,
            "images_per_s_median": round(statistics.median(s), 1),
            "images_per_s_all": [round(x, 1) for x in s],
            "ratio_to_default": round(statistics.median(s) / base, 2),
            "first_round_seconds": round(first_round_s[name], 1),
        }
        for name, s in speeds.items()
    }
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "latent": list(LATENT),
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "runs": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
