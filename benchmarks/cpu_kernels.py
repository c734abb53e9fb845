"""Kernel choices that profiles of `make run` pointed at, each timed against the choice it
would replace, in one run (median of alternating rounds, so drift hits both):

- the preference scorer's training step (params.yaml's width and context, batch 256)
  with PyTorch's default dropout 0.1 in its transformer layers against none: with dropout,
  attention on a CPU takes the unfused path;
- AdamW on the UNet's parameters: per tensor (torch's default on a CPU), foreach, fused;
  and how far the fused kernel's parameters move from the per-tensor ones;
- the world judge's training and inference steps in channels-last memory.

    python -m benchmarks.cpu_kernels [--rounds 3] [--out benchmarks/results/cpu_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.unet_layouts import Run, training_module
from corpus.params import load_params
from models.evaluation.world_judge import JudgeNet
from models.feedback.judge_scorer import JudgeScorer, reading_width


def _median_ms(fn: Callable[[], None], steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def preference_step(params: dict, dropout: float) -> Callable[[], None]:
    cfg = params["preference_model"]
    torch.manual_seed(0)
    resolution = params["autoencoder"]["resolution"]
    judge = JudgeNet(resolution, params["world_judge"].get("width", 32))
    scorer = JudgeScorer(judge, resolution, cfg["width"], cfg["context_length"], dropout).train()
    opt = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=1e-3)
    batch = cfg["batch_size"]
    reading = torch.randn(batch, 9, reading_width(judge))
    ids = torch.randint(1, 1000, (batch, cfg["context_length"]))
    ids[:, 24:] = 0  # prompts are shorter than the context: padding masked

    def step() -> None:
        text = scorer.encode_text(ids)
        logits = torch.stack(
            [scorer.score(reading, *text), scorer.score(reading.flip(0), *text)], 1
        )
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def adamw(weights: list[torch.Tensor], kind: str) -> tuple[list[torch.Tensor], torch.optim.AdamW]:
    ps = [torch.nn.Parameter(w.clone()) for w in weights]
    g = torch.Generator().manual_seed(0)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    options = {
        "per tensor": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    half = len(ps) // 2  # two groups, as warmup_cosine_adamw builds them
    groups = [
        {"params": ps[:half], "weight_decay": 0.01},
        {"params": ps[half:], "weight_decay": 0.0},
    ]
    return ps, torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), **options[kind])


def judge_step(channels_last: bool, train: bool, batch: int) -> Callable[[], None]:
    torch.manual_seed(0)
    net, x = JudgeNet(32, 32).train(train), torch.randn(batch, 3, 32, 32)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step() -> None:
        if not train:
            with torch.no_grad():
                net(x)
            return
        loss = sum(v.float().mean() for v in net(x).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="benchmarks/results/cpu_kernels.json")
    args = ap.parse_args()
    params = load_params(args.params)
    unet = training_module(params["diffusion_model"]["unet"], Run()).unet
    weights = [p.detach() for p in unet.parameters()]
    cases: dict[str, dict[str, Callable[[], Callable[[], None]]]] = {
        "preference scorer step": {
            "dropout 0.1": lambda: preference_step(params, 0.1),
            "dropout 0": lambda: preference_step(params, 0.0),
        },
        "AdamW step, UNet parameters": {
            kind: (lambda kind=kind: adamw(weights, kind)[1].step)
            for kind in ("per tensor", "foreach", "fused")
        },
        "world judge training step, batch 128": {
            "contiguous": lambda: judge_step(False, True, 128),
            "channels-last": lambda: judge_step(True, True, 128),
        },
        "world judge inference, batch 256": {
            "contiguous": lambda: judge_step(False, False, 256),
            "channels-last": lambda: judge_step(True, False, 256),
        },
    }
    results: dict[str, dict] = {}
    for case, choices in cases.items():
        ms: dict[str, list[float]] = {name: [] for name in choices}
        for _ in range(args.rounds):
            for name, make in choices.items():
                ms[name].append(_median_ms(make(), args.steps))
        base = statistics.median(next(iter(ms.values())))
        results[case] = {
            name: {
                "ms_median": round(statistics.median(v), 2),
                "ms_rounds": [round(x, 2) for x in v],
                "speed_vs_first": round(base / statistics.median(v), 2),
            }
            for name, v in ms.items()
        }
    per_tensor, per_tensor_opt = adamw(weights, "per tensor")
    fused, fused_opt = adamw(weights, "fused")
    for _ in range(100):
        per_tensor_opt.step()
        fused_opt.step()
    drift = max((a - b).abs().max().item() for a, b in zip(per_tensor, fused, strict=True))
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "steps": args.steps,
        "cases": results,
        "fused_vs_per_tensor_largest_parameter_difference_after_100_steps": drift,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    for case, rows in results.items():
        print(case)
        for name, r in rows.items():
            print(f"  {name:14s} {r['ms_median']:9.2f} ms  x{r['speed_vs_first']:.2f}")
    print(f"fused vs per-tensor AdamW after 100 steps: largest parameter difference {drift:.1e}")


if __name__ == "__main__":
    main()
