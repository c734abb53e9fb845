"""Each dvc.yaml stage lists every project file its command runs: reuse (assets/reuse.py)
trusts `dvc status`, so a file missing from a stage's deps would let a changed model be
reused as if nothing had changed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def project_files(entry: str) -> set[Path]:
    """The project's files that `python -m entry` imports, directly or not (function-level
    imports included), with the packages they sit in."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return seen


def _entry(cmd: str) -> str:
    words = cmd.split()
    return words[words.index("-m") + 1]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage):
    deps = [ROOT / d for d in STAGES[stage]["deps"]]
    missing = sorted(
        str(f.relative_to(ROOT))
        for f in project_files(_entry(STAGES[stage]["cmd"]))
        if f.read_text(encoding="utf-8").strip()  # an empty __init__.py changes nothing
        and not any(f == d or d in f.parents for d in deps)
    )
    assert not missing, f"dvc.yaml stage {stage} runs files it does not list in deps: {missing}"


def test_frozen_evaluators_do_not_depend_on_the_generator():
    # Changing the diffusion model or the report must never retrain the judges.
    for stage in ("world_judge", "reference_clip"):
        deps = STAGES[stage]["deps"]
        assert not any(d.startswith(("models/diffusion", "data/")) or d == "models" for d in deps)
        assert "models/evaluation/report.py" not in deps
