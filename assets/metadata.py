"""Dagster metadata helpers shared by the assets: count tables and image previews."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence

import dagster as dg
from PIL import Image

from corpus.params import flatten  # noqa: F401  (re-exported for the assets)
from corpus.preview import caption_grid, markdown_image


def count_table(counts: Mapping[str, int], label: str = "kind") -> dg.MetadataValue:
    """A Markdown table of counts with shares, largest first."""
    total = sum(counts.values())
    lines = [f"| {label} | count | share |", "|---|---:|---:|"]
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v} | {v / total:.1%} |" if total else f"| {k} | {v} | - |")
    if not counts:
        lines.append("| (none) | 0 | - |")
    return dg.MetadataValue.md("\n".join(lines))


def preview_grid(
    samples: Sequence[tuple[bytes, str]], cols: int = 4, tile: int = 128, lines: int = 3
) -> Image.Image:
    images = [Image.open(io.BytesIO(b)) for b, _ in samples]
    return caption_grid(images, [c for _, c in samples], cols=cols, tile=tile, lines=lines)


def preview_metadata(grid: Image.Image, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_image(grid, alt))


def file_md5(path) -> str:
    """A file's md5, as DVC records it for that file inside a tracked folder."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def md_escape(text: str) -> str:
    """Text from files or the web, safe in a Markdown table cell."""
    return (text or "(empty)").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")
