"""One frozen text encoder for every variant of the caption ablation: the role of the
DALL-E 3 report's public T5, which every caption blend trained against.

The tiny contrastive encoder of `diffusion_model` learns from the training images and
their captions, so a blend of alt-text would also get a worse encoder. This one is
pretrained once, the same way (`pretrain_text_encoder`, params.yaml's settings and
partner), on a world of its own: scenes drawn from `TEXT_SEED`, rendered, and paired in
turn with their descriptive caption, their short caption and an alt-text, so no caption
kind is favoured and no training image is seen.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch

from corpus.atomic import replace_dir, write_text_atomic
from corpus.scene_text import (
    NoiseRates,
    alt_text,
    descriptive_caption,
    draw_noise_kind,
    short_caption,
)
from corpus.world import WorldConfig, render, sample_scene
from models.common.data import fit_square
from models.diffusion.masked_text import TEXT_SEED
from models.diffusion.text_encoder import TextEncoderConfig, pretrain_text_encoder
from models.diffusion.text_partner import captioner_partner


def world_pairs(
    n: int, resolution: int, world: WorldConfig, noise: NoiseRates, seed: int = TEXT_SEED
) -> tuple[torch.Tensor, list[str]]:
    """`n` (image, caption) pairs of fresh scenes: uint8 (n, 3, resolution, resolution),
    read the way training images are, and captions cycling descriptive, short, alt-text
    (an alt-text may be empty: such a pair is dropped by the pretraining)."""
    rng = random.Random(seed)
    images, texts = [], []
    for i in range(n):
        scene = sample_scene(rng, world)
        images.append(fit_square(render(scene, world.image_size), resolution))
        kind = i % 3
        if kind == 0:
            texts.append(descriptive_caption(scene, rng))
        elif kind == 1:
            texts.append(short_caption(scene))
        else:
            texts.append(alt_text(scene, draw_noise_kind(rng, noise), rng))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), texts


def weights_digest(folder: Path) -> str:
    """sha256 over the encoder's weight and tokenizer files: the same digest in two
    variants means the same encoder."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".txt") and f.name != "done.json":
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def build_shared_text_encoder(
    tcfg: TextEncoderConfig,
    out: Path,
    captioner: Path | None,
    resolution: int,
    pairs: int,
    world: WorldConfig,
    noise: NoiseRates,
    seed: int = 0,
    logger: L.pytorch.loggers.Logger | None = None,
) -> dict:
    """Pretrain the shared encoder into `out` unless `out` already holds one built from
    the same settings (a resumed study reuses it). Returns `out/done.json`'s record:
    the settings' tag, the weights' digest and the pretraining metrics."""
    if tcfg.pretrained:
        raise ValueError(
            "a pretrained text encoder is shared by every variant as it is: "
            "nothing to build (the ablation passes it to each variant unchanged)"
        )
    partner_md5 = None
    if tcfg.pretrain.partner.startswith("captioner"):
        if captioner is None:
            raise ValueError(f"partner {tcfg.pretrain.partner!r} needs the captioner's folder")
        files = sorted(Path(captioner, "concepts").glob("*.safetensors"))
        partner_md5 = [hashlib.md5(f.read_bytes()).hexdigest() for f in files]
    spec = {
        "text_encoder": asdict(tcfg),
        "partner_md5": partner_md5,
        "resolution": resolution,
        "pairs": pairs,
        "world": asdict(world),
        "noise": asdict(noise),
        "world_seed": TEXT_SEED,
        "seed": seed,
    }
    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()).get("tag") == tag:
        return json.loads(done.read_text())
    images, texts = world_pairs(pairs, resolution, world, noise)
    partner = None
    if tcfg.pretrain.partner != "cnn":
        partner = captioner_partner(
            tcfg.pretrain.partner, Path(captioner) / "concepts", tcfg.pretrain.image_width
        )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed build's half
    metrics = pretrain_text_encoder(tcfg, images, texts, tmp, logger, seed, image_tower=partner)
    record = {"tag": tag, "digest": weights_digest(tmp), "metrics": metrics, "spec": spec}
    write_text_atomic(tmp / "done.json", json.dumps(record, indent=2))
    replace_dir(tmp, out)
    return record
