"""The two uses RAHF made of its predictions, each measured against a random baseline.

- **Region repair**: the pixels either predicted map flags (above `threshold`) are
  resampled by masked denoising with the same model (`models/feedback/repair.py`); the
  baseline resamples as many latent positions of the same image chosen at random. Both
  are judged again: how many failed conditions now hold, how many held ones broke.
- **Data selection**: the model draws candidates for training prompts; the `k` with the
  highest predicted overall score, or `k` chosen at random, fine-tune a copy of its UNet
  for `steps` steps; all-conditions on held-out prompts before and after each.
"""

from __future__ import annotations

import copy
import dataclasses

import lightning as L
import numpy as np
import torch

from corpus.prompt_suite import Prompt, condition_holds
from models.diffusion.model import LatentDiffusion
from models.feedback.repair import latent_mask, repair
from models.feedback.rich_model import word_tokens


@torch.no_grad()
def predict_rich(module, tokenizer, images: torch.Tensor, texts: list[str]) -> dict:
    """Predicted maps (N, 2, H, W) and overall scores (N,) of images with their prompts."""
    module.eval()
    ids = torch.stack([word_tokens(tokenizer, t, module.cfg.context)[0] for t in texts])
    maps, overall = [], []
    for i in range(0, len(texts), 128):
        out = module({"images": images[i : i + 128], "ids": ids[i : i + 128]})
        maps.append(out["heatmaps"])
        overall.append(out["scores"][:, -1])
    return {"maps": torch.cat(maps), "overall": torch.cat(overall)}


def _held(judge, images: torch.Tensor, prompts: list[Prompt]) -> list[list[bool]]:
    scenes = judge.predict(images)
    return [
        [condition_holds(c, s) for c in p.conditions] for p, s in zip(prompts, scenes, strict=True)
    ]


def _changes(before: list[list[bool]], after: list[list[bool]]) -> dict:
    fixed = sum(
        not b and a
        for bs, as_ in zip(before, after, strict=True)
        for b, a in zip(bs, as_, strict=True)
    )
    broken = sum(
        b and not a
        for bs, as_ in zip(before, after, strict=True)
        for b, a in zip(bs, as_, strict=True)
    )
    return {
        "fixed": int(fixed),
        "broken": int(broken),
        "failed_before": int(sum(not b for bs in before for b in bs)),
        "all_conditions_before": float(np.mean([all(bs) for bs in before])),
        "all_conditions_after": float(np.mean([all(a) for a in after])),
    }


def random_like(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Per image, as many flagged positions as `mask` (N, 1, s, s) has, placed at random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask)
    flat = out.view(len(mask), -1)
    for i, n in enumerate(mask.view(len(mask), -1).sum(1).long().tolist()):
        flat[i, torch.randperm(flat.shape[1], generator=g)[:n]] = 1
    return out


def repair_study(
    pipe,
    module,
    tokenizer,
    judge,
    images: torch.Tensor,
    prompts: list[Prompt],
    texts: list[str],
    threshold: float = 0.5,
    seed: int = 0,
) -> dict:
    """Repair by predicted maps against repair of random regions of the same size."""
    pred = predict_rich(module, tokenizer, images, texts)
    pixels = pred["maps"].amax(1) > threshold
    latent = pipe.unet.config.sample_size
    flagged = latent_mask(pixels, latent)
    shuffled = random_like(flagged, seed)
    up = images.shape[-1] // latent
    before = _held(judge, images, prompts)
    out = {"threshold": threshold, "images": len(images), "flagged_share": float(flagged.mean())}
    for name, m in (("predicted", flagged), ("random", shuffled)):
        px = m[:, 0].repeat_interleave(up, 1).repeat_interleave(up, 2) > 0
        fixed = repair(pipe, images, px, texts, seed=seed)
        out[name] = _changes(before, _held(judge, fixed, prompts))
    return out


def _finetune(pipe, images: torch.Tensor, texts: list[str], steps: int, lr: float, seed: int):
    """A copy of the pipeline whose UNet is fine-tuned on (image, text) pairs."""
    torch.manual_seed(seed)
    tuned = copy.copy(pipe)
    tuned.unet = copy.deepcopy(pipe.unet).train()
    with torch.no_grad():
        scale = pipe.vae.config.scaling_factor
        from models.diffusion.autoencoder import to_model_range

        z = pipe.vae.encode(to_model_range(images)).latent_dist.mode() * scale
        states, pooled = pipe.text_encoder(texts)
    data = [{"latents": z[i], "states": states[i], "pooled": pooled[i]} for i in range(len(z))]
    cfg = dataclasses.replace(pipe.diffusion, lr=lr, max_steps=steps, warmup_steps=0)
    module = LatentDiffusion(tuned.unet, cfg)
    loader = torch.utils.data.DataLoader(data, batch_size=min(32, len(data)), shuffle=True)
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    ).fit(module, loader)
    tuned.unet = module.unet.eval()
    return tuned


def all_conditions(pipe, judge, prompts: list[Prompt], texts: list[str], seed: int) -> float:
    images = pipe(texts, seed=seed)
    return float(np.mean([all(h) for h in _held(judge, images, prompts)]))


def selection_study(
    pipe,
    module,
    tokenizer,
    judge,
    train: list[tuple[Prompt, str]],
    held_out: list[tuple[Prompt, str]],
    k: int,
    steps: int,
    lr: float,
    seed: int = 0,
) -> dict:
    """Fine-tune on the k candidates with the highest predicted overall score against k
    chosen at random; all-conditions on held-out prompts before and after."""
    texts = [t for _, t in train]
    candidates = pipe(texts, seed=seed)
    overall = predict_rich(module, tokenizer, candidates, texts)["overall"]
    top = torch.argsort(overall, descending=True)[:k]
    rand = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:k]
    eval_prompts, eval_texts = [p for p, _ in held_out], [t for _, t in held_out]
    out = {
        "k": k,
        "candidates": len(texts),
        "steps": steps,
        "before": all_conditions(pipe, judge, eval_prompts, eval_texts, seed + 1),
    }
    for name, idx in (("predicted_top", top), ("random", rand)):
        chosen = [texts[i] for i in idx.tolist()]
        tuned = _finetune(pipe, candidates[idx], chosen, steps, lr, seed)
        truth = _held(judge, candidates[idx], [train[i][0] for i in idx.tolist()])
        out[name] = {
            "chosen_all_conditions": float(np.mean([all(h) for h in truth])),
            "after": all_conditions(tuned, judge, eval_prompts, eval_texts, seed + 1),
        }
    return out
