"""Train the text-to-image model on the mixed-caption blend, as a plain process.

    python -m models.diffusion.train --config run.json          # a full config (Pipes)
    python -m models.diffusion.train --params params.yaml        # the `diffusion_model`
        --raw data/raw --sampler data/mixed_sampler --autoencoder data/autoencoder
        --text-encoder data/text_encoder --out data/diffusion_model

Steps: load the text encoder (the text_encoder asset's, `--text-encoder`; without one it
is built in the work folder: models/diffusion/text_tower.py) -> encode every caption
variant once and every image to latents once (cached) -> train the UNet with Lightning,
checkpointing every N steps (weights in safetensors; optimizer, scheduler, loop, RNG
and sampler position in a state file read with `weights_only=True`) -> export a
diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/ and the pipeline class: models/diffusion/diffusers_pipeline.py). A rerun resumes from the
last checkpoint, continues the same MLflow run and stops at the same step count.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
import yaml
from diffusers import AutoencoderKL
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from safetensors.torch import load_file, save_file

from corpus.atomic import replace_dir, write_atomic, write_text_atomic
from corpus.caption_mix import read_manifest, read_sampler
from corpus.config import ConfigError, build_config
from corpus.params import flatten, json_digest, load_section
from corpus.prompt_suite import FORMS, judge_prompt, load_suite
from corpus.shards import read_json_sidecars
from models.common.data import load_images
from models.common.optimizer_steps import OptimizerStepCallback
from models.common.pipes_report import Reporter, open_reporter
from models.diffusion.autoencoder import image_grid, to_model_range
from models.diffusion.diffusers_pipeline import export_diffusers_pipeline
from models.diffusion.layout import train_layout_model
from models.diffusion.model import (
    PREDICTION_TYPES,
    DiffusionConfig,
    LatentDiffusion,
    UNetConfig,
    build_unet,
    generate,
    sampling_scheduler,
)
from models.diffusion.patch_autoencoder import PatchAutoencoder, load_trained_autoencoder
from models.diffusion.text_encoder import FrozenTextEncoder, TextEncoderConfig
from models.diffusion.text_probes import TEXT_PROBES
from models.diffusion.text_tower import (
    build_text_encoder,
    load_built_text_encoder,
    probe_metrics,
    text_encoder_tag,
)
from models.evaluation.colour_following import colour_prompts, score_colours

VARIANTS = ("synthetic", "alt_text", "dropped")  # index in the text cache
# Part of the resume digest of the work folder: bump it when a code change alters what the
# same configuration trains, so a rerun does not resume checkpoints of the old code. 2:
# text encoder pooled at EOS (models/diffusion/text_encoder.py).
RECIPE = 2


@dataclass(frozen=True)
class TrainEvalConfig:
    prompts: int = 64  # single-object colour prompts per evaluation
    final_prompts: int = 256
    every: int = 250  # steps between colour-following evaluations (the curve)
    steps: int = 20
    guidance_scale: float = 6.0
    sampler: str = "ddim"
    spacing: Literal["leading", "trailing"] = "leading"  # trailing: v_prediction only
    # Each step's x0 estimate clipped to [-x, x]: pixel latents (the patch autoencoder)
    # live in [-1, 1], and guidance pushes estimates past it; None: not clipped.
    clip_sample: float | None = None
    # Guidance only at steps with t >= this (Kynkaanniemi et al. 2024, guidance in a
    # limited interval); below it the conditional prediction alone.
    guidance_min_t: int = 0
    # A layout UNet's layout model sampled with this guidance against the empty caption
    # (models/diffusion/layout.py, `guided_logits`); 1: none.
    layout_guidance: float = 1.0
    grid_prompts: int = 16
    # Captions of fresh scenes for the text encoder's linear probes
    # (models/diffusion/text_probes.py), run once per encoder; 0 skips them.
    text_probes: int = TEXT_PROBES
    # A reference CLIP folder (the reference_clip asset): each point of the curve then
    # also has the CLIP score of its samples against their prompts (the report's Fig. 4/5).
    reference_clip: str | None = None
    # A world judge folder: each point of the curve then also has all-conditions prompt
    # following on the suite's first `suite_prompts` prompts of each category, one image
    # per prompt and form (what the eval report measures, on fewer prompts).
    judge: str | None = None
    suite_prompts: int = 2


@dataclass(frozen=True)
class DiffusionTrainConfig:
    raw: str = "data/raw"
    sampler: str = "data/mixed_sampler"
    autoencoder: str = "data/autoencoder"
    # the captioner's folder: its concept tower partners the text tower's pretraining
    # when text_encoder.pretrain.partner is "captioner" or "captioner+cnn"
    captioner: str | None = "data/captioner"
    out: str = "data/diffusion_model"
    work: str | None = None  # checkpoints and caches; default data/work/diffusion_model
    batch_size: int = 64
    accumulate_grad_batches: int = 1
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    precision: str = "auto"  # auto: bf16-mixed on a GPU, 32-true on a CPU
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"  # ddp, fsdp, ...: Lightning's strategies, nothing home-made
    num_threads: int | None = None
    # When the UNet trains on a CPU: this many data-parallel processes (DDP over gloo),
    # the cores split between them. A small model's step keeps one core busier than it
    # keeps two, so two one-thread processes train faster than one two-thread process.
    # Ignored on a GPU; `devices` and `strategy` then apply.
    cpu_processes: int = 1
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # The text_encoder asset's folder (models/diffusion/text_tower.py), built for these
    # text_encoder settings and this sampler's captions; None: built in the work folder.
    text_encoder_dir: str | None = None
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "recapflow"
    mlflow_run_id: str | None = None

    def __post_init__(self) -> None:
        tcfg = self.text_encoder
        partner = tcfg.pretrain.partner
        if partner.startswith("captioner") and not (tcfg.pretrained or self.captioner):
            raise ConfigError(
                f"diffusion_model.text_encoder.pretrain.partner: {partner} needs the captioner's "
                "folder (`captioner`, --captioner): its concept tower is the partner"
            )
        if self.diffusion.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"diffusion_model.diffusion.prediction_type: {self.diffusion.prediction_type!r} "
                f"is not one of {PREDICTION_TYPES}"
            )
        if self.eval.spacing == "trailing" and self.diffusion.prediction_type == "epsilon":
            raise ConfigError(
                "diffusion_model.eval.spacing: trailing starts sampling at t=999, where an "
                "epsilon-predicting model's x0 estimate is divided by sqrt(alpha_bar) = 5e-5; "
                "use it with diffusion.prediction_type: v_prediction or sample, or spacing: "
                "leading"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionTrainConfig:
        """params.yaml's `diffusion_model` section plus the run's paths and MLflow
        settings (the Pipes extra): every key checked, nested ones named by dotted path."""
        return build_config(cls, d, "diffusion_model")

    @property
    def work_dir(self) -> Path:
        return (
            Path(self.work) if self.work else Path(self.out).parent / "work" / Path(self.out).name
        )


def _digest(obj: Any) -> str:
    return json_digest(obj, length=16)


# --- data: cached latents and caption embeddings, one epoch manifest at a time ---------


class MixedLatents(torch.utils.data.Dataset):
    """Indexed by (epoch, [rows]): latents of the rows and the embedding of the caption
    variant each row gets in that epoch's manifest."""

    def __init__(
        self,
        latents,
        states,
        pooled,
        variants_by_epoch: dict[int, np.ndarray],
        layouts: torch.Tensor | None = None,
    ):
        self.latents, self.states, self.pooled = latents, states, pooled
        self.variants = variants_by_epoch
        self.layouts = layouts  # (rows, SEQ) layout tokens, for a layout UNet

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, item: tuple[int, list[int]]) -> dict:
        epoch, rows = item
        rows_t = torch.as_tensor(rows)
        v = torch.as_tensor(self.variants[epoch][rows])
        batch = {
            "latents": self.latents[rows_t],
            "states": self.states[v, rows_t],
            "pooled": self.pooled[v, rows_t],
        }
        if self.layouts is not None:
            # A dropped caption drops the layout too: the unconditional branch of guidance
            layout = self.layouts[rows_t].clone()
            layout[v == VARIANTS.index("dropped")] = -1
            batch["layout"] = layout
        return batch


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields (epoch, rows) batches in a permutation fixed by (seed, epoch). At the start
    of an epoch it skips the batches the run already trained on (from the trainer's step
    count), so a resumed run sees exactly the batches an uninterrupted one would.

    Under data parallelism each of `world` processes takes every world-th row of the same
    global batch, so the model sees the batches of one process whatever the world size."""

    def __init__(
        self, n: int, batch_size: int, seed: int, consumed_batches, rank: int = 0, world: int = 1
    ):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} does not split over {world} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.consumed_batches = consumed_batches  # callable -> batches trained so far
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        start = min(max(0, self.consumed_batches() - self.epoch * len(self)), len(self))
        for b in range(start, len(self)):
            yield (
                self.epoch,
                perm[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world],
            )


class MixedLatentDataModule(L.LightningDataModule):
    def __init__(self, dataset: MixedLatents, batch_size: int, seed: int, accumulate: int):
        super().__init__()
        self.dataset, self.batch_size, self.seed, self.accumulate = (
            dataset,
            batch_size,
            seed,
            accumulate,
        )

    def consumed_batches(self) -> int:
        return self.trainer.global_step * self.accumulate if self.trainer else 0

    def train_dataloader(self):
        sampler = ResumableBatchSampler(
            len(self.dataset),
            self.batch_size,
            self.seed,
            self.consumed_batches,
            rank=self.trainer.global_rank,
            world=self.trainer.world_size,
        )
        return torch.utils.data.DataLoader(self.dataset, sampler=sampler, batch_size=None)

    def state_dict(self) -> dict:
        # Recorded for inspection; the position itself follows from the restored step.
        return {"consumed_batches": self.consumed_batches(), "seed": self.seed}


# --- checkpoints: safetensors weights + a weights_only state file ---------------------


class CheckpointedDiffusion(LatentDiffusion):
    """Keeps model and EMA weights out of Lightning's state file: they go to safetensors
    next to it, and come back from there on resume. The state file also carries the RNG
    states, so a resumed run draws the same noise."""

    weights_dir: Path | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        weights = {f"model.{k}": v.contiguous() for k, v in checkpoint.pop("state_dict").items()}
        if not self.trainer.is_global_zero:  # the processes hold the same weights
            return
        ema = self.ema.state_dict()
        for i, p in enumerate(ema.pop("shadow_params")):
            weights[f"ema.{i}"] = p.detach().contiguous()
        save_file(weights, str(self.weights_dir / "model.safetensors"))
        checkpoint["ema_meta"] = ema
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        weights = load_file(str(self.weights_dir / "model.safetensors"))
        checkpoint["state_dict"] = {
            k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")
        }
        shadow = [weights[f"ema.{i}"] for i in range(sum(k.startswith("ema.") for k in weights))]
        self.ema.load_state_dict({**checkpoint["ema_meta"], "shadow_params": shadow})
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), None))
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


class StepCheckpoint(OptimizerStepCallback):
    """Every `every` optimizer steps: `step-NNNNNNN/` with model.safetensors and
    trainer_state.ckpt, written in a temp folder then renamed; `latest` names it."""

    def __init__(self, root: Path, every: int, keep: int):
        self.root, self.every, self.keep = root, every, keep
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, trainer: L.Trainer, module: CheckpointedDiffusion) -> None:
        """Called by every process (saving is collective under data parallelism); the first
        one writes. Another cannot see `final` appear before it calls save_checkpoint too:
        the writer renames only after the barrier inside it."""
        step = trainer.global_step
        final = self.root / f"step-{step:07d}"
        if final.exists():
            return
        tmp = self.root / f".tmp-step-{step:07d}"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        module.weights_dir = tmp
        # weights_only=False: the full training state (optimizer, loops), not weights only.
        trainer.save_checkpoint(tmp / "trainer_state.ckpt", weights_only=False)
        if not trainer.is_global_zero:
            return
        os.replace(tmp, final)
        write_text_atomic(self.root / "latest", final.name)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old)

    def after_optimizer_step(self, trainer, module) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.save(trainer, module)

    @staticmethod
    def latest(root: Path) -> Path | None:
        pointer = root / "latest"
        if not pointer.exists():
            return None
        path = root / pointer.read_text().strip()
        return path if (path / "trainer_state.ckpt").exists() else None


# --- evaluation during training: validation grids and the colour-following curve ------


class ColourFollowingCallback(OptimizerStepCallback):
    def __init__(self, ctx: TrainContext):
        self.ctx = ctx

    def after_optimizer_step(self, trainer, module) -> None:
        step = trainer.global_step
        every = self.ctx.cfg.eval.every
        if step % every == 0 and step > 0 and trainer.is_global_zero:
            self.ctx.evaluate(module, step, self.ctx.cfg.eval.prompts)


class ProgressReport(Callback):
    """A line per `every` steps to Pipes (shown in the Dagster run's logs)."""

    def __init__(self, reporter: Reporter, max_steps: int, every: int = 50):
        self.reporter, self.max_steps, self.every = reporter, max_steps, every
        self.t0, self.step0 = time.perf_counter(), None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.step0 is None:
            self.step0, self.t0 = step, time.perf_counter()
        if step % self.every == 0 or step == self.max_steps:
            dt = time.perf_counter() - self.t0
            # images per optimizer step, over every data-parallel process
            per_step = len(batch["latents"]) * trainer.accumulate_grad_batches * trainer.world_size
            rate = (step - self.step0) * per_step / dt if dt > 0 else math.nan
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            self.reporter.info(f"step {step}/{self.max_steps} loss {loss:.4f} {rate:.0f} images/s")
            trainer.logger and trainer.logger.log_metrics({"train/images_per_s": rate}, step)


@dataclass
class TrainContext:
    cfg: DiffusionTrainConfig
    vae: AutoencoderKL | PatchAutoencoder
    text_encoder: FrozenTextEncoder
    logger: MLFlowLogger | None
    style: str
    curve_file: Path
    curve: list[dict] = field(default_factory=list)
    reference_clip: Any = None  # models.evaluation.reference_clip.ReferenceClip
    judge: Any = None  # models.evaluation.world_judge.WorldJudge
    text_probes: dict | None = None

    def _sample(self, module: LatentDiffusion, texts: list[str]) -> torch.Tensor:
        e = self.cfg.eval
        return generate(
            module.ema_unet(),
            self.vae.to(module.device),
            self.text_encoder.to(module.device),
            texts,
            self.cfg.diffusion,
            seed=self.cfg.seed,
            steps=e.steps,
            guidance_scale=e.guidance_scale,
            sampler=e.sampler,
            spacing=e.spacing,
            clip_sample=e.clip_sample,
            guidance_min_t=e.guidance_min_t,
            layout_guidance=e.layout_guidance,
        )

    def _all_conditions(self, module: LatentDiffusion) -> dict[str, float]:
        """all_conditions/<form>: the share of the suite's first prompts per category whose
        one image passes every condition, averaged over categories."""
        taken: dict[str, int] = {}
        prompts = []
        for p in load_suite():
            if taken.get(p.category, 0) < self.cfg.eval.suite_prompts:
                prompts.append(p)
                taken[p.category] = taken.get(p.category, 0) + 1
        out = {}
        for form in FORMS:
            scenes = self.judge.predict(self._sample(module, [p.text(form) for p in prompts]))
            passed: dict[str, list[bool]] = {}
            for p, scene in zip(prompts, scenes, strict=True):
                passed.setdefault(p.category, []).append(judge_prompt(p, scene)["passed"])
            out[f"all_conditions/{form}"] = float(np.mean([np.mean(v) for v in passed.values()]))
        return out

    def evaluate(self, module: LatentDiffusion, step: int, n_prompts: int) -> dict:
        e = self.cfg.eval
        prompts = colour_prompts(n_prompts, self.style)
        images = self._sample(module, [p.text for p in prompts])
        score = score_colours(images, prompts)
        if self.reference_clip is not None:
            texts = [p.text for p in prompts]
            score["clip_score"] = float(self.reference_clip.score(images, texts).mean())
        if self.judge is not None:
            score.update(self._all_conditions(module))
        # One point per step: a resumed run re-evaluates steps after its checkpoint, and
        # the final evaluation (more prompts) replaces the periodic one at the last step.
        keys = (
            "colour_following",
            "no_object",
            "clip_score",
            *(f"all_conditions/{f}" for f in FORMS),
        )
        point = {"step": step, **{k: score[k] for k in keys if k in score}}
        self.curve = sorted(
            [c for c in self.curve if c["step"] != step] + [point], key=lambda c: c["step"]
        )
        write_text_atomic(self.curve_file, json.dumps(self.curve))
        grid = image_grid(images[: e.grid_prompts], nrow=8, scale=4)
        if self.logger:
            self.logger.log_metrics({f"eval/{k}": v for k, v in point.items() if k != "step"}, step)
            self.logger.experiment.log_image(
                self.logger.run_id, grid, key="validation_grid", step=step
            )
        return {"score": score, "grid": grid, "images": images, "prompts": prompts}


# --- the run ----------------------------------------------------------------------------


def _load_captions(sampler_dir: Path) -> pd.DataFrame:
    path = sampler_dir / "captions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: materialize mixed_sampler first")
    return pd.read_parquet(path)


