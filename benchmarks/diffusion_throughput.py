"""Diffusion training throughput and model FLOP utilisation, on any device: params.yaml's
diffusion model (its UNet, text-map conditioning and loss) trained by the Lightning path
and by a plain PyTorch loop on the same data path, at the resolutions and batch sizes
asked for; and the data path alone.

Targets (issue 4): Lightning / plain >= 0.95 (the framework costs at most 5%); data
loading >= 5x what training consumes. Issue 20 item 7: images/s and model FLOP
utilisation (MFU) on a GPU at 64 px.

MFU is the model's own FLOPs per image (forward and backward, counted by
`torch.utils.flop_counter` on one step) times images/s, over a ceiling measured in the
same run: a large matrix product in the training precision (bf16 on a GPU, fp32 on a
CPU). `--peak-tflops` adds the datasheet's number as a second denominator. Runs
alternate (plain, Lightning, plain, ...) so drift in the machine's speed hits both; the
median of each is reported.

    python -m benchmarks.diffusion_throughput [--resolution 32 64] [--batch 32 256]
        [--steps 60] [--compile] [--peak-tflops 989]
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
from torch.utils.flop_counter import FlopCounterMode

from corpus.params import load_params
from models.diffusion.autoencoder import AutoencoderConfig, build_autoencoder
from models.diffusion.model import LatentDiffusion, build_unet
from models.diffusion.train import (
    DiffusionTrainConfig,
    MixedLatentDataModule,
    MixedLatents,
    ResumableBatchSampler,
)


def latent_shape(params: dict, resolution: int) -> tuple[int, ...]:
    """The latent an image of `resolution` px becomes under params.yaml's autoencoder."""
    section = {**params["autoencoder"], "resolution": resolution}
    cfg = AutoencoderConfig.from_dict(section)
    if not cfg.pretrained:
        # The tiny configs name their own sample size; the run's resolution replaces it.
        cfg = AutoencoderConfig.from_dict(
            {**section, "overrides": {**(cfg.overrides or {}), "sample_size": resolution}}
        )
    vae = build_autoencoder(cfg)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, resolution, resolution)).latent_dist.mode()
    return tuple(z.shape[1:])


def _data(n: int, latent: tuple[int, ...], ctx: int, width: int) -> MixedLatents:
    g = torch.Generator().manual_seed(0)
    # Objects on a flat background, so the foreground weighting does its real work.
    latents = torch.randn(n, *latent, generator=g).half()
    states = torch.randn(3, n, ctx, width, generator=g).half()
    pooled = torch.randn(3, n, width, generator=g).half()
    variants = {e: torch.randint(0, 3, (n,), generator=g).numpy() for e in range(1000)}
    return MixedLatents(latents, states, pooled, variants)


def _module(cfg: DiffusionTrainConfig, latent, width, device, compile_) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, width, width, latent)
    if device == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    module = LatentDiffusion(unet, cfg.diffusion)
    if compile_:
        module.unet = torch.compile(module.unet)
    return module


def _loader(data: MixedLatents, batch: int) -> torch.utils.data.DataLoader:
    """The training data path as Lightning drives it, for loops without a trainer."""
    sampler = ResumableBatchSampler(len(data), batch, 0, lambda: 0)
    return torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.n = warmup, None, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            _sync(module.device.type)
            self.t0 = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.n += len(batch["latents"])

    def on_train_end(self, trainer, module) -> None:
        _sync(module.device.type)
        self.t1 = time.perf_counter()


def lightning_rate(module, data, batch, args, device, precision) -> float:
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
    trainer.fit(module, datamodule=MixedLatentDataModule(data, batch, 0, 1))
    return timer.n / (timer.t1 - timer.t0)


def _prepare(module: LatentDiffusion, device: str):
    module.to(device)
    module.scheduler.alphas_cumprod = module.scheduler.alphas_cumprod.to(device)
    module.ema.to(device)
    opt_cfg = module.configure_optimizers()
    return opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]


