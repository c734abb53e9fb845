"""Train the captioner in the report's phases, each with its own checkpoint:

0. `clip`     (tiny only) the CLIP image encoder, contrastively on (image, alt-text);
1. `pretrain` the captioner on every (image, alt-text) pair of the training split;
2. `ssc`      fine-tuned from `pretrain` on the human subset's short captions;
3. `dsc`      fine-tuned from `pretrain` on the human subset's descriptive captions.

A finished phase leaves `<out>/<phase>/done.json`; a rerun with the same configuration
skips it, so a killed run resumes at the phase it was in. Curves, hyperparameters, sample
captions and caption quality on the held-out split go to one MLflow run.

    python -m models.captioning.train --params params.yaml --raw data/raw --out data/captioner
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from safetensors.torch import load_file

from corpus.caption_metrics import caption_quality
from corpus.config import build_config
from corpus.params import json_digest, load_section
from corpus.scene_text import mirror_caption
from corpus.shards import read_json_sidecars
from corpus.world import Scene
from models.captioning.captioner import CaptionerSpec, GenerationConfig, PrefixCaptioner
from models.captioning.concepts import (
    CELL_CLASSES,
    CELL_HEADS_FILE,
    ConceptModule,
    cell_targets,
    save_cell_heads,
    word_targets,
)
from models.common.clip import ClipPretrainModule, ClipTextTokenizer, save_clip, warmup_cosine_adamw
from models.common.data import (
    ImageTensorDataset,
    ImageTextDataset,
    LengthBucketBatchSampler,
    load_images,
)
from models.common.hardware import cpu_has_amx
from models.common.tokenizer import load_tokenizer, train_bpe_tokenizer

PHASES = ("clip", "concepts", "pretrain", "ssc", "dsc")
# Config fields that only say how the trained captioner is evaluated.
_EVALUATION_ONLY = ("generation", "ssc_max_new_tokens", "eval_images")
TEXT_OF_PHASE = {"pretrain": "alt_text", "ssc": "short_caption", "dsc": "descriptive_caption"}


@dataclass(frozen=True)
class PhaseConfig:
    max_steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    # Learning rate of the image tower relative to `lr` (captioning phases): 0 freezes it.
    visual_lr_scale: float = 1.0


@dataclass(frozen=True)
class ConceptsConfig(PhaseConfig):
    # Weight of the per-cell shape/colour/size loss next to the word loss (0: words alone).
    cell_weight: float = 1.0


@dataclass(frozen=True)
class CaptionerTrainConfig:
    clip_model: str = "recapflow-tiny-cell-clip"
    # A local weights file or open_clip tag: skips contrastive pretraining (full profile).
    clip_pretrained: str | None = None
    lm: dict = field(
        default_factory=lambda: {
            "config": {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 256}
        }
    )
    tokenizer: str | None = None  # None: train a byte-level BPE on the corpus (tiny)
    vocab_size: int = 1024
    prefix_grid: int = 3
    clip: PhaseConfig = field(default_factory=PhaseConfig)
    # The tiny tower's word and per-cell concept detector on the human subset's captions
    # (models/captioning/concepts.py); like `clip`, skipped with `clip_pretrained`, and with
    # max_steps 0.
    concepts: ConceptsConfig = field(
        default_factory=lambda: ConceptsConfig(max_steps=800, batch_size=64, warmup_steps=20)
    )
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)
    ssc: PhaseConfig = field(default_factory=PhaseConfig)
    dsc: PhaseConfig = field(default_factory=PhaseConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ssc_max_new_tokens: int = 24
    # SSC and DSC also train on the left-right mirror of every human-captioned image, with
    # "left" and "right" swapped in its caption (corpus.scene_text.mirror_caption; images
    # whose caption quotes a rendered word are not mirrored). Every shape of the tiny
    # world is mirror-symmetric; for photos it is the usual flip augmentation. Off by
    # default: it hardly changed DSC hallucination (docs/log/).
    mirror_human: bool = False
    eval_images: int = 500  # held-out images scored after each captioning phase
    seed: int = 0
    # auto: bf16 mixed precision on a GPU or on a CPU with AMX bf16 tiles, fp32 elsewhere
    # (`training_precision`); or any Lightning precision ("32-true", "bf16-mixed").
    precision: str = "auto"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaptionerTrainConfig:
        return build_config(cls, d, "captioner")

    def training_digest(self) -> str:
        """What the trained weights depend on: all but how they are evaluated, so a new
        decoding setting re-captions the held-out images without retraining any phase."""
        d = asdict(self)
        for k in _EVALUATION_ONLY:
            d.pop(k)
        return json_digest(d)


class Throughput(L.Callback):
    """Logs `<phase>/samples_per_s` every `every` steps (wall clock, data included)."""

    def __init__(self, phase: str, every: int = 20):
        self.phase, self.every = phase, every
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._n += len(batch["images"])
        if trainer.global_step % self.every == 0:
            rate = self._n / (time.perf_counter() - self._t0)
            module.log(f"{self.phase}/samples_per_s", rate, prog_bar=True)
            self._t0, self._n = time.perf_counter(), 0


class CaptionerModule(L.LightningModule):
    def __init__(self, model: PrefixCaptioner, phase: str, cfg: PhaseConfig):
        super().__init__()
        self.model, self.phase, self.cfg = model, phase, cfg

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        self.log(f"{self.phase}/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        c = self.cfg
        self.model.visual.requires_grad_(c.visual_lr_scale > 0)
        return warmup_cosine_adamw(
            self,
            c.lr,
            c.weight_decay,
            c.warmup_steps,
            c.max_steps,
            lr_scales={"model.visual.": c.visual_lr_scale},
        )


def training_precision(setting: str = "auto") -> str:
    """The Lightning precision of the captioner's phases. "auto" is bf16 mixed precision on
    a GPU and on a CPU whose matrix unit computes in bf16 (Intel AMX), where it trains
    faster than fp32 (docs/log/); fp32 elsewhere, where bf16 matmuls are emulated and
    slower."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() or cpu_has_amx():
        return "bf16-mixed"
    return "32-true"


