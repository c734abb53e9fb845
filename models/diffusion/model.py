"""The text-to-image model: a diffusers `UNet2DConditionModel` on cached latents, as a
`LightningModule` (DDPM objective, min-SNR loss weighting, EMA weights, classifier-free
guidance through caption dropout) and the sampler that turns prompts into images.

The UNet is conditioned two ways on the frozen text encoder: cross-attention on the
per-token states (which object has which attribute) and the pooled caption vector added
to the timestep embedding (`class_embed_type="projection"`, as unCLIP and SDXL add
pooled text), which carries global attributes such as colour from the first steps on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.training_utils import EMAModel, compute_snr

from models import CONFIG_DIR
from models.common.clip import warmup_cosine_adamw
from models.common.optimizer_steps import stepped
from models.diffusion.autoencoder import to_uint8
from models.diffusion.layout import LayoutUNet2DConditionModel
from models.diffusion.text_encoder import FrozenTextEncoder
from models.diffusion.text_map import TextMapUNet2DConditionModel


@dataclass(frozen=True)
class UNetConfig:
    config: str = "recapflow-tiny-unet"  # a config in models/configs ...
    overrides: dict | None = None  # ... with sizes changed from params.yaml (full: bigger)
    # > 0: the caption also given as a map of this many channels per latent position,
    # concatenated to the noisy latent (models/diffusion/text_map.py); 0: the stock UNet
    text_map_channels: int = 0
    text_map_queries: str = "mlp"  # how its places ask (text_map.py QUERIES)
    # true: the map also draws the output, which the UNet's output is added to (x0
    # prediction only); map_loss and map_pretrain_steps train that drawing
    text_map_draws: bool = False
    # > 0: this many fixed sine features of each latent position concatenated to the
    # input, so that every layer, the cross-attention's queries too, knows where it is
    # (convolutions alone learn it only from the borders); needs the text map
    position_channels: int = 0
    # > 0: this many bidirectional transformer layers over the text tower's token states,
    # trained with the UNet, before the map and the cross-attention read them; needs the
    # text map
    text_binder_layers: int = 0
    # true: a layout model inside the UNet samples each image's layout from the caption,
    # and the UNet draws it (models/diffusion/layout.py); the training images' layouts
    # come from the world's annotation of the raw dataset (tiny profile only)
    layout: bool = False
    layout_width: int = 128
    layout_layers: int = 3


# What the UNet predicts: the noise, the velocity (Salimans & Ho 2022) or the clean
# latent itself (diffusers calls it "sample").
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FOREGROUND_OF = ("target", "either", "copies")


@dataclass(frozen=True)
class DiffusionConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 2000
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # one of PREDICTION_TYPES
    snr_gamma: float | None = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023); None: off
    # Timesteps are drawn with probability proportional to their min-SNR weight to this
    # power, and each sample's error is weighed by weight / probability, so the objective
    # is the same for every power: 0 draws uniformly (every sample weighed by its own
    # weight), 1 draws in proportion to the weight (every sample weighs the same), so no
    # step is spent on the noisiest timesteps whose weight is near 0.
    timestep_power: float = 0.0
    ema_decay: float = 0.999
    # > 1: latent positions that hold an object (they differ from the image's background,
    # its per-channel median) and their neighbours weigh this much more in the loss
    foreground_weight: float = 1.0
    # Where that weight applies: "target", where the clean latent holds an object; "either",
    # also where the model's x0 prediction draws one. A weight set by the target alone makes
    # the best prediction of an uncertain place lean towards an object, so the sampler
    # draws copies wherever one might stand; "either" weighs a drawn copy as much as a
    # missed object, and its loss is the mean over both. "copies": the same weights, but
    # the loss is divided by the target's weights only, so a drawn copy adds to the loss
    # without diluting the weight of the objects that are there. x0 prediction only.
    foreground_of: str = "target"
    # > 0: the text map is also trained to draw the clean latent from the caption alone
    # (a 1x1 convolution of the map, its foreground-weighted error times this), so that it
    # carries where the caption puts each object; 0: it learns only through the UNet
    map_loss: float = 0.0
    # > 0: before the UNet trains, the text map and that head train alone this many steps
    # of `batch_size` on the map loss: through the UNet the map learns where a caption
    # puts its objects far slower than the UNet's steps allow. The map is then frozen
    # while the UNet trains, unless map_loss > 0 keeps training it.
    map_pretrain_steps: int = 0
    map_pretrain_lr: float | None = None  # None: lr
    # Which captions the map pretrains on: "blend", those the UNet will see (alt texts
    # and dropped captions too, which name no place); "synthetic", the synthetic captions
    # alone, which name every place, so the map also lays out a short prompt that names
    # none.
    map_pretrain_captions: Literal["blend", "synthetic"] = "blend"
    # With unet.layout: the layout model trains alone first, this many steps of this
    # batch size, on the captions in the sampler's blend; then it is frozen while the
    # UNet learns to draw the training images' own layouts
    layout_steps: int = 3000
    layout_batch_size: int = 128
    layout_lr: float = 1e-3


def build_unet(
    cfg: UNetConfig, text_hidden: int, text_pooled: int, latent_shape: tuple[int, ...]
) -> UNet2DConditionModel:
    config = json.loads((CONFIG_DIR / f"{cfg.config}.json").read_text())
    config.update(cfg.overrides or {})
    # The autoencoder decides the latent shape and the text encoder the conditioning
    # widths, whichever profile.
    c, h, _ = latent_shape
    config.update(in_channels=c, out_channels=c, sample_size=h)
    config["cross_attention_dim"] = text_hidden
    if config.get("class_embed_type") == "projection":
        config["projection_class_embeddings_input_dim"] = text_pooled
    config.pop("_class_name", None)
    if cfg.layout:
        if cfg.text_map_channels or cfg.position_channels or cfg.text_binder_layers:
            raise ValueError(
                "unet.layout replaces the text map: set unet.text_map_channels, "
                "position_channels and text_binder_layers to 0"
            )
        from corpus.world import BACKGROUNDS, COLORS, SHAPES, SIZES, WORDS

        config["layout_classes"] = {
            "shape": list(SHAPES),
            "colour": list(COLORS),
            "size": list(SIZES),
            "word": list(WORDS),
            "background": list(BACKGROUNDS),
        }
        config.update(layout_width=cfg.layout_width, layout_layers=cfg.layout_layers)
        unet = LayoutUNet2DConditionModel.from_config(config)
    elif cfg.text_map_channels:
        config["text_map_channels"] = cfg.text_map_channels
        config["text_map_queries"] = cfg.text_map_queries
        config["text_map_draws"] = cfg.text_map_draws
        config["position_channels"] = cfg.position_channels
        config["text_binder_layers"] = cfg.text_binder_layers
        unet = TextMapUNet2DConditionModel.from_config(config)
    elif cfg.position_channels or cfg.text_binder_layers:
        raise ValueError(
            "unet.position_channels and text_binder_layers need the text map "
            "(unet.text_map_channels > 0)"
        )
    else:
        unet = UNet2DConditionModel.from_config(config)
    unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA kernels
    return unet


def load_unet(folder: Path) -> UNet2DConditionModel:
    """The UNet saved in `folder` by `save_pretrained`: stock, with a text map or with a
    layout, by the class its config names."""
    name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    classes = (TextMapUNet2DConditionModel, LayoutUNet2DConditionModel)
    cls = next((c for c in classes if c.__name__ == name), UNet2DConditionModel)
    return cls.from_pretrained(folder)


def noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    # clip_sample=False: diffusers' default clips the predicted x0 to [-1, 1], meant for
    # pixels; scaled latents have std 1, so it cut every object's latent and the samples
    # lost their objects (docs/log/).
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def object_positions(z: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, H, W) bool: the positions of latents (B, C, H, W) that differ from the image's
    per-channel median (its background) by more than `threshold`."""
    background = z.flatten(2).median(-1).values[..., None, None]
    return (z - background).abs().amax(1) > threshold