def plain_rate(module, data, batch, args, device, precision, warmup=None) -> float:
    """The step a plain loop would write: loss, backward, AdamW, scheduler, EMA."""
    warmup = warmup or args.warmup
    opt, sched = _prepare(module, device)
    loader = _loader(data, batch)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    step, n, t0 = 0, 0, 0.0
    module.train()
    for epoch in range(1000):
        loader.sampler.set_epoch(epoch)
        for b in loader:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with autocast:
                loss = module.diffusion_loss(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            module.ema.step(module.unet.parameters())
            step += 1
            if step == warmup:
                _sync(device)
                t0 = time.perf_counter()
            elif step > warmup:
                n += len(b["latents"])
            if step == warmup + args.steps:
                _sync(device)
                return n / (time.perf_counter() - t0)
    raise RuntimeError("ran out of epochs")


def flops_per_image(module, data, batch: int, device: str, precision: str) -> float:
    """Forward and backward FLOPs of one training step, per image."""
    _prepare(module, device)
    b = _loader(data, batch)
    b.sampler.set_epoch(0)
    b = {k: v.to(device) for k, v in next(iter(b)).items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with FlopCounterMode(display=False) as counter, autocast:
        module.diffusion_loss(b).backward()
    module.unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_tflops(device: str, precision: str) -> float:
    """The ceiling MFU is measured against: a large matrix product's rate on this device,
    in the precision training runs in (random operands: zeros run faster)."""
    n = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 10 if device == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def loader_rate(data, batch: int, images: int) -> float:
    loader = _loader(data, batch)
    n, t0 = 0, time.perf_counter()
    for epoch in range(1000):
        loader.sampler.set_epoch(epoch)
        for b in loader:
            n += len(b["latents"])
            if n >= images:
                return n / (time.perf_counter() - t0)
    raise RuntimeError("ran out of epochs")


def measure(cfg, params, resolution, batch, args, device, precision, ceiling) -> dict:
    width = json.loads(
        (Path("models/configs") / f"{cfg.text_encoder.config}.json").read_text()
    ).get("hidden_size", 64)
    latent = latent_shape(params, resolution)
    data = _data(max(args.samples, batch * 4), latent, cfg.text_encoder.context_length, width)
    build = lambda c=False: _module(cfg, latent, width, device, c)  # noqa: E731
    first = build()
    n_params = sum(x.numel() for x in first.unet.parameters())
    flops = flops_per_image(first, data, min(batch, 64), device, precision)
    plain, light = [], []
    for _ in range(args.repeats):
        plain.append(plain_rate(build(), data, batch, args, device, precision))
        light.append(lightning_rate(build(), data, batch, args, device, precision))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        plain_rate(build(), data, batch, args, device, precision)
    p, lt = statistics.median(plain), statistics.median(light)
    row = {
        "resolution": resolution,
        "latent": list(latent),
        "batch": batch,
        "unet_params_M": round(n_params / 1e6, 3),
        "gflops_per_image": round(flops / 1e9, 3),
        "plain_images_per_s": [round(x, 1) for x in plain],
        "lightning_images_per_s": [round(x, 1) for x in light],
        "lightning_over_plain": round(lt / p, 3),
        "mfu_vs_measured_matmul": round(flops * lt / (ceiling * 1e12), 4),
        "loading_over_training": round(loader_rate(data, batch, batch * 200) / max(p, lt), 1),
    }
    if args.peak_tflops:
        row["mfu_vs_datasheet"] = round(flops * lt / (args.peak_tflops * 1e12), 4)
    if device == "cuda":
        row["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.compile:
        t0 = time.perf_counter()
        compiled = plain_rate(build(True), data, batch, args, device, precision, args.warmup * 3)
        row["compiled_plain_images_per_s"] = round(compiled, 1)
        row["compiled_over_plain"] = round(compiled / p, 3)
        row["compiled_mfu_vs_measured_matmul"] = round(flops * compiled / (ceiling * 1e12), 4)
        row["compile_and_run_s"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows: list[dict]) -> str:
    cols = [
        ("px", "resolution"),
        ("latent", "latent"),
        ("batch", "batch"),
        ("GFLOP/img", "gflops_per_image"),
        ("Lightning img/s", "lightning_images_per_s"),
        ("L/plain", "lightning_over_plain"),
        ("MFU", "mfu_vs_measured_matmul"),
        ("compiled img/s", "compiled_plain_images_per_s"),
        ("compiled MFU", "compiled_mfu_vs_measured_matmul"),
    ]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, k in cols:
            v = r.get(k, "-")
            if k == "lightning_images_per_s":
                v = round(statistics.median(v), 1)
            elif k == "latent":
                v = "x".join(str(x) for x in v[1:] + v[:1])
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--resolution", type=int, nargs="+", default=None, help="default: params'")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default: params'")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--compile", action="store_true", help="also the plain loop compiled")
    ap.add_argument("--peak-tflops", type=float, help="the device's datasheet rate, if wanted")
    ap.add_argument(
        "--precision", default="auto", help="auto: bf16-mixed on a GPU, 32-true on a CPU"
    )
    ap.add_argument("--out", default="benchmarks/results/diffusion_throughput.json")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    cfg = DiffusionTrainConfig.from_dict(params["diffusion_model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision
    if precision == "auto":
        precision = "bf16-mixed" if device == "cuda" else "32-true"
    ceiling = matmul_tflops(device, precision)
    res = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "channels_last": device == "cuda",
        "measured_matmul_tflops": round(ceiling, 1),
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "rows": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for resolution in args.resolution or [params["autoencoder"]["resolution"]]:
        for batch in args.batch or [cfg.batch_size]:
            res["rows"].append(
                measure(cfg, params, resolution, batch, args, device, precision, ceiling)
            )
            out.write_text(json.dumps(res, indent=2))  # each row kept if a later one dies
            print(json.dumps(res["rows"][-1]), flush=True)
    print(f"{res['device']}, {precision}, measured matmul {ceiling:.1f} TFLOP/s")
    print(_table(res["rows"]))
    return res


if __name__ == "__main__":
    main()
