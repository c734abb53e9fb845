"""Diffusion training throughput: the Lightning path against a plain PyTorch loop on the
same UNet, data path and batch, in one run; and the data path alone.

Targets (issue 4): Lightning / plain >= 0.95 (the framework costs at most 5%); data
loading >= 5x what training consumes. Runs alternate (plain, Lightning, plain, ...) so
drift in the machine's speed hits both; the median of each is reported.

    python -m benchmarks.diffusion_throughput [--steps 60] [--latent 8] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from models.diffusion.model import DiffusionConfig, LatentDiffusion, UNetConfig, build_unet
from models.diffusion.train import MixedLatentDataModule, MixedLatents


def _data(n: int, latent: int, ctx: int, width: int) -> MixedLatents:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, latent, latent, generator=g).half()
    states = torch.randn(3, n, ctx, width, generator=g).half()
    pooled = torch.randn(3, n, width, generator=g).half()
    variants = {e: torch.randint(0, 3, (n,), generator=g).numpy() for e in range(100)}
    return MixedLatents(latents, states, pooled, variants)


def _module(latent: int, width: int, device: str, compile_: bool) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(), width, width, (4, latent, latent))
    if device == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    module = LatentDiffusion(unet, DiffusionConfig(max_steps=10_000))
    if compile_:
        module.unet = torch.compile(module.unet)
    return module


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.n = warmup, None, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            if module.device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.n += len(batch["latents"])

    def on_train_end(self, trainer, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()


def lightning_rate(data, args, device, precision) -> float:
    module = _module(args.latent, args.width, device, args.compile)
    timer = _Timer(args.warmup)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator=device,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        max_epochs=-1,
    )
    trainer.fit(module, datamodule=MixedLatentDataModule(data, args.batch_size, 0, 1))
    return timer.n / (timer.t1 - timer.t0)


def plain_rate(data, args, device, precision) -> float:
    """The same step a plain loop would write: loss, backward, AdamW, scheduler, EMA."""
    module = _module(args.latent, args.width, device, args.compile).to(device)
    module.scheduler.alphas_cumprod = module.scheduler.alphas_cumprod.to(device)
    module.ema.to(device)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    dm = MixedLatentDataModule(data, args.batch_size, 0, 1)
    loader = dm.train_dataloader()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    step, n, t0 = 0, 0, None
    module.train()
    for epoch in range(1000):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = module.diffusion_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            module.ema.step(module.unet.parameters())
            step += 1
            if step == args.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            elif step > args.warmup:
                n += len(batch["latents"])
            if step == args.warmup + args.steps:
                if device == "cuda":
                    torch.cuda.synchronize()
                return n / (time.perf_counter() - t0)
    raise RuntimeError("ran out of epochs")


def loader_rate(data, args) -> float:
    dm = MixedLatentDataModule(data, args.batch_size, 0, 1)
    loader = dm.train_dataloader()
    n, t0 = 0, time.perf_counter()
    for epoch in range(1000):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            n += len(batch["latents"])
            if n >= args.batch_size * (args.warmup + args.steps) * 4:
                return n / (time.perf_counter() - t0)
    raise RuntimeError("ran out of epochs")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--latent", type=int, default=8, help="latent side (8: 32 px at factor 4)")
    ap.add_argument("--width", type=int, default=64, help="text encoder width")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/diffusion_throughput.json")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    data = _data(args.samples, args.latent, 64, args.width)
    plain, light = [], []
    for _ in range(args.repeats):
        plain.append(plain_rate(data, args, device, precision))
        light.append(lightning_rate(data, args, device, precision))
    p, lt = statistics.median(plain), statistics.median(light)
    loading = loader_rate(data, args)
    res = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "settings": {
            "batch_size": args.batch_size,
            "latent": [4, args.latent, args.latent],
            "precision": precision,
            "channels_last": device == "cuda",
            "compile": args.compile,
            "timed_steps": args.steps,
            "repeats": args.repeats,
        },
        "plain_images_per_s": plain,
        "lightning_images_per_s": light,
        "lightning_over_plain": lt / p,
        "data_loading_images_per_s": loading,
        "loading_over_training": loading / max(p, lt),
    }
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
