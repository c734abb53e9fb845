"""Where does a trained model's x0 prediction draw objects that are not there?

Training images from the lineage's latent cache are noised to each timestep and the
model predicts the clean latent from their recaptioned captions. A position counts as
drawn when the prediction differs from its own per-channel median by more than the
threshold `diffusion.foreground_weight` uses (models/diffusion/model.py); the same rule
on the clean latent says where the objects are. Printed per timestep: the share of the
image drawn, and the share of true background and of true object positions drawn. An
unbiased estimate of an uncertain place draws an object there only as often as one
stands there; a loss weight set by the clean latent alone leans it towards drawing one
(docs/log/2026-12-generator.md).

    python -m benchmarks.foreground_bias --model data/diffusion_model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from models.diffusion.model import noise_scheduler, object_positions
from models.diffusion.text_to_image import load_text_to_image


@torch.no_grad()
def foreground_bias(
    model: Path, work: Path, sampler: Path, n: int = 256, seed: int = 0
) -> dict[int, dict[str, float]]:
    pipe = load_text_to_image(model)
    caches = sorted(work.glob("latents-*.safetensors"))
    if len(caches) != 1:
        raise FileNotFoundError(f"expected one latents-*.safetensors in {work}, found {caches}")
    latents = load_file(str(caches[0]))["latents"][:n].float()
    # The cache holds the sampler's images in the order of its captions table.
    captions = pd.read_parquet(sampler / "captions.parquet")["synthetic"].tolist()[:n]
    states, pooled = pipe.text_encoder(captions)
    labels = pooled if pipe.unet.config.class_embed_type == "projection" else None
    scheduler, truth = noise_scheduler(pipe.diffusion), object_positions(latents)
    torch.manual_seed(seed)
    out = {"true_foreground": truth.float().mean().item()}
    for t in (950, 800, 600, 400, 200):
        ts = torch.full((len(latents),), t)
        noisy = scheduler.add_noise(latents, torch.randn_like(latents), ts)
        pred = pipe.unet(noisy, ts, encoder_hidden_states=states, class_labels=labels).sample
        drawn = object_positions(pred)
        out[t] = {
            "drawn": drawn.float().mean().item(),
            "background_drawn": drawn[~truth].float().mean().item(),
            "objects_drawn": drawn[truth].float().mean().item(),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("data/diffusion_model"))
    ap.add_argument("--work", type=Path, default=Path("data/work/diffusion_model"))
    ap.add_argument("--sampler", type=Path, default=Path("data/mixed_sampler"))
    ap.add_argument("-n", type=int, default=256)
    args = ap.parse_args()
    result = foreground_bias(args.model, args.work, args.sampler, args.n)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
