"""Imports point one way: pipelines -> assets -> models -> corpus (docs: DESIGN's folder
map). models/ and corpus/ never import Dagster, `assets` or `pipelines`: a training run is
a plain process that Dagster launches. corpus/ never imports models/.

One exception: models/common/pipes_report.py imports `dagster_pipes`, Dagster's
dependency-free protocol package for launched processes (not Dagster), and only when
Dagster launched the process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

DAGSTER = ("dagster", "dagster_*")
FORBIDDEN = {
    "models": (*DAGSTER, "assets", "pipelines"),
    "corpus": (*DAGSTER, "assets", "pipelines", "models"),
}
ALLOWED = {("models/common/pipes_report.py", "dagster_pipes")}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package`
    (dotted, for relative imports), including importlib.import_module("...") and
    __import__("...") with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif (
            isinstance(node, ast.Call)
            and _call_name(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _matches(module: str, pattern: str) -> bool:
    top = module.split(".")[0]
    if pattern.endswith("*"):
        return top.startswith(pattern[:-1])
    return top == pattern


def offending_imports(root: Path = REPO) -> list[tuple[str, int, str]]:
    """(file, line, module) of every import that points against the arrows."""
    bad = []
    for top, patterns in FORBIDDEN.items():
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            package = ".".join(path.relative_to(root).parent.parts)
            for line, module in imported_modules(path.read_text(), package):
                if (rel, module.split(".")[0]) in ALLOWED:
                    continue
                if any(_matches(module, p) for p in patterns):
                    bad.append((rel, line, module))
    return bad


def test_models_and_corpus_never_import_dagster_assets_or_pipelines_and_corpus_not_models():
    bad = offending_imports()
    assert not bad, "imports against the arrows (file:line module):\n" + "\n".join(
        f"  {f}:{line} {m}" for f, line, m in bad
    )


@pytest.mark.parametrize(
    ("top", "source", "expected"),
    [
        ("models", "import dagster as dg\n", ["dagster"]),
        ("models", "def f():\n    from dagster_mlflow import x\n", ["dagster_mlflow"]),
        ("models", "from assets.captioner import captioner\n", ["assets.captioner"]),
        (
            "models",
            "import importlib\nimportlib.import_module('pipelines.cli')\n",
            ["pipelines.cli"],
        ),
        ("models", "from corpus.world import Scene\nimport dagsterish\n", []),
        ("corpus", "from models.common.data import load_images\n", ["models.common.data"]),
        ("corpus", "from .. import shards\n", []),
        ("corpus", "from . import world\n", []),
    ],
)
def test_the_check_finds_imports_against_the_arrows(tmp_path, top, source, expected):
    (tmp_path / top / "sub").mkdir(parents=True)
    (tmp_path / top / "sub" / "mod.py").write_text(source)
    assert [m for _, _, m in offending_imports(tmp_path)] == expected
