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


def small_raw_params(**overrides) -> RawDatasetParams:
    d = load_params(REPO / "params.yaml")["raw_alt_text_dataset"]
    d.update({"num_images": 60, "shard_size": 20}, **overrides)
    return RawDatasetParams.from_dict(d)


def dvc_env(project: Path) -> dict[str, str]:
    return {**os.environ, "DVC_SITE_CACHE_DIR": str(project / ".dvc" / "tmp" / "site_cache"),
            "DVC_NO_ANALYTICS": "1"}  # fmt: skip


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A scratch project: params.yaml (small), dvc.yaml and the corpus code, with the
    repo's .venv linked in so the DVC stage command runs as it does in the repo."""
    proj = tmp_path / "project"
    proj.mkdir()
    params = load_params(REPO / "params.yaml")
    params["raw_alt_text_dataset"].update(num_images=60, shard_size=20)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", proj / ".dvcignore")
    shutil.copytree(REPO / "corpus", proj / "corpus", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / ".venv").symlink_to(REPO / ".venv")
    subprocess.run([str(DVC), "init", "--no-scm", "-q"], cwd=proj, env=dvc_env(proj), check=True)
    return proj
