"""DVC parity: the whole lineage of dvc.yaml driven by DVC's own CLI on a scratch git
project (tiny stage params, the repo's .gitignore and .dvc/config): `dvc repro`,
`dvc metrics show`, `dvc plots show`, `dvc push` to the default remote and `dvc pull` into
a fresh clone, and `dvc exp run -S mixed_sampler.synthetic_ratio=0.8` re-running only the
stages downstream of the sampler (docs/dvc.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import DVC, REPO, dvc_env

pytestmark = pytest.mark.slow  # the DVC CLI reproduces the whole lineage

STAGES = {
    "raw_alt_text_dataset",
    "captioner",
    "recaptioned_dataset",
    "mixed_sampler",
    "autoencoder",
    "text_encoder",
    "diffusion_model",
    "world_judge",
    "reference_clip",
    "eval_report",
    "prompt_expander",
    "feedback_pool",
    "preference_model",
    "rich_feedback_model",
}
DOWNSTREAM_OF_SAMPLER = {
    "mixed_sampler",
    "text_encoder",
    "diffusion_model",
    "eval_report",
    "feedback_pool",
    "preference_model",
    "rich_feedback_model",
}
UP_TO_DATE = "Data and pipelines are up to date."


def _env(proj: Path) -> dict[str, str]:
    return {**dvc_env(proj), "MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlflow.db'}"}


def _dvc(proj: Path, *args: str) -> str:
    """Runs the DVC CLI (its own environment) and returns stdout and stderr together."""
    r = subprocess.run(
        [str(DVC), *args],
        cwd=proj,
        env=_env(proj),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert r.returncode == 0, f"dvc {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-6000:]}"
    return r.stdout


def _dvc_json(proj: Path, *args: str):
    r = subprocess.run(
        [str(DVC), *args, "--json"], cwd=proj, env=_env(proj), capture_output=True, text=True
    )
    assert r.returncode == 0, f"dvc {' '.join(args)} --json failed:\n{r.stderr[-6000:]}"
    return json.loads(r.stdout)


def _git(proj: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=proj, check=True, capture_output=True, text=True
    ).stdout


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


def _outs(proj: Path, stages) -> list[str]:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    return [o["path"] for s in stages for o in lock[s].get("outs", [])]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]


def _digests(base: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every file of the outputs, by path relative to the project."""
    return {
        str(f.relative_to(base)): hashlib.sha256(f.read_bytes()).hexdigest()
        for o in outs
        for f in _files(base / o)
    }


