"""Pretrain the contrastive text tower on fresh scenes and probe what it reads.

Scenes drawn from the world (seed 0), each captioned once, alternately short and
descriptive, rendered at 32 px; the tower trained by `pretrain_text_encoder` with the
given settings, then `probe_text_encoder` on 4,000 fresh captions. Writes `probes.json`
in `--out`; the folder also loads as a `text_encoder.pretrained`.

    python -m benchmarks.text_tower --out data/te/hn1000 --steps 1000 --hard-negatives

`--partner judge` is a diagnostic, not a recipe: the partner is the world judge (the
evaluator) locked, its per-cell class probabilities through a trainable linear head, so
the text tower is paired with an image side that reads every scene exactly. It says how
far the contrastive objective can take the text tower when its partner is not the limit.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from corpus.scene_text import descriptive_caption, short_caption
from corpus.world import WorldConfig, sample_scene
from models.diffusion.text_encoder import (
    TextEncoderConfig,
    TextPretrainConfig,
    load_text_encoder,
    pretrain_text_encoder,
)
from models.diffusion.text_partner import LockedReader, captioner_partner
from models.diffusion.text_probes import probe_text_encoder
from models.evaluation.world_judge import load_judge, render_scenes


class LockedJudge(LockedReader):
    """The world judge's net, locked (its batch norms too), read out as per-cell class
    probabilities and background probabilities, then a trainable linear map to the text
    tower's projection width."""

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        out = self.locked(x)
        cells = [out[k].softmax(-1).flatten(1) for k in ("shape", "colour", "size", "word")]
        return torch.cat([*cells, out["background"].softmax(-1)], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenes", type=int, default=20_000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--image-width", type=int, default=32)
    p.add_argument("--hard-negatives", action="store_true")
    p.add_argument("--context-length", type=int, default=96)
    p.add_argument("--threads", type=int, default=None)
    partners = ["cnn", "judge", "captioner", "captioner+cnn"]
    p.add_argument("--partner", choices=partners, default="cnn")
    p.add_argument("--concepts", type=Path, default=Path("data/captioner/concepts"))
    p.add_argument("--judge", type=Path, default=Path("data/world_judge"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    scenes = [sample_scene(rng, WorldConfig()) for _ in range(args.scenes)]
    texts = [
        descriptive_caption(s, rng) if i % 2 else short_caption(s) for i, s in enumerate(scenes)
    ]
    images = render_scenes(scenes, 32)
    pretrain = TextPretrainConfig(
        max_steps=args.steps, hard_negatives=args.hard_negatives, image_width=args.image_width
    )
    cfg = TextEncoderConfig(context_length=args.context_length, pretrain=pretrain)
    start = time.time()
    tower = None
    if args.partner == "judge":
        net = load_judge(args.judge).net
        tower = lambda dim: LockedJudge(net, dim)  # noqa: E731
    elif args.partner.startswith("captioner"):
        tower = captioner_partner(args.partner, args.concepts, args.image_width)
    metrics = pretrain_text_encoder(cfg, images, texts, args.out, image_tower=tower)
    probes = probe_text_encoder(load_text_encoder(args.out, args.context_length), 4000)
    result = {"metrics": metrics, "probes": probes, "seconds": time.time() - start}
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    (args.out / "probes.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"pooled": probes["pooled"], "tokens": probes["tokens"]}, indent=1))


if __name__ == "__main__":
    main()
