"""Atomic file writes: a temp file in the same folder, renamed over the final name, so a
reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the content to a temp path, which then replaces `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap a fully written folder `tmp` in for `out`: the old folder is renamed aside
    first and removed only after the new one is in place, so `out` is never missing
    content for longer than two renames, and a crash leaves the old or the new one."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        import shutil

        shutil.rmtree(old)


def pid_alive(pid: int) -> bool:
    """A process with this pid exists on this machine (a writer that may still finish)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
