"""The project folder: params.yaml, dvc.yaml and data/ live here (the repo by default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg

from corpus.params import load_params, section_params

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_project_dir() -> str:
    """RECAPFLOW_PROJECT_DIR, else the repo root. Tests point it at a scratch copy."""
    return os.environ.get("RECAPFLOW_PROJECT_DIR", str(REPO_ROOT))


class ProjectResource(dg.ConfigurableResource):
    """Where a materialization reads its parameters and writes its data."""

    root: str

    @property
    def path(self) -> Path:
        return Path(self.root)

    def params(self, section: str) -> dict[str, Any]:
        """A section of params.yaml with the values it shares with others
        (corpus.params.SHARED_PARAMS), as `dvc repro`'s stages read it."""
        return section_params(load_params(self.path / "params.yaml"), section)

    def data_path(self, *parts: str) -> Path:
        return self.path.joinpath("data", *parts)
