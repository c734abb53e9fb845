"""recapflow's text-to-image model as a diffusers pipeline, loadable without recapflow.

The UNet is conditioned twice on the frozen text encoder: cross-attention on the
per-token states and the pooled caption vector as `class_labels`
(`class_embed_type="projection"`), which the stock `StableDiffusionPipeline` does not
pass. `RecapflowPipeline` does, and samples exactly as `models.diffusion.model.generate`
does: the same tokens (padded to the context length, EOS last), the same pooling (CLIP:
the projected state at the first EOS; T5: the masked mean), the empty caption as the
unconditional branch of classifier-free guidance, the same noise for the same seed, the
same images (tests/models/diffusion/test_diffusers_export.py checks it).

This file imports only torch, numpy, PIL, diffusers and transformers: `save_pretrained`
copies it into the folder as `recapflow_pipeline.py` and names it in `model_index.json`
(`"_class_name": ["recapflow_pipeline", "RecapflowPipeline"]`), so anyone with diffusers
and transformers loads the folder:

    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained("data/diffusion_model", trust_remote_code=True)
    >>> image = pipe("a red circle", seed=0).images[0]  # steps, guidance: the exported ones

and inside recapflow, without running the folder's copy of the code:

    >>> from models.diffusion.diffusers_pipeline import RecapflowPipeline
    >>> pipe = RecapflowPipeline.from_pretrained("data/diffusion_model")

Keep it self-contained: no recapflow imports here (diffusers' `check_imports` reads every
line that starts with `import` or `from`, docstrings included, and warns about modules it
cannot import).
"""

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModelWithProjection, PreTrainedModel, PreTrainedTokenizerBase

PIPELINE_MODULE = "recapflow_pipeline"  # the file name (without .py) in an exported folder


