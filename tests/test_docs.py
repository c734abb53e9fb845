"""Every link and cited path in the repository resolves.

Checked, over the files git knows (tracked, or new and not ignored):

- a local Markdown link or image, `[text](target)` / `![alt](target)`, in any *.md file,
  resolved relative to that file (http(s) and mailto links and pure #anchors are skipped;
  a #anchor is stripped from a local target);
- a `docs/<path>` cited in Markdown, in the Python code, in shell scripts and in the
  Makefile, params.yaml, dvc.yaml, docker-compose.yml, Dockerfile and configs/*.yaml,
  resolved from the repository root;
- a `models/`, `corpus/`, `assets/` or `pipelines/` path to a .py file cited in Markdown.

Fenced code blocks and inline code are not links, but their cited paths are checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

CODE_DIRS = ("corpus", "models", "assets", "pipelines", "benchmarks", "tests", "scripts")
CONFIG_FILES = ("Makefile", "params.yaml", "dvc.yaml", "docker-compose.yml", "Dockerfile")

LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
# A path starts at a word boundary that is not inside a longer path or a URL.
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]+")
CODE_PATH = re.compile(r"(?<![\w./-])(?:models|corpus|assets|pipelines)/[\w/.-]*?\.py\b")


def repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sorted({p for p in out.split("\0") if p and (ROOT / p).is_file()})


def cited_files(files: list[str]) -> list[str]:
    """Markdown, code and configuration files whose `docs/...` citations are checked."""
    picked = []
    for p in files:
        top = p.split("/", 1)[0]
        if p == THIS:
            continue  # its docstring and checks name made-up paths
        if (
            p.endswith(".md")
            or p in CONFIG_FILES
            or (top in CODE_DIRS and (p.endswith(".py") or top == "scripts"))
            or (top == "configs" and p.endswith((".yaml", ".yml")))
        ):
            picked.append(p)
    return picked


def markdown_lines(text: str):
    """(line number, line, inside a fenced code block) for each line."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        marker = stripped[:3]
        if marker in ("```", "~~~"):
            if fence is None:
                fence = marker
                yield n, line, True
                continue
            if marker == fence:
                fence = None
                yield n, line, True
                continue
        yield n, line, fence is not None


def local_link_target(target: str) -> str | None:
    """The path part of a local link, or None for URLs, mail and pure anchors."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
        return None
    return target.split("#", 1)[0] or None


def clean(path: str) -> str:
    return path.rstrip(".,:;")


def broken_links(files: list[str]) -> list[tuple[str, int, str]]:
    broken = []
    for p in files:
        if not p.endswith(".md"):
            continue
        base = (ROOT / p).parent
        for n, line, in_code in markdown_lines((ROOT / p).read_text(encoding="utf-8")):
            if in_code:
                continue
            for m in LINK.finditer(INLINE_CODE.sub("", line)):
                target = local_link_target(m.group(1))
                if target is not None and not (base / target).exists():
                    broken.append((p, n, m.group(1)))
    return broken


def broken_citations(files: list[str]) -> list[tuple[str, int, str]]:
    broken = []
    for p in cited_files(files):
        text = (ROOT / p).read_text(encoding="utf-8", errors="replace")
        patterns = [DOCS_PATH, CODE_PATH] if p.endswith(".md") else [DOCS_PATH]
        for n, line in enumerate(text.splitlines(), 1):
            for pattern in patterns:
                for m in pattern.finditer(line):
                    target = clean(m.group(0))
                    if not (ROOT / target).exists():
                        broken.append((p, n, target))
    return broken


def report(broken: list[tuple[str, int, str]]) -> str:
    return "\n".join(f"  {p}:{n}: {target}" for p, n, target in broken)


def test_local_markdown_links_resolve():
    broken = broken_links(repo_files())
    assert not broken, "Markdown links to missing files:\n" + report(broken)


def test_cited_paths_exist():
    broken = broken_citations(repo_files())
    assert not broken, "cited paths that do not exist:\n" + report(broken)


def test_the_checks_catch_what_they_should(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs" / "images").mkdir(parents=True)
    (tmp_path / "docs" / "images" / "a.png").write_bytes(b"")
    (tmp_path / "docs" / "page.md").write_text(
        "[ok](images/a.png) ![bad](images/b.png) [web](https://x.org/docs/none.md)\n"
        "[anchor](#top) [ok with anchor](page.md#top) [bad](../gone.md#x)\n"
        "```\n[not a link](nowhere.md)\n```\n"
        "`[not a link](nowhere.md)` cites docs/missing.md and models/gone.py.\n"
    )
    (tmp_path / "Makefile").write_text("# docs/page.md and docs/other.md.\n")
    files = ["docs/page.md", "Makefile"]
    assert broken_links(files) == [
        ("docs/page.md", 1, "images/b.png"),
        ("docs/page.md", 2, "../gone.md#x"),
    ]
    assert broken_citations(files) == [
        ("docs/page.md", 6, "docs/missing.md"),
        ("docs/page.md", 6, "models/gone.py"),
        ("Makefile", 1, "docs/other.md"),
    ]