def _check_epochs(cfg: DiffusionTrainConfig, n: int, sampler: dict) -> int:
    """Fail before training when the run needs more epochs than the sampler recorded."""
    batches_per_epoch = n // cfg.batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"{n} training samples are fewer than one batch of {cfg.batch_size}")
    needed = math.ceil(cfg.diffusion.max_steps * cfg.accumulate_grad_batches / batches_per_epoch)
    recorded = sampler["config"]["epochs"]
    if needed > recorded:
        raise ValueError(
            f"{cfg.diffusion.max_steps} steps of {cfg.batch_size} x "
            f"{cfg.accumulate_grad_batches} samples need {needed} epochs of caption choices; "
            f"the mixed sampler recorded {recorded}: raise mixed_sampler.epochs to {needed}"
        )
    return needed


def _latents(cfg, vae, keys, images: Callable[[], torch.Tensor], work: Path) -> torch.Tensor:
    """Every training image encoded once (posterior mean, scaled), cached by the keys and
    the autoencoder's weights."""
    # The autoencoder's config as well as its weights: the patch autoencoder has none.
    files = [Path(cfg.autoencoder, "vae", "config.json")]
    files += sorted(Path(cfg.autoencoder, "vae").glob("*.safetensors"))
    tag = _digest([keys[:5], keys[-5:], len(keys)])
    tag += "-" + _digest([hashlib.md5(f.read_bytes()).hexdigest() for f in files if f.exists()])
    path = work / f"latents-{tag}.safetensors"
    if path.exists():
        return load_file(str(path))["latents"]
    pixels, out = images(), []
    with torch.no_grad():
        for i in range(0, len(pixels), 256):
            z = vae.encode(to_model_range(pixels[i : i + 256])).latent_dist.mode()
            out.append((z * vae.config.scaling_factor).to(torch.float16))
    latents = torch.cat(out).contiguous()
    write_atomic(path, lambda tmp: save_file({"latents": latents}, str(tmp)))
    return latents


