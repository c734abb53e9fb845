"""The diffusion model's text encoder, built as a step of its own (asset `text_encoder`).

    python -m models.diffusion.text_tower --params params.yaml --raw data/raw \\
        --sampler data/mixed_sampler --captioner data/captioner --out data/text_encoder

Tiny profile: a CLIP text tower pretrained contrastively on the sampler's captions and
their images (models/diffusion/text_encoder.py), then probed for what its states carry
(models/diffusion/text_probes.py). `full`: the pretrained CLIP text model or T5 encoder
that `text_encoder.pretrained` names is probed only; its weights stay where they are.

`metrics.json` holds the tag of what the encoder was built from (its settings, the
captions, the contrastive partner's weights, the seed), the pretraining metrics and the
probes. The UNet's training reads the folder and refuses one whose tag is not the tag of
its own settings and captions. As its own step, the encoder is reused when only the
UNet, the layout model or the diffusion settings change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from corpus.atomic import replace_dir
from corpus.caption_mix import read_manifest
from corpus.params import json_digest, load_section
from models.common.data import load_images
from models.diffusion.masked_text import pretrain_masked_text_encoder
from models.diffusion.text_encoder import (
    FrozenTextEncoder,
    TextEncoderConfig,
    load_text_encoder,
    pretrain_text_encoder,
)
from models.diffusion.text_partner import captioner_partner
from models.diffusion.text_probes import TEXT_PROBES, probe_text_encoder

# Part of the tag: bump it when a code change alters what the same settings and captions
# train. 2: pooled at EOS (models/diffusion/text_encoder.py).
RECIPE = 2
METRICS = "metrics.json"


def text_encoder_tag(
    tcfg: TextEncoderConfig, texts: list[str], seed: int, captioner: str | Path | None = None
) -> str:
    """What the tiny text encoder's pretraining depends on: its settings, the recipe and,
    when it learns from the corpus (contrastive), the captions themselves (a new
    captioner's captions retrain it) and its partner's weights."""
    captions_md5 = partner_md5 = None
    if tcfg.objective == "contrastive":
        captions_md5 = hashlib.md5("\n".join(texts).encode()).hexdigest()
        if tcfg.pretrain.partner.startswith("captioner") and captioner:
            files = sorted(Path(captioner, "concepts").glob("*.safetensors"))
            partner_md5 = [hashlib.md5(f.read_bytes()).hexdigest() for f in files]
    return json_digest([asdict(tcfg), captions_md5, partner_md5, seed, RECIPE], length=16)


def tower_settings(section: dict) -> tuple[TextEncoderConfig, int, int]:
    """(encoder settings, seed, probe captions) from params.yaml's `diffusion_model`
    section: the part of it the encoder is built from. The training process checks the
    whole section (models/diffusion/train.py imports the UNet, which this step must not,
    or a UNet change would rebuild the encoder)."""
    probes = section.get("eval", {}).get("text_probes", TEXT_PROBES)
    return (
        TextEncoderConfig.from_dict(section.get("text_encoder", {})),
        section.get("seed", 0),
        probes,
    )


def sampler_captions(sampler: Path) -> tuple[list[str], list[str], list[str]]:
    """(keys, shards, captions) of the sampler's rows: each row's caption in the first
    epoch's blend, the text the tiny encoder pretrains on."""
    path = Path(sampler) / "captions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: materialize mixed_sampler first")
    rows = pd.read_parquet(path, columns=["key", "shard"])
    keys = rows["key"].tolist()
    texts = read_manifest(Path(sampler), 0).set_index("key").loc[keys, "caption"].tolist()
    return keys, rows["shard"].tolist(), texts


