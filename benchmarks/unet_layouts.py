"""UNet layouts side by side: training images/s of each candidate layout (and of
torch.compile on the default) as a ratio to the default layout, in one run.

Each layout trains `--steps` plain optimizer steps (after `--warmup`) on random latents
and text states of the right shapes; rounds alternate over the layouts so drift in the
machine's speed hits all of them; the median round is reported.

    python -m benchmarks.unet_layouts [--steps 20] [--rounds 3] [--batch 64] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from models.diffusion.model import DiffusionConfig, LatentDiffusion, UNetConfig, build_unet

TEXT_WIDTH, CONTEXT = 64, 64
# name -> (latent shape, UNet config overrides); "default" is the baseline of the ratios.
_ATTN_FROM_8 = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
_ATTN_FROM_4 = {
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
}
LAYOUTS: dict[str, tuple[tuple[int, int, int], dict]] = {
    "default": ((4, 8, 8), {}),
    "8x8, no attention at 8x8": (
        (4, 8, 8),
        {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        },
    ),
    "8x8x8": ((8, 8, 8), {}),
    "16x16, 32/64/128, attention from 8x8": (
        (4, 16, 16),
        {"block_out_channels": [32, 64, 128], **_ATTN_FROM_8},
    ),
    "16x16, 32/64/128, attention at 4x4": (
        (4, 16, 16),
        {"block_out_channels": [32, 64, 128], **_ATTN_FROM_4},
    ),
    "16x16, 32/64/64, attention from 8x8": (
        (4, 16, 16),
        {"block_out_channels": [32, 64, 64], **_ATTN_FROM_8},
    ),
}


def _module(shape: tuple[int, int, int], overrides: dict, compile_: bool) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(overrides=overrides), TEXT_WIDTH, TEXT_WIDTH, shape)
    module = LatentDiffusion(unet, DiffusionConfig(max_steps=10_000))
    if compile_:
        module.unet = torch.compile(module.unet)
    return module


def _batch(shape: tuple[int, int, int], n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(n, *shape, generator=g),
        "states": torch.randn(n, CONTEXT, TEXT_WIDTH, generator=g),
        "pooled": torch.randn(n, TEXT_WIDTH, generator=g),
    }


def _images_per_s(module: LatentDiffusion, batch: dict, steps: int, warmup: int) -> float:
    opt = torch.optim.AdamW(module.unet.parameters(), lr=1e-4)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
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
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also the default, compiled")
    args = ap.parse_args()
    runs = {name: (shape, over, False) for name, (shape, over) in LAYOUTS.items()}
    if args.compile:
        runs["default, torch.compile"] = (*LAYOUTS["default"], True)
    modules = {name: _module(*spec) for name, spec in runs.items()}
    params = {name: sum(p.numel() for p in m.unet.parameters()) for name, m in modules.items()}
    batches = {name: _batch(spec[0], args.batch) for name, spec in runs.items()}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, module in modules.items():
            warmup = args.warmup * (4 if runs[name][2] else 1)  # compilation happens here
            speeds[name].append(_images_per_s(module, batches[name], args.steps, warmup))
    base = statistics.median(speeds["default"])
    rows = {
        name: {
            "latent": list(runs[name][0]),
            "params_M": round(params[name] / 1e6, 2),
            "images_per_s_median": round(statistics.median(s), 1),
            "images_per_s_all": [round(x, 1) for x in s],
            "ratio_to_default": round(statistics.median(s) / base, 2),
        }
        for name, s in speeds.items()
    }
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "batch": args.batch,
                "steps": args.steps,
                "rounds": args.rounds,
                "layouts": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