class RecapflowPipeline(DiffusionPipeline):
    """Text to image with a UNet conditioned on per-token states (cross-attention) and,
    when `class_embed_type="projection"`, the pooled caption vector (`class_labels`).

    `context_length` is the token length the text encoder was trained with;
    `num_inference_steps` and `guidance_scale` are the defaults `__call__` samples with
    (recapflow writes the settings its evaluation used); guidance applies at the steps
    whose t >= `guidance_min_t`, the conditional prediction alone below it. A layout
    UNet's layout model samples with guidance `layout_guidance_scale` against the same
    unconditional caption (1: none)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: ModelMixin,  # AutoencoderKL, or the patch autoencoder (pixels)
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: SchedulerMixin,
        context_length: int = 64,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        guidance_min_t: int = 0,
        layout_guidance_scale: float = 1.0,
    ):
        super().__init__()
        self.register_modules(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.register_to_config(
            context_length=context_length,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_min_t=guidance_min_t,
            layout_guidance_scale=layout_guidance_scale,
        )

    # -- the prompt -------------------------------------------------------------------

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, context_length) ids: the caption's tokens cut to leave room for EOS, EOS,
        then padding (recapflow's `ClipTextTokenizer`)."""
        n, eos = self.config.context_length, self.tokenizer.eos_token_id
        out = torch.full((len(texts), n), self._pad_id(), dtype=torch.long)
        for i, ids in enumerate(self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            ids = [*ids[: n - 1], eos]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    @torch.no_grad()
    def encode_prompt(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, L, hidden), pooled (B, dim)), as recapflow's `FrozenTextEncoder`.

        CLIP: pooled at the first EOS, not by transformers, which pools at the highest
        token id when the config's `eos_token_id` is 2 (the tiny tokenizer's real EOS)."""
        model = self.text_encoder
        ids = self.tokenize(texts).to(model.device)
        if isinstance(model, CLIPTextModelWithProjection):
            states = model(input_ids=ids).last_hidden_state
            eos = (ids == self.tokenizer.eos_token_id).int().argmax(-1)
            pooled = states[torch.arange(len(ids), device=ids.device), eos]
            return states, model.text_projection(pooled)
        mask = (ids != self._pad_id()).long()
        states = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return states, pooled

    # -- sampling ---------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        layout_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 128,
    ):
        """Images for the prompts, with classifier-free guidance against the empty
        caption (or `negative_prompt`). `seed` (a CPU generator seeded with it) gives the
        same images as recapflow's `generate(..., seed=seed)`; `generator` is diffusers'
        usual way. `output_type`: "pil" (list of images), "np" (float (N, H, W, 3) in
        [0, 1]), "pt" (float (N, 3, H, W) in [0, 1]), "uint8" (numpy (N, H, W, 3)) or
        "latent". Guidance always runs both branches, as recapflow's sampler does."""
        steps = num_inference_steps or self.config.num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        layout_scale = layout_guidance_scale
        if layout_scale is None:
            layout_scale = self.config.layout_guidance_scale
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        elif negative_prompt is not None:
            negatives = [p for p in negative_prompt for _ in range(num_images_per_prompt)]
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if seed is not None:
            if generator is not None:
                raise ValueError("give a seed or a generator, not both")
            generator = torch.Generator("cpu").manual_seed(seed)

        device = self._execution_device
        unet, sched = self.unet, self.scheduler
        c, s = unet.config.in_channels, unet.config.sample_size
        projection = unet.config.class_embed_type == "projection"
        if negative_prompt is None:  # encoded once, alone, as recapflow's sampler does
            empty_states, empty_pooled = self.encode_prompt([""])
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            n = len(chunk)
            states, pooled = self.encode_prompt(chunk)
            if negative_prompt is None:
                neg_states = empty_states.expand(n, -1, -1)
                neg_pooled = empty_pooled.expand(n, -1)
            else:
                neg_states, neg_pooled = self.encode_prompt(negatives[i : i + batch_size])
            states = torch.cat([neg_states, states]).to(device, unet.dtype)
            pooled = torch.cat([neg_pooled, pooled]).to(device, unet.dtype)
            class_labels = pooled if projection else None
            gen = generator[i : i + n] if isinstance(generator, list) else generator
            if latents is None:
                x = randn_tensor((n, c, s, s), generator=gen, device=device, dtype=torch.float32)
            else:
                x = latents[i : i + n].to(device, torch.float32)
            x = x * sched.init_noise_sigma
            extra = {}
            if hasattr(unet, "plan"):  # a layout UNet: one layout per image, every step
                mask = (self.tokenize(chunk) != self._pad_id()).to(device)
                negs = [""] * n if negative_prompt is None else negatives[i : i + batch_size]
                empty = (states[:n], (self.tokenize(negs) != self._pad_id()).to(device))
                plan_gen = gen[0] if isinstance(gen, list) else gen
                layout = unet.plan(states[n:], mask, plan_gen, guidance=layout_scale, empty=empty)
                extra["layout"] = torch.cat([torch.full_like(layout, -1), layout])
            sched.set_timesteps(steps, device=device)
            for t in self.progress_bar(sched.timesteps):
                inp = sched.scale_model_input(torch.cat([x, x]), t).to(unet.dtype)
                eps = unet(
                    inp, t, encoder_hidden_states=states, class_labels=class_labels, **extra
                ).sample
                uncond, cond = eps.float().chunk(2)
                g = scale if t >= self.config.guidance_min_t else 1.0
                x = sched.step(uncond + g * (cond - uncond), t, x).prev_sample
            if output_type == "latent":
                out.append(x)
                continue
            decoded = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor)
            # recapflow's to_uint8: [-1, 1] -> 0..255, rounded
            out.append(decoded.sample.float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu())
        self.maybe_free_model_hooks()

        images = torch.cat(out)
        if output_type == "latent":
            pass
        elif output_type == "pt":
            images = images.float() / 255
        else:
            array = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = [PIL.Image.fromarray(a) for a in array]
            elif output_type == "np":
                images = array.astype(np.float32) / 255
            elif output_type == "uint8":
                images = array
            else:
                raise ValueError(f"unknown output_type {output_type!r}")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- saving and loading -------------------------------------------------------------

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs):
        """diffusers' folder (safetensors), plus this file as `recapflow_pipeline.py`,
        named in `model_index.json`, so plain `DiffusionPipeline.from_pretrained` finds
        the class."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        folder = Path(save_directory)
        shutil.copyfile(Path(__file__), folder / f"{PIPELINE_MODULE}.py")
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        for name in ("unet", "vae"):
            component = type(getattr(self, name))
            if component.__module__.split(".")[0] != "diffusers":
                # A component class of recapflow's own (the patch autoencoder, the UNet
                # with a text map): its file goes into the component folder, where
                # diffusers loads custom components from.
                source = Path(inspect.getfile(component))
                shutil.copyfile(source, folder / name / source.name)
                index[name] = [source.stem, component.__name__]
        if index.get("tokenizer", [None, None])[1] == "TokenizersBackend":
            # transformers 5's name for a fast tokenizer; 4.x knows the alias
            index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_config(cls, *args, **kwargs):
        """`RecapflowPipeline.from_pretrained(folder)` builds this class, not the copy of
        the code in the folder (which `DiffusionPipeline.from_pretrained` imports)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        name = config.get("_class_name")
        if isinstance(name, list) and name == [PIPELINE_MODULE, cls.__name__]:
            config["_class_name"] = cls.__name__
        return loaded


def export_diffusers_pipeline(
    folder: Path,
    unet: UNet2DConditionModel,
    vae: ModelMixin,
    text_encoder,
    scheduler: SchedulerMixin,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    guidance_min_t: int = 0,
    layout_guidance_scale: float = 1.0,
) -> RecapflowPipeline:
    """Write a diffusers pipeline folder: model_index.json, recapflow_pipeline.py,
    unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (the scheduler to sample with,
    e.g. recapflow's `sampling_scheduler(sampler, DiffusionConfig)`), all weights in
    safetensors. `text_encoder` is recapflow's `FrozenTextEncoder` (its `model`,
    `tokenizer` and `context_length` are used).

    `folder` may be recapflow's own export (unet/, vae/, text_encoder/ with the tokenizer
    files): the component folders are rewritten with the same weights, the tokenizer
    files in text_encoder/ stay, and scheduler/ becomes the sampling scheduler (whose
    config also holds the training noise schedule)."""
    pipe = RecapflowPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.model,
        tokenizer=text_encoder.tokenizer,
        scheduler=scheduler,
        context_length=text_encoder.context_length,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        guidance_min_t=guidance_min_t,
        layout_guidance_scale=layout_guidance_scale,
    )
    if (Path(folder) / "scheduler").exists():
        shutil.rmtree(Path(folder) / "scheduler")  # no stale keys of another scheduler
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