def build_text_encoder(
    tcfg: TextEncoderConfig,
    out: Path,
    texts: list[str],
    images: Callable[[], torch.Tensor],
    *,
    seed: int = 0,
    captioner: str | Path | None = None,
    probes: int = TEXT_PROBES,
    logger: L.pytorch.loggers.Logger | None = None,
    info: Callable[[str], None] = print,
) -> dict:
    """The encoder of `tcfg` in `out` (pretrained there, or named there when it is a
    pretrained model), probed on `probes` captions (0: not probed). A folder already built
    with the same tag is kept as it is. `images()` (uint8, one per text) is called only
    when the contrastive pretraining needs them. Returns `out/metrics.json`'s record."""
    out = Path(out)
    tag = text_encoder_tag(tcfg, texts, seed, captioner)
    if (out / METRICS).exists():
        record = json.loads((out / METRICS).read_text())
        if record.get("tag") == tag and record.get("probed") == probes:
            return record
    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if tcfg.pretrained:
        pretraining = None
    elif tcfg.objective == "masked":
        info("pretraining the text encoder on the world's text (masked tokens)")
        pretraining = pretrain_masked_text_encoder(tcfg, tmp, logger, seed)
    else:
        info("pretraining the text encoder contrastively on the corpus")
        partner = None
        if tcfg.pretrain.partner != "cnn":
            partner = captioner_partner(
                tcfg.pretrain.partner, Path(captioner) / "concepts", tcfg.pretrain.image_width
            )
        pretraining = pretrain_text_encoder(
            tcfg, images(), texts, tmp, logger, seed, image_tower=partner
        )
    record = {"tag": tag, "pretrained": tcfg.pretrained, "pretraining": pretraining}
    encoder = _load(tcfg, tmp, record)
    t = time.perf_counter()
    record["probes"] = probe_text_encoder(encoder, probes) if probes else None
    record["probed"] = probes
    now = time.perf_counter()
    record["seconds"] = {"probes_s": now - t, "total_s": now - t0}
    (tmp / METRICS).write_text(json.dumps(record, indent=2) + "\n")
    replace_dir(tmp, out)
    info(f"text encoder built in {record['seconds']['total_s']:.0f} s: {pretraining}")
    return record


def probe_metrics(probes: dict | None) -> dict[str, float]:
    """The probes as flat MLflow metrics, text_probe/<where>/<kind> (None: not probed)."""
    if not probes:
        return {}
    flat = {f"text_probe/pooled/{k}": v for k, v in probes["pooled"].items()}
    for where, acc in probes["tokens"].items():
        flat.update({f"text_probe/{where}/{k}": v for k, v in acc.items()})
    return {k: v for k, v in flat.items() if v is not None}  # None: nothing to probe


def _load(tcfg: TextEncoderConfig, folder: Path, record: dict) -> FrozenTextEncoder:
    if record.get("pretrained"):
        return load_text_encoder(
            record["pretrained"], tcfg.context_length, tcfg.subfolder, tcfg.tokenizer_subfolder
        )
    return load_text_encoder(folder, tcfg.context_length)


def load_built_text_encoder(
    folder: Path, tcfg: TextEncoderConfig, tag: str
) -> tuple[FrozenTextEncoder, dict]:
    """(encoder, record) of a folder `build_text_encoder` wrote for the settings and
    captions whose tag is `tag`; any other folder is refused, naming what to rebuild."""
    path = Path(folder) / METRICS
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing: materialize the text_encoder asset first "
            f"(python -m models.diffusion.text_tower --out {folder})"
        )
    record = json.loads(path.read_text())
    if record.get("tag") != tag:
        raise ValueError(
            f"{folder} holds a text encoder built from other settings or captions (tag "
            f"{record.get('tag')}, this training's {tag}): materialize text_encoder again"
        )
    return _load(tcfg, Path(folder), record), record


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the diffusion model's text encoder.")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--sampler", type=Path, default=Path("data/mixed_sampler"))
    ap.add_argument("--captioner", type=Path, default=Path("data/captioner"))
    ap.add_argument("--out", type=Path, default=Path("data/text_encoder"))
    args = ap.parse_args()
    tcfg, seed, probes = tower_settings(load_section(args.params, "diffusion_model"))
    resolution = load_section(args.params, "autoencoder")["resolution"]
    keys, shards, texts = sampler_captions(args.sampler)
    record = build_text_encoder(
        tcfg,
        args.out,
        texts,
        lambda: load_images(args.raw, keys, shards, resolution),
        seed=seed,
        captioner=args.captioner,
        probes=probes,
    )
    print(json.dumps({k: v for k, v in record.items() if k != "probes"}, indent=2))


if __name__ == "__main__":
    main()