def _trainer(
    phase: str, cfg: PhaseConfig, logger: MLFlowLogger | None, precision: str = "auto"
) -> L.Trainer:
    return L.Trainer(
        # tqdm, not rich: rich's refresh thread takes a visible share of a small CPU's time.
        callbacks=[Throughput(phase), TQDMProgressBar(refresh_rate=20)],
        max_steps=cfg.max_steps,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        gradient_clip_val=1.0,
        accelerator="auto",
        devices=1,
        precision=training_precision(precision),
    )


def _loader(ds: ImageTextDataset, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    sampler = LengthBucketBatchSampler(
        [len(t) for t in ds.token_ids], min(batch_size, len(ds)), seed
    )
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)


def _shuffled_loader(
    ds: torch.utils.data.Dataset, batch_size: int, seed: int
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ds,
        batch_size=min(batch_size, len(ds)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def _caption_ids(tokenizer, texts: list[str], max_len: int = 127) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[*t[: max_len - 1], tokenizer.eos_token_id] for t in ids]


class CaptionerTraining:
    """Holds the data of one training run and runs its phases in order."""

    def __init__(
        self,
        cfg: CaptionerTrainConfig,
        raw_dir: Path,
        out_dir: Path,
        mlflow_run_id: str | None = None,
        tracking_uri: str | None = None,
    ):
        self.cfg, self.raw_dir, self.out = cfg, Path(raw_dir), Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_id, self.tracking_uri = mlflow_run_id, tracking_uri
        index = pd.read_parquet(self.raw_dir / "index.parquet")
        self.train = index[index["split"] == "train"].reset_index(drop=True)
        self.eval = index[index["split"] == "eval"].head(cfg.eval_images).reset_index(drop=True)
        self.human = self.train[self.train["has_human_captions"]].reset_index(drop=True)
        self._train_pos = pd.Series(range(len(self.train)), index=self.train["key"])
        self._train_images: dict[int, torch.Tensor] = {}
        if len(self.human) == 0:
            raise ValueError(
                f"{raw_dir}: no training image has human-written captions; the SSC and DSC "
                "phases need some (raise raw_alt_text_dataset.human_fraction)"
            )

    # -- helpers -----------------------------------------------------------------------
    def _logger(self) -> MLFlowLogger | None:
        if not self.run_id:
            return None
        return MLFlowLogger(tracking_uri=self.tracking_uri, run_id=self.run_id)

    def _done(self, phase: str) -> bool:
        f = self.out / phase / "done.json"
        return f.exists() and json.loads(f.read_text()).get("config") == self.cfg.training_digest()

    def _mark_done(self, phase: str, extra: dict) -> None:
        f = self.out / phase / "done.json"
        f.write_text(json.dumps({"config": self.cfg.training_digest(), **extra}, indent=2))

    def _images(self, rows: pd.DataFrame, size: int) -> torch.Tensor:
        """uint8 images of `rows`; every phase draws from the training split, decoded once."""
        pos = self._train_pos.reindex(rows["key"])
        if pos.isna().any():  # not training images (the held-out split)
            return load_images(self.raw_dir, list(rows["key"]), list(rows["shard"]), size)
        if size not in self._train_images:
            self._train_images[size] = load_images(
                self.raw_dir, list(self.train["key"]), list(self.train["shard"]), size
            )
        return self._train_images[size][torch.tensor(pos.to_numpy(dtype="int64"))]

    # -- phases ------------------------------------------------------------------------
    def tokenizer(self):
        path = self.out / "tokenizer"
        if self.cfg.tokenizer:
            return load_tokenizer(self.cfg.tokenizer)
        # Trained once per configuration: a new vocab_size (or any change) retrains it, as
        # every phase after it is retrained too.
        if not self._done("tokenizer"):
            texts = (
                list(self.train["alt_text"])
                + list(self.human["short_caption"])
                + list(self.human["descriptive_caption"])
            )
            tok = train_bpe_tokenizer(texts, self.cfg.vocab_size)
            tok.save_pretrained(path)
            self._mark_done("tokenizer", {"vocab_size": len(tok)})
        return load_tokenizer(path)

    def run_clip(self, tok) -> str | None:
        """Contrastive pretraining of the tiny CLIP; returns the weights to start from."""
        cfg = self.cfg
        if cfg.clip_pretrained:
            return cfg.clip_pretrained
        weights = self.out / "clip" / "model.safetensors"
        if self._done("clip"):
            return str(weights)
        t0 = time.time()
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        module = ClipPretrainModule(
            cfg.clip_model,
            lr=cfg.clip.lr,
            weight_decay=cfg.clip.weight_decay,
            warmup_steps=cfg.clip.warmup_steps,
            max_steps=cfg.clip.max_steps,
        )
        rows = self.train[self.train["alt_text"].str.len() > 0]
        text = ClipTextTokenizer(module.model.context_length, hf_tokenizer=tok)(
            list(rows["alt_text"])
        )
        ds = ImageTensorDataset(self._images(rows, module.image_size), text=text)
        loader = _shuffled_loader(ds, cfg.clip.batch_size, cfg.seed)
        _trainer("clip", cfg.clip, self._logger(), cfg.precision).fit(module, loader)
        save_clip(module.model, cfg.clip_model, self.out / "clip")
        self._mark_done("clip", {"seconds": time.time() - t0})
        return str(weights)

    def run_concepts(self, tok, clip_weights: str | None) -> str | None:
        """The tiny tower trained to detect the words of the human-written short captions and
        what their descriptive captions place in each cell; returns the weights the
        captioning phases start from."""
        cfg = self.cfg
        if cfg.clip_pretrained or cfg.concepts.max_steps == 0:
            return clip_weights
        weights = self.out / "concepts" / "model.safetensors"
        if self._done("concepts"):
            return str(weights)
        t0 = time.time()
        L.seed_everything(cfg.seed + PHASES.index("concepts"), workers=True, verbose=False)
        pc = cfg.concepts
        module = ConceptModule(
            cfg.clip_model,
            clip_weights,
            len(tok),
            lr=pc.lr,
            weight_decay=pc.weight_decay,
            warmup_steps=pc.warmup_steps,
            max_steps=pc.max_steps,
            cell_weight=pc.cell_weight,
        )
        ds = ImageTensorDataset(
            self._images(self.human, module.image_size),
            targets=word_targets(tok, list(self.human["short_caption"])),
            **cell_targets(list(self.human["descriptive_caption"])),
        )
        loader = _shuffled_loader(ds, pc.batch_size, cfg.seed)
        _trainer("concepts", pc, self._logger(), cfg.precision).fit(module, loader)
        save_clip(module.model, cfg.clip_model, self.out / "concepts")
        save_cell_heads(module, self.out / "concepts")
        self._mark_done("concepts", {"seconds": time.time() - t0})
        return str(weights)

    def run_captioning_phase(
        self, phase: str, tok, init: str | Path, clip_weights: str | None
    ) -> PrefixCaptioner:
        cfg = self.cfg
        if self._done(phase):
            return PrefixCaptioner.load(self.out / phase)
        t0 = time.time()
        L.seed_everything(cfg.seed + PHASES.index(phase), workers=True, verbose=False)
        if phase == "pretrain":
            heads = Path(clip_weights).parent / CELL_HEADS_FILE if clip_weights else None
            # The heads read the tower they were trained on: a captioning phase that trains
            # the tower further (visual_lr_scale > 0) would leave them reading another one.
            frozen = all(getattr(cfg, p).visual_lr_scale == 0 for p in ("pretrain", "ssc", "dsc"))
            keep = bool(frozen and not cfg.clip_pretrained and heads and heads.exists())
            spec = CaptionerSpec(
                cfg.clip_model,
                cfg.lm,
                prefix_grid=cfg.prefix_grid,
                concept_heads=dict(CELL_CLASSES) if keep else None,
            )
            model = PrefixCaptioner.build(spec, tok, clip_pretrained=cfg.clip_pretrained)
            if not cfg.clip_pretrained:  # the tiny CLIP of the `clip` (+ `concepts`) phase
                _load_visual(model, clip_weights)
            if keep:  # the concept heads, trained on this tower, kept frozen as a verifier
                model.cell_heads.load_state_dict(load_file(heads))
            rows = self.train[self.train["alt_text"].str.len() > 0]
        else:
            model = PrefixCaptioner.load(Path(init)).train()
            rows = self.human
        texts = list(rows[TEXT_OF_PHASE[phase]])
        images = self._images(rows, model.image_size)
        if phase != "pretrain" and cfg.mirror_human:
            images, texts = with_mirrors(images, texts)
        ds = ImageTextDataset(images, _caption_ids(tok, texts), tok.pad_token_id)
        pc = getattr(cfg, phase)
        _trainer(phase, pc, self._logger(), cfg.precision).fit(
            CaptionerModule(model, phase, pc), _loader(ds, pc.batch_size, cfg.seed)
        )
        model.eval()
        model.save(self.out / phase, {"phase": phase, "train_config": asdict(cfg)})
        self._mark_done(phase, {"seconds": time.time() - t0})
        return model

    def generation_for(self, phase: str) -> GenerationConfig:
        g = self.cfg.generation
        if phase == "ssc":  # short captions are short: do not pay for 100 decoding steps
            return replace(g, max_new_tokens=self.cfg.ssc_max_new_tokens)
        return g

    def evaluate(self, models: dict[str, PrefixCaptioner]) -> dict:
        """Caption quality on held-out images, alt-text vs each phase's captions."""
        scenes = read_scenes(self.raw_dir, list(self.eval["key"]), list(self.eval["shard"]))
        results = {"alt_text": caption_quality(list(self.eval["alt_text"]), scenes)}
        samples = {"key": list(self.eval["key"][:16]), "alt_text": list(self.eval["alt_text"][:16])}
        for phase, model in models.items():
            images = self._images(self.eval, model.image_size)
            caps = caption_images(model, images, self.generation_for(phase))
            name = {"ssc": "short_caption", "dsc": "descriptive_caption"}.get(phase, phase)
            results[name] = caption_quality(caps, scenes)
            samples[name] = caps[:16]
        return {"quality": results, "samples": samples}


def with_mirrors(images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The images and captions followed by the mirror image of each one whose caption can
    be mirrored (`mirror_caption`), with that mirrored caption."""
    mirrored = [mirror_caption(t) for t in texts]
    keep = [i for i, m in enumerate(mirrored) if m is not None]
    flipped = images[torch.tensor(keep, dtype=torch.long)].flip(-1)
    return torch.cat([images, flipped]), texts + [mirrored[i] for i in keep]


def _load_visual(model: PrefixCaptioner, clip_weights: str) -> None:
    state = load_file(clip_weights)
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    model.visual.load_state_dict(visual)


def read_scenes(raw_dir: Path, keys: list[str], shards: list[str]) -> list[Scene]:
    """Ground-truth scenes of the given images, reading each shard once."""
    by_shard: dict[str, set[str]] = {}
    for k, s in zip(keys, shards, strict=True):
        by_shard.setdefault(s, set()).add(k)
    meta = {}
    for shard, ks in by_shard.items():
        meta.update(read_json_sidecars(Path(raw_dir) / f"{shard}.tar", ks))
    return [Scene.from_dict(meta[k]["scene"]) for k in keys]


def caption_images(
    model: PrefixCaptioner, images: torch.Tensor, gen: GenerationConfig, batch_size: int = 32
) -> list[str]:
    """Batched captioning of uint8 images (32 at a time, as recaptioned_dataset decodes:
    with 8 beams, larger batches spend their time moving the KV cache)."""
    out: list[str] = []
    model.eval()
    for i in range(0, len(images), batch_size):
        out.extend(model.generate(images[i : i + batch_size], gen))
    return out


def train_captioner(
    cfg: CaptionerTrainConfig,
    raw_dir: Path,
    out_dir: Path,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Run every phase (skipping finished ones), measure quality, write `metrics.json`."""
    torch.set_float32_matmul_precision("high")
    run = CaptionerTraining(cfg, raw_dir, out_dir, mlflow_run_id, tracking_uri)
    tok = run.tokenizer()
    clip_weights = run.run_concepts(tok, run.run_clip(tok))
    run.run_captioning_phase("pretrain", tok, None, clip_weights)
    ssc = run.run_captioning_phase("ssc", tok, out_dir / "pretrain", None)
    dsc = run.run_captioning_phase("dsc", tok, out_dir / "pretrain", None)
    report = run.evaluate({"ssc": ssc, "dsc": dsc})
    report["seconds"] = {
        p: json.loads((Path(out_dir) / p / "done.json").read_text())["seconds"]
        for p in PHASES
        if (Path(out_dir) / p / "done.json").exists()
    }
    report["config"] = asdict(cfg)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--out", default="data/captioner")
    ap.add_argument("--mlflow-run-id", default=os.environ.get("MLFLOW_RUN_ID"))
    ap.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    args = ap.parse_args(argv)
    cfg = CaptionerTrainConfig.from_dict(load_section(args.params, "captioner"))
    report = train_captioner(
        cfg, Path(args.raw), Path(args.out), args.mlflow_run_id, args.tracking_uri
    )
    print(json.dumps({k: report[k] for k in ("seconds",)}, indent=2))


if __name__ == "__main__":
    main()