def _text_encoder(cfg, texts, tag, images, logger, reporter) -> tuple[FrozenTextEncoder, dict]:
    """The text_encoder asset's encoder (`text_encoder_dir`), or, without one, an encoder
    built in the work folder the same way (kept there for the next run); its probes are
    logged to MLflow as text_probe/<where>/<kind>."""
    if cfg.text_encoder_dir:
        folder = Path(cfg.text_encoder_dir)
    else:
        folder = cfg.work_dir / "text_encoder"
        build_text_encoder(
            cfg.text_encoder,
            folder,
            texts,
            images,
            seed=cfg.seed,
            captioner=cfg.captioner,
            probes=cfg.eval.text_probes,
            logger=logger,
            info=reporter.info,
        )
    encoder, record = load_built_text_encoder(folder, cfg.text_encoder, tag)
    flat = probe_metrics(record.get("probes"))
    if flat:
        reporter.info("text encoder probes: " + ", ".join(f"{k} {v:.3f}" for k, v in flat.items()))
        if logger:
            logger.log_metrics(flat)
    return encoder, record


def _layout_tokens(unet, raw: Path, keys: list[str], shards: list[str]) -> torch.Tensor:
    """(rows, SEQ) layout tokens of the training images, from the scenes the raw dataset
    records beside each image (the world's annotation, as a detection dataset's boxes)."""
    scenes: dict[str, dict] = {}
    for shard in sorted(set(shards)):
        wanted = {k for k, s in zip(keys, shards, strict=True) if s == shard}
        found = read_json_sidecars(raw / f"{shard}.tar", wanted)
        scenes.update({k: m["scene"] for k, m in found.items() if m.get("scene")})
    missing = [k for k in keys if k not in scenes]
    if missing:
        raise ValueError(
            f"unet.layout needs each training image's scene in the raw dataset's sidecar "
            f"json; {len(missing)} have none (e.g. {missing[:3]}): set unet.layout: false "
            "for a dataset without scene annotations"
        )
    return torch.tensor([unet.scene_tokens(scenes[k]) for k in keys])