def foreground_weights(z: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """(B, H, W) loss weights of clean latents (B, C, H, W): `weight` where a position or
    one of its 8 neighbours holds an object (`object_positions`), 1 elsewhere. The objects
    prompts are about cover a fifth of an image or less; the loss of a flat background
    otherwise outweighs their shapes."""
    held = object_positions(z, threshold)[:, None].float()
    near = F.max_pool2d(held, 3, stride=1, padding=1)[:, 0]
    return 1 + (weight - 1) * near


class LatentDiffusion(L.LightningModule):
    """Batches are dicts of cached `latents` (already scaled), text `states` and
    `pooled` vectors; the empty caption's embedding stands in for dropped captions."""

    def __init__(self, unet: UNet2DConditionModel, cfg: DiffusionConfig):
        super().__init__()
        self.unet, self.cfg = unet, cfg
        self.scheduler = noise_scheduler(cfg)
        self.ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
        if cfg.foreground_of not in FOREGROUND_OF:
            raise ValueError(
                f"unknown diffusion.foreground_of {cfg.foreground_of!r}; "
                f"expected one of {FOREGROUND_OF}"
            )
        if cfg.foreground_of != "target" and cfg.prediction_type != "sample":
            raise ValueError(
                f"diffusion.foreground_of {cfg.foreground_of!r} reads where the model's x0 "
                "prediction draws objects: it needs prediction_type 'sample', not "
                f"{cfg.prediction_type!r}"
            )
        self._map_draws = bool(getattr(unet.config, "text_map_draws", False))
        if self._map_draws and cfg.prediction_type != "sample":
            raise ValueError(
                "unet.text_map_draws adds the map's drawing of the clean latent to the "
                f"UNet's output: it needs prediction_type 'sample', not {cfg.prediction_type!r}"
            )
        if cfg.map_loss or cfg.map_pretrain_steps:
            if not isinstance(unet, TextMapUNet2DConditionModel):
                raise ValueError(
                    "diffusion.map_loss and map_pretrain_steps need a text map "
                    "(unet.text_map_channels)"
                )
            if not self._map_draws:  # training only: the exported UNet does not need it
                self.map_head = torch.nn.Conv2d(
                    unet.config.text_map_channels, unet.config.in_channels, 1
                )
            # Frozen from the start, so a resumed run's optimizer gets the same parameters.
            self._map_frozen = bool(cfg.map_pretrain_steps and not cfg.map_loss)
            self._map_pair().requires_grad_(not self._map_frozen)
        self._step_at_batch_start = -1
        self.save_hyperparameters(
            {"diffusion": asdict(cfg), "unet": dict(unet.config)}, logger=False
        )

    def _unet(self, latents, t, states, pooled, layout=None):
        class_labels = pooled if self.unet.config.class_embed_type == "projection" else None
        extra = {} if layout is None else {"layout": layout}
        return self.unet(
            latents, t, encoder_hidden_states=states, class_labels=class_labels, **extra
        ).sample

    def diffusion_loss(self, batch: dict) -> torch.Tensor:
        z = batch["latents"].float()
        noise = torch.randn_like(z)
        t, share = self._timesteps(len(z), z.device)
        noisy = self.scheduler.add_noise(z, noise, t)
        states, pooled = batch["states"].to(z.dtype), batch["pooled"].to(z.dtype)
        extra = {"layout": batch["layout"]} if "layout" in batch else {}
        pred = self._unet(noisy, t, states, pooled, **extra)
        kind = self.cfg.prediction_type
        if kind == "v_prediction":
            target = self.scheduler.get_velocity(z, noise, t)
        else:
            target = z if kind == "sample" else noise
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        if self.cfg.foreground_weight != 1:
            weight = norm = foreground_weights(z, self.cfg.foreground_weight)
            if self.cfg.foreground_of != "target":
                drawn = foreground_weights(pred.detach().float(), self.cfg.foreground_weight)
                weight = torch.maximum(weight, drawn)
                if self.cfg.foreground_of == "either":
                    norm = weight
            per_sample = (error.mean(1) * weight).sum((1, 2)) / norm.sum((1, 2))
        else:
            per_sample = error.mean((1, 2, 3))
        if self.cfg.snr_gamma:
            per_sample = per_sample * self._snr_weights(t) / share
        loss = per_sample.mean()
        if self.cfg.map_loss:
            loss = loss + self.cfg.map_loss * self._map_loss(z, batch["states"].to(z.dtype))
        return loss

    def _snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        # min-SNR-gamma weights the x0 error by min(SNR, gamma); an epsilon error is
        # SNR times an x0 error, a velocity error SNR + 1 times.
        snr = compute_snr(self.scheduler, t)
        clamped = snr.clamp(max=self.cfg.snr_gamma)
        per_snr = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}
        return clamped / per_snr[self.cfg.prediction_type]

    def _timesteps(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` timesteps, and each one's probability relative to uniform drawing."""
        steps = self.cfg.num_train_timesteps
        if not (self.cfg.timestep_power and self.cfg.snr_gamma):
            return torch.randint(0, steps, (n,), device=device), torch.ones(n, device=device)
        every = torch.arange(steps, device=device)
        p = self._snr_weights(every).float() ** self.cfg.timestep_power
        p = p / p.sum()
        t = torch.multinomial(p, n, replacement=True)
        return t, p[t] * steps

    def _map_loss(self, z: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The error of the clean latent as the caption's map alone draws it."""
        drawn = self._map_drawer()(self.unet.text_map(self.unet.bound_states(states)))
        error = F.mse_loss(drawn.float(), z, reduction="none").mean(1)
        weight = foreground_weights(z, self.cfg.foreground_weight)
        return ((error * weight).sum((1, 2)) / weight.sum((1, 2))).mean()

    def pretrain_map(
        self,
        latents: torch.Tensor,
        states: torch.Tensor,
        batch_size: int,
        progress: Callable[[int, float], None] | None = None,
        variants: torch.Tensor | None = None,
    ) -> float:
        """Trains the text map and its head alone on (caption states, clean latents) for
        `map_pretrain_steps` steps at `map_pretrain_lr`, calling `progress(step, loss)`
        every 500; the EMA then starts from the trained map, frozen unless `map_loss`.

        `states` is (rows, tokens, width), or (caption variants, rows, tokens, width) with
        `variants` (epochs, rows) naming the variant each row gets in each epoch: the map
        then learns from the captions the UNet will see, in the same blend (alt texts and
        empty captions too, which name no place). Returns the last step's map loss."""
        pair = self._map_pair().requires_grad_(True)
        steps, lr = self.cfg.map_pretrain_steps, self.cfg.map_pretrain_lr or self.cfg.lr
        opt = warmup_cosine_adamw(
            pair, lr, self.cfg.weight_decay, min(self.cfg.warmup_steps, steps), steps
        )
        for step in range(1, steps + 1):
            i = torch.randint(0, len(latents), (batch_size,))
            if variants is None:
                s = states[i]
            else:
                s = states[variants[torch.randint(0, len(variants), ())][i], i]
            loss = self._map_loss(latents[i].float(), s.float())
            loss.backward()
            opt["optimizer"].step()
            opt["optimizer"].zero_grad(set_to_none=True)
            opt["lr_scheduler"]["scheduler"].step()
            if progress and (step % 500 == 0 or step == steps):
                progress(step, loss.item())
        pair.requires_grad_(not self._map_frozen)
        self.ema = EMAModel(self.unet.parameters(), decay=self.cfg.ema_decay, use_ema_warmup=True)
        return loss.item()

    def _map_pair(self) -> torch.nn.ModuleDict:
        # The binder, where there is one, is what the map reads: it trains and freezes
        # with the map.
        parts = {"map": self.unet.text_map, "head": self._map_drawer()}
        if self.unet.text_binder is not None:
            parts["binder"] = self.unet.text_binder
        return torch.nn.ModuleDict(parts)

    def _map_drawer(self) -> torch.nn.Module:
        return self.unet.map_draw if self._map_draws else self.map_head

    def on_fit_start(self) -> None:
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.ema.to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_at_batch_start = self.trainer.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # The EMA follows optimizer steps: a batch that only accumulated gradients is skipped.
        if stepped(self.trainer, self._step_at_batch_start):
            self.ema.step(self.unet.parameters())

    def configure_optimizers(self):
        return warmup_cosine_adamw(
            self, self.cfg.lr, self.cfg.weight_decay, self.cfg.warmup_steps, self.cfg.max_steps
        )

    def ema_unet(self) -> UNet2DConditionModel:
        """A copy of the UNet holding the EMA weights (what is sampled and exported)."""
        unet = type(self.unet).from_config(self.unet.config)
        unet.set_attn_processor(AttnProcessor2_0())
        self.ema.copy_to(unet.parameters())
        return unet.to(self.device).eval()


# DPM-Solver++ (diffusers 0.42) gave noise images on this cosine schedule, with and
# without lambda_min_clipped, where DDIM from the same weights gave scenes: not offered.
SAMPLERS = {"ddim": DDIMScheduler}
# "leading" starts at t=950 of 1000 (20 steps); "trailing" at t=999, where the cosine
# schedule leaves alpha_bar = 2.4e-9: only a v-predicting model's x0 survives it.
SPACINGS = ("leading", "trailing")


def sampling_scheduler(
    sampler: str,
    train_cfg: DiffusionConfig,
    spacing: str = "leading",
    clip_sample: float | None = None,
):
    """The fast scheduler `generate` samples with, on the training noise schedule;
    `clip_sample`: each step's x0 estimate clipped to [-clip_sample, clip_sample]
    (diffusers' `clip_sample`), None: not clipped."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    config = noise_scheduler(train_cfg).config
    clip = {"clip_sample": clip_sample is not None, "clip_sample_range": clip_sample or 1.0}
    return SAMPLERS[sampler].from_config(config, timestep_spacing=spacing, **clip)


@torch.no_grad()
def generate(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: FrozenTextEncoder,
    prompts: list[str],
    train_cfg: DiffusionConfig,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    batch_size: int = 128,
    spacing: str = "leading",
    clip_sample: float | None = None,
    guidance_min_t: int = 0,
    layout_guidance: float = 1.0,
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) for the prompts, with classifier-free guidance at the
    steps whose t >= `guidance_min_t` (the conditional prediction alone below it) and,
    for a layout UNet, `layout_guidance` on its layout model (`LayoutModel.sample`); the
    same seed gives the same images."""
    device = next(unet.parameters()).device
    sched = sampling_scheduler(sampler, train_cfg, spacing, clip_sample)
    empty_states, empty_pooled = text_encoder([""])
    gen = torch.Generator("cpu").manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        n = len(chunk)
        states, pooled = text_encoder(chunk)
        states = torch.cat([empty_states.expand(n, -1, -1), states]).to(device)
        pooled = torch.cat([empty_pooled.expand(n, -1), pooled]).to(device)
        class_labels = pooled if unet.config.class_embed_type == "projection" else None
        latents = torch.randn((n, c, s, s), generator=gen).to(device) * sched.init_noise_sigma
        extra = {}
        if hasattr(unet, "plan"):  # a layout UNet: one layout per image, for every step
            empty = (empty_states.to(device), text_encoder.token_mask([""]).to(device))
            mask = text_encoder.token_mask(chunk).to(device)
            layout = unet.plan(states[n:], mask, gen, guidance=layout_guidance, empty=empty)
            extra["layout"] = torch.cat([torch.full_like(layout, -1), layout])
        sched.set_timesteps(steps, device=device)
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = unet(
                inp, t, encoder_hidden_states=states, class_labels=class_labels, **extra
            ).sample
            uncond, cond = eps.chunk(2)
            scale = guidance_scale if t >= guidance_min_t else 1.0
            latents = sched.step(uncond + scale * (cond - uncond), t, latents).prev_sample
        scale = vae.config.scaling_factor
        out.append(to_uint8(vae.decode(latents.to(vae.dtype) / scale).sample.float()).cpu())
    return torch.cat(out)
