"""Shared fixtures: small parameter sets and a scratch DVC project wired to this repo's
code and environments, so tests never touch the repo's own data/, dvc.lock or mlflow.db."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from corpus.params import RawDatasetParams, load_params

REPO = Path(__file__).resolve().parents[1]
DVC = REPO / ".venv-dvc" / "bin" / "dvc"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def no_leaked_dagster_defs_state():
    """Each test starts without a current Dagster defs-state storage. Entering a Dagster
    instance sets one in a context variable; a test that leaves it behind (an instance
    entered and never exited) makes the next test's Definitions load read a storage whose
    instance is gone ("Attempted to resolve undefined DagsterInstance weakref")."""
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield


def small_raw_params(**overrides) -> RawDatasetParams:
    d = load_params(REPO / "params.yaml")["raw_alt_text_dataset"]
    d.update({"num_images": 60, "shard_size": 20}, **overrides)
    return RawDatasetParams.from_dict(d)


# Captioning stages at toy size: the tests check wiring, not quality. min_new_tokens: an
# untrained captioner may write EOS first, and the blend refuses empty synthetic captions.
_TINY_PHASE = {"max_steps": 2, "batch_size": 8, "lr": 0.001, "warmup_steps": 1}
TINY_STAGE_PARAMS = {
    "captioner": {
        "lm": {"config": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 160}},
        "vocab_size": 300,
        "clip": _TINY_PHASE,
        "concepts": _TINY_PHASE,
        "pretrain": _TINY_PHASE,
        "ssc": _TINY_PHASE,
        "dsc": _TINY_PHASE,
        "generation": {"max_new_tokens": 8, "min_new_tokens": 3},
        "ssc_max_new_tokens": 4,
        "eval_images": 8,
    },
    "recaptioned_dataset": {"backend": "prefix", "batch_size": 32, "short_max_new_tokens": 4},
    "mixed_sampler": {"synthetic_ratio": 0.95, "caption_kind": "descriptive", "epochs": 4},
    # resolution is stated here, once, as in params.yaml: world_judge and reference_clip
    # read it, and DVC refuses a stage whose listed parameter is missing.
    "autoencoder": {
        "resolution": 32,
        "max_steps": 3,
        "batch_size": 16,
        "warmup_steps": 1,
        "eval_images": 8,
        "scene_images": 64,
    },
    "diffusion_model": {
        "seed": 0,
        "batch_size": 16,
        "checkpoint_every": 4,
        "text_encoder": {"context_length": 32, "pretrain": {"max_steps": 2, "batch_size": 16}},
        "unet": {
            "overrides": {
                "block_out_channels": [16, 32, 32],
                "norm_num_groups": 8,
                "attention_head_dim": 4,
            }
        },
        "diffusion": {"max_steps": 6, "warmup_steps": 1},
        "eval": {
            "prompts": 8,
            "final_prompts": 8,
            "every": 3,
            "steps": 2,
            "grid_prompts": 8,
            "text_probes": 80,
        },
    },
    "world_judge": {"train_images": 256, "eval_images": 32, "max_steps": 3, "batch_size": 32},
    "reference_clip": {"train_images": 64, "eval_images": 16, "max_steps": 2, "batch_size": 16},
    "prompt_expander": {
        "lm": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 300, "max_length": 160},
        "max_steps": 2,
        "batch_size": 4,
        "warmup_steps": 1,
        "expansions": 1,
        "candidates": 2,
        "eval_queries": 2,
    },
    "feedback_pool": {
        "guidance_scales": [1.0, 3.0],
        "images_per_generator": 2,
        "prompts_per_category": 2,
        "sampling_steps": 2,
        "test_share": 0.4,
    },
    "preference_model": {
        "max_steps": 2,
        "batch_size": 8,
        "warmup_steps": 1,
        "ablation_steps": 1,
        "width": 16,
        "reprompt_pairs": 32,
        "reprompt_per_category": 2,
        "alignment_first_steps": 2,
    },
    "rich_feedback_model": {
        "max_steps": 2,
        "batch_size": 4,
        "warmup_steps": 1,
        "repair_images": 4,
        "selection_candidates": 4,
        "selection_k": 2,
        "selection_steps": 1,
    },
    "eval_report": {
        "images_per_prompt": 2,
        "prompts_per_category": 1,
        "steps": 2,
        "n_boot": 200,
    },
}


def materialize_range(assets, selection, keys, resources, instance, **kwargs):
    """`selection` over the partitions `keys` of raw_shards, as one run (single-run range)."""
    import dagster as dg

    from pipelines.retraining import partition_range_tags

    return dg.materialize(
        assets,
        selection=selection,
        resources=resources,
        instance=instance,
        tags=partition_range_tags(keys),
        **kwargs,
    )


def materialize_raw(assets, resources, instance, **kwargs):
    """raw_alt_text_dataset over every shard the source defines (make run's first step)."""
    from assets.raw_alt_text_dataset import register_shards

    keys = register_shards(instance, resources["project"])
    return materialize_range(assets, ["raw_alt_text_dataset"], keys, resources, instance, **kwargs)


def dvc_env(project: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DVC_SITE_CACHE_DIR": str(project / ".dvc" / "tmp" / "site_cache"),
        "DVC_NO_ANALYTICS": "1",
    }


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A scratch project: params.yaml (small), dvc.yaml and the corpus code, with the
    repo's .venv linked in so the DVC stage command runs as it does in the repo."""
    return make_project(tmp_path / "project")


def make_project(proj: Path) -> Path:
    """The scratch project of `project_dir` at `proj` (for fixtures of a wider scope)."""
    proj.mkdir()
    params = load_params(REPO / "params.yaml")
    params["raw_alt_text_dataset"].update(num_images=60, shard_size=20, human_fraction=0.3)
    params.update(TINY_STAGE_PARAMS)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", proj / ".dvcignore")
    (proj / "landing").mkdir()  # a dependency of the raw_alt_text_dataset stage, kept in
    shutil.copy(REPO / "landing" / "README.md", proj / "landing")  # git by its README
    for pkg in ("corpus", "models", "prompts"):  # the DVC stages' code dependencies
        shutil.copytree(REPO / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (proj / ".venv").symlink_to(REPO / ".venv")
    subprocess.run([str(DVC), "init", "--no-scm", "-q"], cwd=proj, env=dvc_env(proj), check=True)
    return proj