def _train_layout(cfg, unet, text_encoder, captions, states, by_epoch, reporter) -> tuple:
    """The layout model trained alone on the sampler's captions and the rows' layouts,
    then frozen (the UNet learns to draw the layouts it is given)."""
    tokens = _layout_tokens(
        unet, Path(cfg.raw), captions["key"].tolist(), captions["shard"].tolist()
    )
    n = len(captions)
    masks = torch.stack(
        [
            text_encoder.token_mask(captions["synthetic"].tolist()),
            text_encoder.token_mask(captions["alt_text"].tolist()),
            text_encoder.token_mask([""]).expand(n, -1),
        ]
    )
    d = cfg.diffusion
    loss = train_layout_model(
        unet.layout_model,
        states,
        masks,
        by_epoch,
        tokens,
        d.layout_steps,
        d.layout_batch_size,
        d.layout_lr,
        cfg.seed,
        progress=lambda step, loss: reporter.info(
            f"layout model: step {step}/{d.layout_steps} loss {loss:.4f}"
        ),
    )
    unet.layout_model.requires_grad_(False)
    return loss, tokens


def _precision(cfg: DiffusionTrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def parallelism(cfg: DiffusionTrainConfig) -> tuple[str, int | str, str, int | None]:
    """(accelerator, devices, strategy, torch threads per process) of the UNet's training."""
    on_cpu = cfg.accelerator == "cpu" or (
        cfg.accelerator == "auto" and not torch.cuda.is_available()
    )
    if not on_cpu or cfg.cpu_processes <= 1:
        return cfg.accelerator, cfg.devices, cfg.strategy, cfg.num_threads
    threads = cfg.num_threads or max(1, len(os.sched_getaffinity(0)) // cfg.cpu_processes)
    strategy = "ddp" if cfg.strategy == "auto" else cfg.strategy
    return "cpu", cfg.cpu_processes, strategy, threads


def _mlflow_logger(cfg: DiffusionTrainConfig, work: Path) -> MLFlowLogger | None:
    if not cfg.mlflow_tracking_uri:
        return None
    run_file = work / "mlflow_run.json"
    run_id = cfg.mlflow_run_id
    if run_id is None and run_file.exists():
        run_id = json.loads(run_file.read_text())["run_id"]  # resume: same run
    logger = MLFlowLogger(
        experiment_name=cfg.mlflow_experiment,
        run_name="diffusion_model",
        tracking_uri=cfg.mlflow_tracking_uri,
        run_id=run_id,
    )
    write_text_atomic(run_file, json.dumps({"run_id": logger.run_id}))
    return logger


WORKER_CONFIG_ENV = "RECAPFLOW_DIFFUSION_CONFIG"

# Settings that do not change what is trained: a rerun with other values still resumes.
_RESUME_NEUTRAL = (
    "out",
    "work",
    "text_encoder_dir",
    "eval",
    "num_threads",
    "checkpoint_every",
    "keep_checkpoints",
)


def discard_stale_run(
    cfg: DiffusionTrainConfig, sampler: dict, text_encoder: str | None = None
) -> bool:
    """Checkpoints, curve and MLflow run id of the work folder belong to one training
    configuration and its inputs (sampler, autoencoder, the text encoder's tag: a UNet
    trained on one encoder's embeddings is noise to another's); when those change, a rerun
    starts over instead of resuming someone else's run. Returns whether it discarded."""
    work = cfg.work_dir
    settings = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_NEUTRAL}
    ae = Path(cfg.autoencoder) / "metrics.json"
    inputs = [sampler, ae.read_text() if ae.exists() else None, text_encoder]
    digest = _digest([settings, *inputs, RECIPE])
    marker = work / "run_config.json"
    stale = marker.exists() and json.loads(marker.read_text())["digest"] != digest
    if stale:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        for name in ("curve.json", "mlflow_run.json"):
            (work / name).unlink(missing_ok=True)
    write_text_atomic(marker, json.dumps({"digest": digest}))
    return stale


def train_diffusion(cfg: DiffusionTrainConfig, reporter: Reporter | None = None) -> dict:
    reporter = reporter or Reporter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    work = cfg.work_dir
    work.mkdir(parents=True, exist_ok=True)
    sampler_dir = Path(cfg.sampler)
    sampler = read_sampler(sampler_dir)
    captions = _load_captions(sampler_dir)
    n_epochs = _check_epochs(cfg, len(captions), sampler)
    manifests = {e: read_manifest(sampler_dir, e) for e in range(n_epochs)}
    keys = captions["key"].tolist()
    for e, m in manifests.items():
        if m["key"].tolist() != keys:
            raise ValueError(f"epoch {e} manifest does not list the sampler's keys in order")
    style = sampler["config"]["caption_kind"]
    L.seed_everything(cfg.seed, verbose=False)
    texts = manifests[0].set_index("key").loc[keys, "caption"].tolist()
    encoder_tag = text_encoder_tag(cfg.text_encoder, texts, cfg.seed, cfg.captioner)
    if discard_stale_run(cfg, sampler, encoder_tag):
        reporter.info("the configuration or its inputs changed: starting a new run")
    logger = _mlflow_logger(cfg, work)
    if logger and not (work / "checkpoints" / "latest").exists():
        logger.log_hyperparams(flatten(asdict(cfg)))
        logger.log_hyperparams(flatten({"sampler": sampler["config"]}))

    vae = load_trained_autoencoder(Path(cfg.autoencoder) / "vae").eval().requires_grad_(False)
    ae_metrics = json.loads((Path(cfg.autoencoder) / "metrics.json").read_text())
    resolution = ae_metrics["config"]["resolution"]
    # Decoded at most once, and only when the text encoder or the latents need training.
    images = functools.cache(
        lambda: load_images(Path(cfg.raw), keys, captions["shard"].tolist(), resolution)
    )
    timings: dict[str, float] = {}
    t = time.perf_counter()
    text_encoder, encoder = _text_encoder(cfg, texts, encoder_tag, images, logger, reporter)
    timings["text_encoder_s"] = time.perf_counter() - t

    t = time.perf_counter()
    latents = _latents(cfg, vae, keys, images, work)
    images.cache_clear()
    empty_s, empty_p = text_encoder.encode_all([""])
    syn_s, syn_p = text_encoder.encode_all(captions["synthetic"].tolist())
    alt_s, alt_p = text_encoder.encode_all(captions["alt_text"].tolist())
    n = len(keys)
    states = torch.stack([syn_s, alt_s, empty_s.expand(n, -1, -1)])
    pooled = torch.stack([syn_p, alt_p, empty_p.expand(n, -1)])
    variants = {
        e: m["source"].map({v: i for i, v in enumerate(VARIANTS)}).to_numpy()
        for e, m in manifests.items()
    }
    timings["cache_s"] = time.perf_counter() - t
    truncated = text_encoder.truncated(captions["synthetic"].tolist())
    reporter.info(
        f"cached {n} latents {tuple(latents.shape[1:])} and {2 * n + 1} caption embeddings "
        f"({truncated} synthetic captions cut at {text_encoder.context_length} tokens)"
    )

    unet = build_unet(
        cfg.unet, text_encoder.hidden_size, text_encoder.pooled_size, latents.shape[1:]
    )
    resume = StepCheckpoint.latest(work / "checkpoints")
    layouts = None
    if cfg.unet.layout:
        t = time.perf_counter()
        by_epoch = torch.as_tensor(np.stack([variants[e] for e in sorted(variants)]))
        if resume:  # the checkpoint holds the trained layout model
            unet.layout_model.requires_grad_(False)
            layouts = _layout_tokens(unet, Path(cfg.raw), keys, captions["shard"].tolist())
        else:
            loss, layouts = _train_layout(
                cfg, unet, text_encoder, captions, states, by_epoch, reporter
            )
            reporter.info(f"layout model trained alone: loss {loss:.4f}")
        timings["layout_s"] = time.perf_counter() - t
    module = CheckpointedDiffusion(unet, cfg.diffusion)
    data = MixedLatentDataModule(
        MixedLatents(latents, states, pooled, variants, layouts),
        cfg.batch_size,
        cfg.seed,
        cfg.accumulate_grad_batches,
    )
    ctx = TrainContext(cfg, vae, text_encoder, logger, style, work / "curve.json")
    ctx.text_probes = encoder.get("probes")
    if cfg.eval.reference_clip:
        from models.evaluation.reference_clip import load_reference_clip

        ctx.reference_clip = load_reference_clip(Path(cfg.eval.reference_clip))
    if cfg.eval.judge:
        from models.evaluation.world_judge import load_judge

        ctx.judge = load_judge(Path(cfg.eval.judge))
    if ctx.curve_file.exists():
        ctx.curve = json.loads(ctx.curve_file.read_text())
    ckpts = StepCheckpoint(work / "checkpoints", cfg.checkpoint_every, cfg.keep_checkpoints)
    if resume:
        module.weights_dir = resume
        reporter.info(f"resuming from {resume}")
    elif cfg.diffusion.map_pretrain_steps:  # a resumed run's checkpoint holds the trained map
        t = time.perf_counter()
        steps = cfg.diffusion.map_pretrain_steps
        if cfg.diffusion.map_pretrain_captions == "blend":
            by_epoch = torch.as_tensor(np.stack([variants[e] for e in sorted(variants)]))
            captions = {"states": states, "variants": by_epoch}
        else:  # the synthetic captions are the first variant
            captions = {"states": states[0]}
        loss = module.pretrain_map(
            latents,
            batch_size=cfg.batch_size,
            progress=lambda step, loss: reporter.info(
                f"text map alone: step {step}/{steps} {loss:.4f}"
            ),
            **captions,
        )
        timings["map_pretrain_s"] = time.perf_counter() - t
        reporter.info(f"text map trained alone: map loss {loss:.4f}")

    accelerator, devices, strategy, threads = parallelism(cfg)
    if threads:  # the text encoder and the caches above had every core
        torch.set_num_threads(threads)
    trainer = L.Trainer(
        max_steps=cfg.diffusion.max_steps,
        accelerator=accelerator,
        devices=devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=_precision(cfg),
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        logger=logger or False,
        enable_checkpointing=False,
        callbacks=[
            ckpts,
            ColourFollowingCallback(ctx),
            ProgressReport(reporter, cfg.diffusion.max_steps),
            TQDMProgressBar(refresh_rate=20),
        ],
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # ResumableBatchSampler splits batches itself
        max_epochs=-1,
    )
    if trainer.is_global_zero:  # read by the processes Lightning starts for devices > 1
        write_text_atomic(work / "worker_config.json", json.dumps(asdict(cfg), default=str))
        os.environ[WORKER_CONFIG_ENV] = str(work / "worker_config.json")
    t = time.perf_counter()
    trainer.fit(
        module,
        datamodule=data,
        ckpt_path=str(resume / "trainer_state.ckpt") if resume else None,
        weights_only=True,
    )
    timings["unet_s"] = time.perf_counter() - t
    if not trainer.is_global_zero:  # the first process evaluates and writes the model
        return {"steps": trainer.global_step, "rank": trainer.global_rank}
    return _finish(cfg, ctx, module, trainer, sampler, timings, t_start, reporter, truncated)


def _finish(cfg, ctx, module, trainer, sampler, timings, t_start, reporter, truncated) -> dict:
    out = Path(cfg.out)
    final = ctx.evaluate(module, trainer.global_step, cfg.eval.final_prompts)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # text_encoder/ also keeps the tokenizer that `load_text_to_image` reads; the export
    # adds what diffusers needs to load the same folder (model_index.json, tokenizer/,
    # scheduler/, the pipeline class).
    ctx.text_encoder.cpu().save(tmp / "text_encoder")
    export_diffusers_pipeline(
        tmp,
        module.ema_unet().cpu(),
        ctx.vae.cpu(),
        ctx.text_encoder,
        sampling_scheduler(cfg.eval.sampler, cfg.diffusion, cfg.eval.spacing, cfg.eval.clip_sample),
        num_inference_steps=cfg.eval.steps,
        guidance_scale=cfg.eval.guidance_scale,
        guidance_min_t=cfg.eval.guidance_min_t,
        layout_guidance_scale=cfg.eval.layout_guidance,
    )
    final["grid"].save(tmp / "validation_grid.png")
    score = final["score"]
    metrics = {
        "steps": trainer.global_step,
        "colour_following": score["colour_following"],
        "colour_following_chance": score["chance"],
        "colour_following_prompts": score["n"],
        "no_object": score["no_object"],
        "per_colour": score["per_colour"],
        "curve": ctx.curve,
        "prompt_style": ctx.style,
        "synthetic_captions_truncated": truncated,
        "text_probes": ctx.text_probes,
        "sampler": sampler["config"],
        "seconds": {**timings, "total_s": time.perf_counter() - t_start},
        "mlflow_run_id": ctx.logger.run_id if ctx.logger else None,
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    replace_dir(tmp, out)
    if ctx.logger:
        client = ctx.logger.experiment
        client.log_metric(ctx.logger.run_id, "final/colour_following", score["colour_following"])
        client.log_artifact(ctx.logger.run_id, str(out / "metrics.json"))
        client.log_image(ctx.logger.run_id, final["grid"], "validation_grid_final.png")
    reporter.materialized(
        {
            "path": str(out),
            "steps": trainer.global_step,
            "colour_following": score["colour_following"],
            "colour_following_chance": score["chance"],
            "train_seconds": round(metrics["seconds"]["total_s"], 1),
            "mlflow_run_id": metrics["mlflow_run_id"] or "",
        }
    )
    return metrics


def load_config(args: argparse.Namespace) -> DiffusionTrainConfig:
    if args.config:
        text = Path(args.config).read_text()
        d = json.loads(text) if args.config.suffix == ".json" else yaml.safe_load(text)
    else:
        d = load_section(args.params, "diffusion_model")
        d.update(
            {
                k: str(v)
                for k, v in (
                    ("raw", args.raw),
                    ("sampler", args.sampler),
                    ("autoencoder", args.autoencoder),
                    ("captioner", args.captioner),
                    ("text_encoder_dir", args.text_encoder),
                    ("out", args.out),
                )
                if v
            }
        )
        d.setdefault("mlflow_tracking_uri", os.environ.get("MLFLOW_TRACKING_URI"))
    return DiffusionTrainConfig.from_dict(d)


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the latent diffusion model.")
    ap.add_argument("--config", type=Path, help="JSON or YAML DiffusionTrainConfig")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--raw", type=Path)
    ap.add_argument("--sampler", type=Path)
    ap.add_argument("--autoencoder", type=Path)
    ap.add_argument("--captioner", type=Path, help="needed by text_encoder.pretrain.partner")
    ap.add_argument("--text-encoder", type=Path, help="the text_encoder asset's folder")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))):
        # A data-parallel process started by Lightning (it reruns this command): the
        # configuration is the first process's, which alone reports to Dagster.
        config = json.loads(Path(os.environ[WORKER_CONFIG_ENV]).read_text())
        print(json.dumps(train_diffusion(DiffusionTrainConfig.from_dict(config))))
        return
    with open_reporter() as reporter:
        if reporter.extras.get("config"):
            cfg = DiffusionTrainConfig.from_dict(reporter.extras["config"])
        else:
            cfg = load_config(args)
        metrics = train_diffusion(cfg, reporter)
    print(json.dumps({k: v for k, v in metrics.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
