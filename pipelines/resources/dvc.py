"""DVC through its CLI, from its own environment (.venv-dvc).

DVC is never imported here: its omegaconf/hydra pin antlr4 4.9, which breaks Dagster's
string asset selection when both share one environment.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import dagster as dg
import yaml

from pipelines.resources.project import REPO_ROOT


class DvcError(RuntimeError):
    pass


class DvcResource(dg.ConfigurableResource):
    """Commits stage outputs to the DVC cache and reads their content hashes."""

    repo_dir: str
    dvc_bin: str = str(REPO_ROOT / ".venv-dvc" / "bin" / "dvc")

    def run(self, *args: str) -> str:
        if not Path(self.dvc_bin).exists():
            raise DvcError(
                f"DVC not found at {self.dvc_bin}; `make install` creates .venv-dvc with it"
            )
        env = {
            **os.environ,
            # DVC's site cache defaults to /var/tmp; keep all state inside the project.
            "DVC_SITE_CACHE_DIR": str(Path(self.repo_dir) / ".dvc" / "tmp" / "site_cache"),
            "DVC_NO_ANALYTICS": "1",
        }
        # Runs of several partitions commit concurrently: queue on DVC's repo lock.
        proc = subprocess.run(
            [self.dvc_bin, "--wait-for-lock", *args],
            cwd=self.repo_dir,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise DvcError(f"`dvc {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def commit(self, stage: str) -> dict[str, str]:
        """Record a stage's current outputs (and deps, params) in dvc.lock and the cache;
        returns {output path: DVC md5}."""
        self.run("commit", "--force", stage)
        return self.out_hashes(stage)

    def changes(self, stage: str) -> list:
        """What changed in `stage` since dvc.lock recorded it (its deps, params or outputs;
        `dvc status`): empty when the stage's outputs are exactly what its recorded code,
        parameters and inputs made."""
        return json.loads(self.run("status", "--json", stage) or "{}").get(stage, [])

    def out_hashes(self, stage: str) -> dict[str, str]:
        lock_path = Path(self.repo_dir) / "dvc.lock"
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) if lock_path.exists() else {}
        entry = (lock.get("stages") or {}).get(stage)
        if not entry:
            raise DvcError(f"stage {stage!r} is not in {lock_path}")
        return {o["path"]: o["md5"] for o in entry.get("outs", [])}
