"""The exported text-to-image folder is a diffusers pipeline: plain diffusers loads it
(without recapflow importable) and samples the same images as recapflow's `generate`."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from tokenizers import processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from corpus.params import load_section
from models import CONFIG_DIR
from models.common.tokenizer import train_bpe_tokenizer
from models.diffusion.autoencoder import AutoencoderConfig, build_autoencoder, to_model_range
from models.diffusion.diffusers_pipeline import (
    PIPELINE_MODULE,
    RecapflowPipeline,
    export_diffusers_pipeline,
)
from models.diffusion.model import (
    DiffusionConfig,
    UNetConfig,
    build_unet,
    generate,
    noise_scheduler,
    sampling_scheduler,
)
from models.diffusion.text_encoder import FrozenTextEncoder
from models.diffusion.text_to_image import load_text_to_image

PROMPTS = ["a red circle on a gray background", "two blue stars left of a green square"]
CONTEXT = 32
SEED, STEPS, GUIDANCE = 3, 3, 6.0
# Sampling options the export carries: x0 clipped (the scheduler's config) and guidance
# only at t >= 300 (the pipeline's config): of the 3 leading steps 666, 333, 0, the last
# runs unguided.
CLIP_SAMPLE, GUIDANCE_MIN_T = 1.0, 300
LAYOUT_GUIDANCE = 3.0  # the layout model's, against the empty caption (the pipeline's config)
PARAMS = Path(__file__).parents[3] / "params.yaml"

# What the exported pipeline.py may import: no recapflow package.
ALLOWED_IMPORTS = {
    "collections",
    "inspect",
    "json",
    "math",
    "shutil",
    "pathlib",
    "numpy",
    "PIL",
    "torch",
    "diffusers",
    "transformers",
}


def _recapflow_export(
    root: Path, autoencoder: str, text_map_channels: int = 0, layout: bool = False
) -> None:
    """A random tiny model written the way `diffusion_model`'s export step writes it
    (models/diffusion/train.py `_finish`), from recapflow's own builders and configs."""
    torch.manual_seed(0)
    words = [
        "a",
        "red",
        "blue",
        "green",
        "circle",
        "star",
        "square",
        "on",
        "left",
        "of",
        "two",
        "gray",
        "background",
    ]
    tok = train_bpe_tokenizer([" ".join(words[i:] + words[:i]) for i in range(12)] * 4, 300)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tok.eos_token_id)]
    )
    text_config = json.loads((CONFIG_DIR / "recapflow-tiny-text-encoder.json").read_text())
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **text_config,
            vocab_size=len(tok),
            max_position_embeddings=CONTEXT,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    encoder = FrozenTextEncoder(text, tok, CONTEXT)
    vae = build_autoencoder(AutoencoderConfig(config=autoencoder)).eval()
    with torch.no_grad():
        zeros = to_model_range(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        latent_shape = tuple(vae.encode(zeros).latent_dist.mode().shape[1:])
    # The layout UNet as params.yaml ships it.
    overrides = load_section(PARAMS, "diffusion_model")["unet"]["overrides"] if layout else None
    unet = build_unet(
        UNetConfig(text_map_channels=text_map_channels, layout=layout, overrides=overrides),
        encoder.hidden_size,
        encoder.pooled_size,
        latent_shape,
    )
    assert unet.config.class_embed_type == "projection"  # the stock pipeline cannot drive it
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    encoder.save(root / "text_encoder")
    noise_scheduler(DiffusionConfig()).save_pretrained(root / "scheduler")
    train_config = {
        "text_encoder": {"context_length": CONTEXT},
        "diffusion": asdict(DiffusionConfig()),
        "eval": {"steps": STEPS, "guidance_scale": GUIDANCE, "sampler": "ddim"},
    }
    (root / "train_config.json").write_text(json.dumps(train_config))


# Run by a fresh interpreter in which recapflow's packages cannot be imported: what a
# user with only diffusers and transformers does.
OUTSIDE_RECAPFLOW = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoRecapflow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"models", "corpus", "assets", "pipelines"}:
                raise ImportError(f"recapflow's {name} is not installed here")

    sys.meta_path.insert(0, NoRecapflow())
    folder, prompts, threads, seed, steps, guidance, out = sys.argv[1:]
    prompts = json.loads(prompts)

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(int(threads))
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompts,
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        generator=torch.Generator("cpu").manual_seed(int(seed)),
        output_type="np",
    ).images
    pil = pipe(prompts[:1], num_inference_steps=int(steps), seed=int(seed)).images[0]
    assert pil.mode == "RGB" and pil.size == (images.shape[2], images.shape[1]), pil
    np.save(out, images)
    print(type(pipe).__module__, type(pipe).__name__, type(pipe.tokenizer).__name__)
    """
)


# A trained AutoencoderKL (latents), the patch autoencoder (pixels, a component class of
# recapflow's own that the folder carries), and with it the UNet given a text map (another)
# or the UNet with its layout model (another, which samples a layout per image).
@pytest.fixture(
    scope="module",
    params=[
        ("recapflow-tiny-vae", 0, False),
        ("recapflow-tiny-patch", 0, False),
        ("recapflow-tiny-patch", 8, False),
        ("recapflow-tiny-patch", 0, True),
    ],
    ids=["vae", "patch", "patch-text-map", "patch-layout"],
)
def exported(request, tmp_path_factory) -> dict:
    """recapflow's export of a random tiny model, then the diffusers export into the same
    folder (as the `diffusion_model` asset does), and what `generate` draws from it."""
    root = tmp_path_factory.mktemp("diffusers_export") / "diffusion_model"
    autoencoder, text_map_channels, layout = request.param
    _recapflow_export(root, autoencoder, text_map_channels, layout)
    model = load_text_to_image(root)
    export_diffusers_pipeline(
        root,
        model.unet,
        model.vae,
        model.text_encoder,
        sampling_scheduler(model.eval_cfg["sampler"], model.diffusion, clip_sample=CLIP_SAMPLE),
        num_inference_steps=model.eval_cfg["steps"],
        guidance_scale=model.eval_cfg["guidance_scale"],
        guidance_min_t=GUIDANCE_MIN_T,
        layout_guidance_scale=LAYOUT_GUIDANCE,
    )
    # recapflow still reads the folder (the tokenizer files stay in text_encoder/).
    again = load_text_to_image(root)
    images = generate(
        again.unet,
        again.vae,
        again.text_encoder,
        PROMPTS,
        again.diffusion,
        seed=SEED,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        clip_sample=CLIP_SAMPLE,
        guidance_min_t=GUIDANCE_MIN_T,
        layout_guidance=LAYOUT_GUIDANCE,
    )
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert len(images.unique()) > 20  # not saturated: equal images below mean something
    return {
        "root": root,
        "expected": images.permute(0, 2, 3, 1).numpy(),
        "patch": autoencoder == "recapflow-tiny-patch",
        "text_map": bool(text_map_channels),
        "layout": layout,
    }


def test_export_is_a_diffusers_folder(exported):
    root = exported["root"]
    # model_index.json names every component's library and class, and the pipeline class
    # by the file in the folder.
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "RecapflowPipeline"]
    if exported["text_map"]:
        assert index["unet"] == ["text_map", "TextMapUNet2DConditionModel"]
        assert _imports(root / "unet" / "text_map.py") <= ALLOWED_IMPORTS
    elif exported["layout"]:
        assert index["unet"] == ["layout", "LayoutUNet2DConditionModel"]
        assert _imports(root / "unet" / "layout.py") <= ALLOWED_IMPORTS
    else:
        assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    if exported["patch"]:
        assert index["vae"] == ["patch_autoencoder", "PatchAutoencoder"]
        # The class comes with the folder, and needs nothing of recapflow either.
        assert _imports(root / "vae" / "patch_autoencoder.py") <= ALLOWED_IMPORTS
    else:
        assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["context_length"] == CONTEXT
    assert index["layout_guidance_scale"] == LAYOUT_GUIDANCE
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (root / name).is_dir(), name
    weights = [p.name for p in root.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt"}]
    # The UNet, the text encoder and, unless it is the parameter-free patch one, the VAE.
    vae_weights = [] if exported["patch"] else ["diffusion_pytorch_model.safetensors"]
    assert sorted(weights) == sorted(
        ["diffusion_pytorch_model.safetensors", "model.safetensors", *vae_weights]
    )
    # The scheduler recapflow samples with, on the training noise schedule.
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "DDIMScheduler"
    # Clipping as configured (eval.clip_sample), not diffusers' default: unset, nothing
    # is clipped (test_diffusion.py's test_sampler_reaches_latents_beyond_the_unit_range).
    assert scheduler_config["clip_sample"] is True
    assert scheduler_config["clip_sample_range"] == CLIP_SAMPLE
    assert scheduler_config["beta_schedule"] == DiffusionConfig().beta_schedule

    # The copied pipeline file needs nothing of recapflow.
    imported = _imports(root / f"{PIPELINE_MODULE}.py")
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


def _imports(path: Path) -> set[str]:
    nodes = list(ast.walk(ast.parse(path.read_text())))
    imported = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
    imported |= {
        n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module
    }
    return imported - {"__future__"}


def test_the_pipeline_samples_the_images_generate_samples(exported):
    root, expected = exported["root"], exported["expected"]
    # Code in the folder runs only when asked to.
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(root)
    # Inside recapflow: its own class, the folder's copy of the code not executed (the
    # patch autoencoder's file is recapflow's own).
    pipe = RecapflowPipeline.from_pretrained(root, trust_remote_code=exported["patch"])
    assert type(pipe) is RecapflowPipeline
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS, seed=SEED, output_type="uint8").images  # steps, guidance: exported
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    # Equal, not close: same weights, same ops in the same order, same noise.
    np.testing.assert_array_equal(out, expected)
    pil = pipe(PROMPTS, seed=SEED).images
    assert [im.mode for im in pil] == ["RGB"] * 2
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), expected)

    other = pipe([PROMPTS[1]] * 2, seed=SEED, output_type="uint8").images
    assert not np.array_equal(other[0], out[0])  # the prompt conditions the image
    negative = pipe(PROMPTS[:1], seed=SEED, negative_prompt="a blue star", output_type="uint8")
    assert negative.images.shape == (1, 32, 32, 3)
    assert not np.array_equal(negative.images[0], out[0])


def test_guidance_applies_from_guidance_min_t_and_to_the_layout(exported):
    m = load_text_to_image(exported["root"])

    def sample(**kw) -> torch.Tensor:
        return generate(m.unet, m.vae, m.text_encoder, PROMPTS, m.diffusion, seed=SEED,
                        steps=STEPS, **kw)  # fmt: skip

    unguided = sample(guidance_scale=1.0)
    assert torch.equal(sample(guidance_scale=GUIDANCE, guidance_min_t=1000), unguided)
    assert not torch.equal(sample(guidance_scale=GUIDANCE, guidance_min_t=GUIDANCE_MIN_T), unguided)
    if exported["layout"]:  # the layout model's guidance reaches the image
        guided = sample(guidance_scale=GUIDANCE, layout_guidance=LAYOUT_GUIDANCE)
        assert not torch.equal(guided, sample(guidance_scale=GUIDANCE))


@pytest.mark.slow  # a fresh interpreter
def test_plain_diffusers_loads_the_folder_without_recapflow(exported, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    args = [exported["root"], json.dumps(PROMPTS), torch.get_num_threads(), SEED, STEPS]
    args += [GUIDANCE, tmp_path / "images.npy"]
    result = subprocess.run(
        [sys.executable, "-c", OUTSIDE_RECAPFLOW, *map(str, args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "might require the following packages" not in result.stderr  # diffusers' check
    assert f"diffusers_modules.local.{PIPELINE_MODULE} RecapflowPipeline" in result.stdout
    images = np.load(tmp_path / "images.npy")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(np.round(images * 255).astype(np.uint8), exported["expected"])