def _stamps(base: Path, outs: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every file of the outputs: a rebuilt output has new files."""
    return {
        str(f.relative_to(base)): (os.stat(f).st_ino, os.stat(f).st_mtime_ns)
        for o in outs
        for f in _files(base / o)
    }


@pytest.fixture
def git_project(project_dir: Path) -> Path:
    """project_dir as a git repository (DVC experiments need one), with the repo's
    .gitignore and .dvc/config (its remotes), everything committed."""
    proj = project_dir
    shutil.copy(REPO / ".gitignore", proj / ".gitignore")
    _git(proj, "init", "-q", "-b", "main")
    _git(proj, "config", "user.name", "recapflow tests")
    _git(proj, "config", "user.email", "tests@recapflow.invalid")
    _git(proj, "config", "commit.gpgsign", "false")
    _dvc(proj, "init", "-f", "-q")  # again, now with git: writes .dvc/.gitignore
    shutil.copy(REPO / ".dvc" / "config", proj / ".dvc" / "config")
    _git(proj, "add", "-A")
    _git(proj, "commit", "-q", "-m", "scratch project")
    return proj


def _metrics_of(entry: dict) -> dict:
    return entry["data"]["metrics"]["metrics/eval_report.json"]["data"]


def _ratio_of(entry: dict) -> float:
    return entry["data"]["params"]["params.yaml"]["data"]["mixed_sampler"]["synthetic_ratio"]


def _check_eval_metrics(metrics: dict) -> None:
    for form in ("short", "descriptive"):
        assert 0.0 <= metrics[form]["prompt_following"]["overall"] <= 1.0
        assert isinstance(metrics[form]["clip_score"], float)


def _plot_specs(html: str) -> dict[str, dict]:
    """The Vega-Lite spec of each plot in DVC's HTML, by the plot's div id."""
    return {
        div: json.loads(spec)
        for div, spec in re.findall(
            r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (\{.*?\});\s*'
            r"vegaEmbed",
            html,
            flags=re.S,
        )
    }


def test_dvc_reproduces_versions_and_experiments_on_the_lineage(git_project, tmp_path):
    proj = git_project

    # dvc repro: every stage runs, once, and the workspace matches dvc.lock.
    out = _dvc(proj, "repro")
    assert _ran(out) == STAGES, out[-6000:]
    assert UP_TO_DATE in _dvc(proj, "status")
    assert _ran(_dvc(proj, "repro")) == set()
    _git(proj, "add", "-A")
    _git(proj, "commit", "-q", "-m", "dvc repro")
    # The repo's .gitignore keeps data/, the MLflow store and the remote out of git, and
    # lets the uncached metrics and plots in (DVC reads experiments' metrics from git).
    assert _git(proj, "status", "--porcelain") == ""
    tracked = set(_git(proj, "ls-files", "metrics").split())
    assert tracked == {
        "metrics/eval_report.json",
        "metrics/prompt_following.json",
        "metrics/training_curve.json",
    }

    # dvc metrics show: the eval report's metrics file.
    shown = _dvc_json(proj, "metrics", "show")
    baseline_metrics = shown[""]["data"]["metrics/eval_report.json"]["data"]
    assert baseline_metrics == json.loads((proj / "metrics/eval_report.json").read_text())
    _check_eval_metrics(baseline_metrics)

    # dvc plots show: one HTML page with the prompt-following bars and the training curve,
    # holding the rows of the plot files.
    _dvc(proj, "plots", "show")
    specs = _plot_specs((proj / "dvc_plots" / "index.html").read_text())
    assert set(specs) == {"metrics_prompt_following_json", "metrics_training_curve_json"}
    for div, name in (
        ("metrics_prompt_following_json", "prompt_following.json"),
        ("metrics_training_curve_json", "training_curve.json"),
    ):
        rows = json.loads((proj / "metrics" / name).read_text())
        assert rows, name
        plotted = [{k: v for k, v in r.items() if k != "rev"} for r in specs[div]["data"]["values"]]
        assert plotted == rows, div
    # The axes of dvc.yaml (the linear template layers its y encodings).
    curve = specs["metrics_training_curve_json"]
    assert curve["encoding"]["x"]["field"] == "step"
    assert '"y": {"field": "colour_following"' in json.dumps(curve["layer"])
    bars = specs["metrics_prompt_following_json"]["encoding"]
    assert (bars["x"]["field"], bars["y"]["field"]) == ("accuracy", "label")
    assert _git(proj, "status", "--porcelain") == ""  # dvc_plots/ is ignored

    # dvc push to the default remote (localstore: dvc-remote/ in the project, ignored by
    # git), then dvc pull in a fresh clone with an empty cache: the same bytes.
    outs = _outs(proj, STAGES)
    _dvc(proj, "push")
    remote = proj / "dvc-remote"
    assert any(f.is_file() for f in remote.rglob("*"))
    assert "in sync" in _dvc(proj, "status", "--cloud")
    assert _git(proj, "status", "--porcelain") == ""
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(proj), str(clone))
    assert not (clone / ".dvc" / "cache").exists()
    assert not (clone / "data").exists()
    _dvc(clone, "remote", "modify", "--local", "localstore", "url", str(remote))
    _dvc(clone, "pull")
    assert UP_TO_DATE in _dvc(clone, "status")
    original = _digests(proj, outs)
    assert len(original) > len(outs)  # the directory outputs hold files
    assert _digests(clone, outs) == original

    # dvc exp run -S: only the stages downstream of the sampler run; the upstream outputs
    # are left as they are (same files, untouched).
    upstream = _outs(proj, STAGES - DOWNSTREAM_OF_SAMPLER)
    before = _stamps(proj, upstream)
    out = _dvc(proj, "exp", "run", "-S", "mixed_sampler.synthetic_ratio=0.8")
    assert _ran(out) == DOWNSTREAM_OF_SAMPLER, out[-6000:]
    assert _skipped(out) == STAGES - DOWNSTREAM_OF_SAMPLER, out[-6000:]
    assert _stamps(proj, upstream) == before
    sampler = json.loads((proj / "data" / "mixed_sampler" / "sampler.json").read_text())
    assert sampler["config"]["synthetic_ratio"] == 0.8

    # dvc exp show records the experiment's parameter and its eval metrics (the ones the
    # run left in the workspace), next to the baseline's.
    table = _dvc_json(proj, "exp", "show")
    baseline = next(e for e in table if e.get("name") == "main")
    assert _ratio_of(baseline) == 0.95
    assert _metrics_of(baseline) == baseline_metrics
    exps = [rev for e in baseline["experiments"] or [] for rev in e["revs"]]
    assert len(exps) == 1, exps
    assert _ratio_of(exps[0]) == 0.8
    exp_metrics = _metrics_of(exps[0])
    assert exp_metrics == json.loads((proj / "metrics/eval_report.json").read_text())
    _check_eval_metrics(exp_metrics)
