"""The diffusion training process: runs standalone, resumes after SIGKILL to the same
step count in the same MLflow run, fails before training on what cannot work, and loads
pretrained components through the same code as a user's hub id or folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from corpus.caption_mix import MixConfig, build_mixed_sampler
from corpus.config import ConfigError
from corpus.palette import colour_kept, dominant_object_colour
from corpus.world import Scene, SceneObject, render
from models.common.data import load_images
from models.common.tokenizer import train_bpe_tokenizer
from models.diffusion.autoencoder import (
    AutoencoderConfig,
    MissingAutoencoderError,
    load_autoencoder,
    train_autoencoder,
)
from models.diffusion.layout import LayoutUNet2DConditionModel
from models.diffusion.model import (
    PREDICTION_TYPES,
    DiffusionConfig,
    LatentDiffusion,
    UNetConfig,
    build_unet,
    sampling_scheduler,
)
from models.diffusion.text_encoder import MissingTextEncoderError, load_text_encoder
from models.diffusion.text_to_image import load_text_to_image
from models.diffusion.text_tower import build_text_encoder, sampler_captions
from models.diffusion.train import DiffusionTrainConfig, parallelism, train_diffusion
from models.evaluation.colour_following import colour_prompts, score_colours

REPO = Path(__file__).resolve().parents[3]
TINY_UNET = {
    "block_out_channels": [16, 32, 32],
    "norm_num_groups": 8,
    "attention_head_dim": 4,
}


@pytest.fixture(scope="module")
def tiny_training_inputs(tiny_raw, tmp_path_factory) -> dict[str, Path]:
    """A mixed sampler over the tiny raw corpus (ground-truth-like captions: mechanics
    only) and a tiny autoencoder trained for a few steps."""
    root = tmp_path_factory.mktemp("diffusion_inputs")
    index = pd.read_parquet(tiny_raw / "index.parquet")
    rec = root / "recaptioned"
    rec.mkdir()
    df = index[["key", "shard", "split", "alt_text"]].copy()
    df["short_caption"] = "a shape"
    df["descriptive_caption"] = "A photo of a shape on a background. " + df["alt_text"]
    df.to_parquet(rec / "all.parquet")
    build_mixed_sampler(rec, root / "sampler", MixConfig(epochs=30))
    ae = AutoencoderConfig(max_steps=3, batch_size=16, warmup_steps=1, eval_images=8)
    train_autoencoder(ae, tiny_raw, root / "autoencoder")
    return {"raw": tiny_raw, "sampler": root / "sampler", "autoencoder": root / "autoencoder"}


def tiny_config(inputs: dict[str, Path], out: Path, **overrides) -> dict:
    d = {
        "raw": str(inputs["raw"]),
        "sampler": str(inputs["sampler"]),
        "autoencoder": str(inputs["autoencoder"]),
        "out": str(out / "model"),
        "work": str(out / "work"),
        "batch_size": 16,
        "checkpoint_every": 5,
        "text_encoder": {"pretrain": {"max_steps": 3, "batch_size": 16}, "context_length": 32},
        "unet": {"overrides": TINY_UNET},
        "diffusion": {"max_steps": 12, "warmup_steps": 2},
        "eval": {
            "prompts": 8,
            "final_prompts": 8,
            "every": 6,
            "steps": 2,
            "grid_prompts": 8,
            "text_probes": 80,
        },
        "mlflow_tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
    }
    d.update(overrides)
    return d


def run_training(config_file: Path, new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "models.diffusion.train", "--config", str(config_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,  # its own process group: with the workers it starts
    )


@pytest.mark.slow  # training processes, one killed
def test_sigkill_then_rerun_resumes_to_the_same_step_in_the_same_run(
    tiny_training_inputs, tmp_path
):
    cfg = tiny_config(
        tiny_training_inputs, tmp_path, diffusion={"max_steps": 60, "warmup_steps": 2}
    )
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(cfg))
    ckpts = tmp_path / "work" / "checkpoints"
    proc = run_training(config_file)
    deadline = time.monotonic() + 600
    while not (ckpts / "latest").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = (ckpts / "latest").read_text().strip()
    assert killed_at.startswith("step-") and int(killed_at[5:]) < 60
    run_id = json.loads((tmp_path / "work" / "mlflow_run.json").read_text())["run_id"]
    assert not (tmp_path / "model").exists()  # the export is written only at the end

    proc = run_training(config_file)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert f"resuming from {ckpts / killed_at}" in out
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["steps"] == 60
    assert metrics["mlflow_run_id"] == run_id  # the same MLflow run continues
    # The text encoder's linear probes, kept once per encoder: the same after the resume.
    assert set(metrics["text_probes"]) >= {"pooled", "tokens", "captions"}
    assert metrics["text_probes"]["captions"] == 80
    client = mlflow.MlflowClient(cfg["mlflow_tracking_uri"])
    losses = client.get_metric_history(run_id, "train/loss")
    assert max(m.step for m in losses) >= 50
    assert client.get_metric_history(run_id, "text_probe/noun/shape")
    curve_steps = [p["step"] for p in metrics["curve"]]
    assert curve_steps == sorted(set(curve_steps)) and curve_steps[-1] == 60
    # The export is a diffusers-style folder whose weights are safetensors.
    for part in ("unet", "vae", "text_encoder"):
        assert list((tmp_path / "model" / part).glob("*.safetensors")), part
    assert (tmp_path / "model" / "validation_grid.png").exists()
    # Checkpoints hold no pickled weights: the state file loads with weights_only=True.
    last = ckpts / (ckpts / "latest").read_text().strip()
    state = torch.load(last / "trainer_state.ckpt", weights_only=True)
    assert "state_dict" not in state and state["global_step"] == 60
    assert {"torch", "python"} <= set(state["rng"])


def test_too_few_recorded_epochs_fail_before_training(tiny_training_inputs, tmp_path):
    cfg = DiffusionTrainConfig.from_dict(
        tiny_config(tiny_training_inputs, tmp_path, diffusion={"max_steps": 10_000})
    )
    with pytest.raises(ValueError, match=r"raise mixed_sampler\.epochs to"):
        train_diffusion(cfg)
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_pretrained_components_load_from_a_folder(tmp_path):
    tok = train_bpe_tokenizer(["a red circle", "two blue stars on gray"] * 20, vocab_size=300)
    clip = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=24,
            max_position_embeddings=32,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    clip.save_pretrained(tmp_path / "clip" / "text_encoder")
    tok.save_pretrained(tmp_path / "clip" / "tokenizer")
    enc = load_text_encoder(tmp_path / "clip", 32, "text_encoder", "tokenizer")
    states, pooled = enc(["a red circle", ""])
    assert states.shape == (2, 32, 32) and pooled.shape == (2, 24)

    # The pooled vector is the caption's state at EOS, all words read. Our tokenizers give
    # EOS id 2, the legacy value for which transformers pools at the highest token id.
    texts = ["two blue stars on gray", "a red circle"]
    states, pooled = enc(texts)
    ids = enc.tokenize(texts)
    eos = [row.tolist().index(tok.eos_token_id) for row in ids]
    at_eos = enc.model.text_projection(states[torch.arange(2), eos])
    assert torch.allclose(pooled, at_eos, atol=1e-6)
    assert tok.eos_token_id == 2
    assert not torch.allclose(enc.model(input_ids=ids).text_embeds, at_eos, atol=1e-3)

    t5 = T5EncoderModel(
        T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    t5.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    enc = load_text_encoder(tmp_path / "t5", 16)
    states, pooled = enc(["two blue stars"])
    assert states.shape == (1, 16, 16) and pooled.shape == (1, 16)

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = load_autoencoder(str(tmp_path / "pipe"), subfolder="vae")
    assert loaded.config.latent_channels == 4

    with pytest.raises(MissingAutoencoderError, match="local folder"):
        load_autoencoder(str(tmp_path / "absent"))
    with pytest.raises(MissingTextEncoderError, match="local folder"):
        load_text_encoder(tmp_path / "absent", 16)


def test_sampler_reaches_latents_beyond_the_unit_range():
    # Scaled latents have std 1: a sampler that clips its x0 estimate to [-1, 1] (diffusers'
    # default, meant for pixels) washed every object out of the samples.
    sched = sampling_scheduler("ddim", DiffusionConfig())
    sched.set_timesteps(20)
    target = torch.linspace(-3, 3, 256).reshape(1, 4, 8, 8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        a = sched.alphas_cumprod[t]
        oracle_noise = (x - a.sqrt() * target) / (1 - a).sqrt()  # a perfect denoiser
        x = sched.step(oracle_noise, t, x).prev_sample
    assert torch.allclose(x, target, atol=1e-3)


def test_clip_sample_keeps_the_x0_estimates_of_pixel_latents_in_range():
    # Pixel latents (the patch autoencoder) live in [-1, 1]; a guided x0 estimate past it
    # is cut back at every step, so the sample ends in range.
    cfg = DiffusionConfig(prediction_type="sample")
    sched = sampling_scheduler("ddim", cfg, clip_sample=1.0)
    sched.set_timesteps(20)
    target = torch.linspace(-3, 3, 256).reshape(1, 4, 8, 8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(target, t, x).prev_sample
    assert torch.allclose(x, target.clamp(-1, 1), atol=1e-3)


def test_trailing_spacing_starts_at_the_last_timestep_and_needs_v_prediction():
    with pytest.raises(ConfigError, match="v_prediction"):
        DiffusionTrainConfig.from_dict({"eval": {"spacing": "trailing"}})
    with pytest.raises(ConfigError, match=r"eval\.spacing"):
        DiffusionTrainConfig.from_dict({"eval": {"spacing": "linspace"}})
    cfg = DiffusionTrainConfig.from_dict(
        {"eval": {"spacing": "trailing"}, "diffusion": {"prediction_type": "v_prediction"}}
    )
    leading = sampling_scheduler("ddim", cfg.diffusion)
    sched = sampling_scheduler("ddim", cfg.diffusion, cfg.eval.spacing)
    leading.set_timesteps(20)
    sched.set_timesteps(20)
    assert (int(leading.timesteps[0]), int(sched.timesteps[0])) == (950, 999)
    # From pure noise at t=999, a perfect v-predictor lands on the target.
    target = torch.linspace(-3, 3, 256).reshape(1, 4, 8, 8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        a = sched.alphas_cumprod[t]
        noise = (x - a.sqrt() * target) / (1 - a).sqrt()
        x = sched.step(a.sqrt() * noise - (1 - a).sqrt() * target, t, x).prev_sample
    assert torch.allclose(x, target, atol=1e-3)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_each_prediction_type_is_trained_towards_a_perfect_denoiser(kind):
    # The loss is zero for the model that predicts exactly what `kind` names (the noise,
    # the velocity or the clean latent), under min-SNR weighting, and positive otherwise;
    # DDIM driven by that prediction lands on the clean latent.
    cfg = DiffusionConfig(prediction_type=kind, snr_gamma=5.0)
    unet = build_unet(
        UNetConfig(overrides={"block_out_channels": [8, 16, 16], "norm_num_groups": 4}),
        16,
        16,
        (4, 8, 8),
    )
    module = LatentDiffusion(unet, cfg)
    z = torch.linspace(-3, 3, 512).reshape(2, 4, 8, 8)
    a_bar = module.scheduler.alphas_cumprod

    def perfect(noisy, t, states, pooled):
        a = a_bar[t].view(-1, 1, 1, 1)
        eps = (noisy - a.sqrt() * z) / (1 - a).sqrt()
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * z}.get(kind, z)

    batch = {"latents": z, "states": torch.zeros(2, 3, 16), "pooled": torch.zeros(2, 16)}
    module._unet = perfect
    assert module.diffusion_loss(batch) < 1e-6
    module._unet = lambda *a: perfect(*a) + 0.1
    assert module.diffusion_loss(batch) > 1e-4

    sched = sampling_scheduler("ddim", cfg)
    sched.set_timesteps(20)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(perfect(x, t.view(1), None, None), t, x).prev_sample
    assert torch.allclose(x, z, atol=1e-3)


def test_an_unknown_prediction_type_is_refused_by_name():
    with pytest.raises(ConfigError, match="prediction_type: 'x0'"):
        DiffusionTrainConfig.from_dict({"diffusion": {"prediction_type": "x0"}})


def _renders(colours: list[str]) -> np.ndarray:
    scenes = [Scene((SceneObject("star", c, "large", 1, 1),), "gray") for c in colours]
    return np.stack([np.asarray(render(s, 32)) for s in scenes])


def test_colour_judge_on_known_renders():
    colours = ["red", "cyan", "pink", "yellow"]
    images = _renders(colours)
    assert dominant_object_colour(images) == colours
    blank = np.full((1, 32, 32, 3), 128, np.uint8)  # background only: nothing drawn
    assert dominant_object_colour(blank) == [None]
    prompts = colour_prompts(4, "short")
    assert [p.colour for p in prompts] == ["red", "orange", "yellow", "green"]
    score = score_colours(
        torch.from_numpy(_renders(["red", "blue", "yellow", "green"])).permute(0, 3, 1, 2), prompts
    )
    assert score["colour_following"] == 0.75 and score["per_colour"]["orange"] == 0.0


def test_colour_kept_counts_recoloured_object_pixels():
    images = _renders(["red", "blue"])
    assert colour_kept(images, images) == 1.0
    recoloured = _renders(["orange", "blue"])
    assert colour_kept(images, recoloured) == pytest.approx(0.5, abs=0.05)


def test_autoencoder_loss_weights_object_pixels():
    from models.diffusion.autoencoder import foreground_weight, to_model_range

    images = torch.from_numpy(_renders(["red"])).permute(0, 3, 1, 2)
    w = foreground_weight(to_model_range(images), 10.0)[0, 0]
    star = torch.from_numpy(_renders(["red"])[0]).float().sub(128).abs().amax(-1) > 20
    assert w[star].eq(10.0).float().mean() > 0.95  # the star's pixels
    assert w[~star].eq(1.0).float().mean() > 0.95  # the gray background


def test_a_changed_configuration_starts_over_instead_of_resuming(tmp_path):
    from models.diffusion.train import discard_stale_run

    cfg = DiffusionTrainConfig.from_dict({"work": str(tmp_path), "autoencoder": str(tmp_path)})
    sampler = {"config": {"synthetic_ratio": 0.95}}
    assert not discard_stale_run(cfg, sampler)  # a first run
    (tmp_path / "checkpoints" / "step-0000010").mkdir(parents=True)
    (tmp_path / "mlflow_run.json").write_text('{"run_id": "abc"}')
    # evaluation settings do not change what is trained
    cfg = replace(cfg, eval=replace(cfg.eval, prompts=5))
    assert not discard_stale_run(cfg, sampler)
    assert (tmp_path / "checkpoints" / "step-0000010").exists()
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, lr=5e-4))
    assert discard_stale_run(cfg, sampler)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "mlflow_run.json").exists()
    assert discard_stale_run(cfg, {"config": {"synthetic_ratio": 0.8}})  # another blend
    # Another text encoder (retrained on new captions): the UNet's conditioning changed.
    assert discard_stale_run(cfg, {"config": {"synthetic_ratio": 0.8}}, "encoder-b")
    assert not discard_stale_run(cfg, {"config": {"synthetic_ratio": 0.8}}, "encoder-b")


def test_a_text_encoder_built_as_its_own_step_is_loaded_and_not_trained_again(
    tiny_training_inputs, tmp_path
):
    """The text_encoder asset's folder (`text_encoder_dir`): the training loads it, trains
    no encoder of its own and exports that one; a folder built from other captions is
    refused by name."""
    inputs = tiny_training_inputs
    cfg = tiny_config(inputs, tmp_path, diffusion={"max_steps": 2, "warmup_steps": 1})
    tcfg = DiffusionTrainConfig.from_dict(cfg).text_encoder
    keys, shards, texts = sampler_captions(inputs["sampler"])
    decoded = []

    def images():
        decoded.append(1)
        return load_images(inputs["raw"], keys, shards, 32)

    record = build_text_encoder(tcfg, tmp_path / "encoder", texts, images, probes=80)
    assert decoded == [1] and set(record["probes"]["pooled"]) >= {"shape", "colour"}
    # Built again with nothing changed: kept as it is, nothing decoded or trained.
    assert build_text_encoder(tcfg, tmp_path / "encoder", texts, images, probes=80) == record
    assert decoded == [1]

    metrics = train_diffusion(
        DiffusionTrainConfig.from_dict({**cfg, "text_encoder_dir": str(tmp_path / "encoder")})
    )
    assert metrics["steps"] == 2 and metrics["text_probes"] == record["probes"]
    assert not (tmp_path / "work" / "text_encoder").exists()
    exported = load_text_encoder(tmp_path / "model" / "text_encoder", 32)(["a red circle"])
    built = load_text_encoder(tmp_path / "encoder", 32)(["a red circle"])
    assert torch.equal(exported[1], built[1])

    build_text_encoder(tcfg, tmp_path / "other", [f"{t} again" for t in texts], images, probes=0)
    other = {**cfg, "text_encoder_dir": str(tmp_path / "other"), "work": str(tmp_path / "w2")}
    with pytest.raises(ValueError, match=r"other\b.*built from other settings or captions"):
        train_diffusion(DiffusionTrainConfig.from_dict(other))


def test_new_captions_retrain_the_text_encoder_and_the_same_ones_reuse_it():
    from models.diffusion.text_tower import text_encoder_tag

    tcfg = DiffusionTrainConfig().text_encoder
    captions = ["a red circle in the top left", "a blue square"]
    assert text_encoder_tag(tcfg, captions, 0) == text_encoder_tag(tcfg, list(captions), 0)
    # Same keys and count, one caption rewritten by a new captioner: not the same encoder.
    recaptioned = ["a red circle in the top right", "a blue square"]
    assert text_encoder_tag(tcfg, recaptioned, 0) != text_encoder_tag(tcfg, captions, 0)
    assert text_encoder_tag(tcfg, captions, 1) != text_encoder_tag(tcfg, captions, 0)


def test_cpu_processes_split_the_cores_into_ddp_processes_only_on_a_cpu(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = DiffusionTrainConfig.from_dict({"cpu_processes": 2})
    assert parallelism(cfg) == ("cpu", 2, "ddp", 2)
    assert parallelism(replace(cfg, num_threads=1)) == ("cpu", 2, "ddp", 1)
    assert parallelism(DiffusionTrainConfig()) == ("auto", 1, "auto", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parallelism(cfg) == ("auto", 1, "auto", None)  # a GPU: devices, strategy apply
    assert parallelism(replace(cfg, accelerator="cpu")) == ("cpu", 2, "ddp", 2)


@pytest.mark.slow  # two data-parallel training processes, killed, then resumed
def test_ddp_on_two_cpu_processes_checkpoints_once_and_resumes_to_the_same_step(
    tiny_training_inputs, tmp_path
):
    # Lightning's DDP over gloo on this CPU: the command reruns itself as the second process.
    cfg = tiny_config(
        tiny_training_inputs,
        tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        diffusion={"max_steps": 40, "warmup_steps": 2},
    )
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(cfg))
    ckpts = tmp_path / "work" / "checkpoints"
    proc = run_training(config_file, new_session=True)
    deadline = time.monotonic() + 600
    while not (ckpts / "latest").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # both processes
    proc.wait()
    killed_at = (ckpts / "latest").read_text().strip()
    assert int(killed_at[5:]) < 40

    proc = run_training(config_file, new_session=True)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert f"resuming from {ckpts / killed_at}" in out
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["steps"] == 40
    # One checkpoint per save, whole, written by one process: no second copy, no temp left.
    saved = sorted(p.name for p in ckpts.iterdir())
    assert saved == ["latest", "step-0000035", "step-0000040"], saved
    for step in ("step-0000035", "step-0000040"):
        assert sorted(p.name for p in (ckpts / step).iterdir()) == [
            "model.safetensors",
            "trainer_state.ckpt",
        ]
    state = torch.load(ckpts / "step-0000040" / "trainer_state.ckpt", weights_only=True)
    assert state["global_step"] == 40


def test_foreground_weights_mark_the_objects_and_their_surroundings():
    from models.diffusion.model import foreground_weights

    z = torch.full((2, 3, 8, 8), -0.5)
    z[0, :, 2:4, 5:7] = 0.8  # one 2x2 object on a flat background; image 1 is empty
    w = foreground_weights(z, 10.0)
    expected = torch.ones(8, 8)
    expected[1:5, 4:8] = 10.0  # the object and the ring of positions around it
    torch.testing.assert_close(w[0], expected)
    torch.testing.assert_close(w[1], torch.ones(8, 8))
    # A background darker or lighter than the objects alike: the median is the background.
    torch.testing.assert_close(foreground_weights(-z, 10.0)[0], expected)


def _loss_of_prediction(foreground_of: str, z: torch.Tensor, pred: torch.Tensor) -> float:
    """The diffusion loss of a fixed x0 prediction of the clean latents `z`."""
    unet = build_unet(UNetConfig(), text_hidden=16, text_pooled=16, latent_shape=(3, 8, 8))
    cfg = DiffusionConfig(
        prediction_type="sample", snr_gamma=None, foreground_weight=10.0,
        foreground_of=foreground_of,
    )  # fmt: skip
    module = LatentDiffusion(unet, cfg)
    module._unet = lambda *args: pred
    batch = {"latents": z, "states": torch.zeros(1, 4, 16), "pooled": torch.zeros(1, 16)}
    return module.diffusion_loss(batch).item()


def test_foreground_of_either_and_copies_weigh_a_drawn_copy_like_a_missed_object():
    z = torch.full((1, 3, 8, 8), -0.5)
    z[0, :, 1:3, 1:3] = 0.8  # the one object the caption asks for
    copy = z.clone()
    copy[0, :, 5:7, 5:7] = 0.8  # the object, and a copy where the image has none
    missed = torch.full_like(z, -0.5)  # the object left out
    # A missed object costs the same either way; the copy only costs its weight with "either".
    assert _loss_of_prediction("either", z, missed) == pytest.approx(
        _loss_of_prediction("target", z, missed)
    )
    target, either = _loss_of_prediction("target", z, copy), _loss_of_prediction("either", z, copy)
    assert either > 4 * target
    assert either == pytest.approx(_loss_of_prediction("target", z, missed), rel=0.5)
    # "copies" divides by the target's weights only: the copy's cost is not diluted by
    # its own weight, and a missed object still costs what it costs with "target".
    assert _loss_of_prediction("copies", z, copy) > either
    assert _loss_of_prediction("copies", z, missed) == pytest.approx(
        _loss_of_prediction("target", z, missed)
    )


def test_foreground_of_is_checked_against_its_values_and_the_prediction_type():
    unet = build_unet(UNetConfig(), text_hidden=16, text_pooled=16, latent_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"foreground_of 'either'.*prediction_type 'sample'"):
        LatentDiffusion(unet, DiffusionConfig(prediction_type="epsilon", foreground_of="either"))
    with pytest.raises(ValueError, match=r"unknown diffusion\.foreground_of 'blobs'"):
        LatentDiffusion(unet, DiffusionConfig(prediction_type="sample", foreground_of="blobs"))


def _timestep_draws(power: float, n: int = 40000) -> tuple[torch.Tensor, ...]:
    """(timesteps, their min-SNR weights, each sample's factor weight / share)."""
    unet = build_unet(
        UNetConfig(overrides={"block_out_channels": [8, 16, 16], "norm_num_groups": 4}),
        16,
        16,
        (4, 8, 8),
    )
    module = LatentDiffusion(unet, DiffusionConfig(prediction_type="sample", timestep_power=power))
    torch.manual_seed(0)
    t, share = module._timesteps(n, "cpu")
    weights = module._snr_weights(t)
    return t, weights, weights / share


def test_timestep_power_moves_the_draws_to_the_weighty_timesteps_and_keeps_the_objective():
    t0, w0, factor0 = _timestep_draws(0.0)
    t1, _, factor1 = _timestep_draws(1.0)
    # Uniform draws weigh each sample by its own min-SNR weight, as before the option.
    torch.testing.assert_close(factor0, w0)
    assert 0.08 < (t0 >= 900).float().mean() < 0.12
    # Drawn in proportion to the weight, every sample weighs the same, and the noisiest
    # timesteps, whose weight is near 0, are seldom drawn.
    assert torch.allclose(factor1, factor1[0].expand_as(factor1))
    assert (t1 >= 900).float().mean() < 0.01
    # The same objective: a loss that depends on t alone has the same expectation.
    per_t = torch.linspace(2.0, 0.5, 1000)
    uniform = (per_t[t0] * factor0).mean()
    weighted = (per_t[t1] * factor1).mean()
    assert abs(weighted / uniform - 1) < 0.02


def test_a_layout_unet_trains_its_layout_model_then_draws_and_samples_layouts(
    tiny_training_inputs, tmp_path
):
    """unet.layout (the default of params.yaml): the layout model trains alone first on
    the raw dataset's scenes, the UNet after it, and the export samples a layout per image
    through recapflow's loader."""
    cfg = tiny_config(
        tiny_training_inputs,
        tmp_path,
        unet={"overrides": TINY_UNET, "layout": True, "layout_width": 16, "layout_layers": 1},
        diffusion={"max_steps": 4, "warmup_steps": 1, "layout_steps": 3, "layout_batch_size": 8},
    )
    metrics = train_diffusion(DiffusionTrainConfig.from_dict(cfg))
    assert metrics["steps"] == 4 and metrics["seconds"]["layout_s"] > 0
    model = load_text_to_image(tmp_path / "model")
    assert isinstance(model.unet, LayoutUNet2DConditionModel)
    images = model(["a red circle", "two blue stars"], seed=0, steps=2)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, model(["a red circle", "two blue stars"], seed=0, steps=2))


def test_a_layout_unet_needs_the_scenes_of_its_training_images(tiny_training_inputs, tmp_path):
    from models.diffusion.train import _layout_tokens

    unet = build_unet(
        UNetConfig(layout=True, overrides=TINY_UNET, layout_width=16, layout_layers=1),
        16,
        16,
        (12, 16, 16),
    )
    index = pd.read_parquet(tiny_training_inputs["raw"] / "index.parquet")
    keys, shards = index["key"].tolist()[:3], index["shard"].tolist()[:3]
    assert _layout_tokens(unet, tiny_training_inputs["raw"], keys, shards).shape == (3, 11)
    with pytest.raises(ValueError, match=r"1 have none \(e\.g\. \['no-such-key'\]\)"):
        _layout_tokens(
            unet, tiny_training_inputs["raw"], [*keys, "no-such-key"], [*shards, shards[0]]
        )
