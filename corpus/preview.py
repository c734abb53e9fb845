"""Contact sheets: sample images with their caption under each, for Dagster metadata,
MLflow artifacts and the README."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def caption_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    cols: int = 4,
    tile: int = 128,
    lines: int = 3,
) -> Image.Image:
    """A grid of tiles, each an image scaled to `tile` px with up to `lines` lines of its
    wrapped caption below."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default(size=11)
    text_h, width_chars = 14 * lines + 6, max(10, tile // 6)
    rows = max(1, -(-len(images) // cols))
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        sheet.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        wrapped = textwrap.wrap(cap or "(empty)", width_chars)
        if len(wrapped) > lines:
            wrapped = [*wrapped[: lines - 1], wrapped[lines - 1][: width_chars - 3] + "..."]
        draw.multiline_text((x + 3, y + tile + 2), "\n".join(wrapped), fill=(0, 0, 0), font=font)
    return sheet


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def markdown_image(img: Image.Image, alt: str = "preview") -> str:
    """Inline PNG as Markdown: the Dagster UI renders it in the metadata panel."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png_bytes(img)).decode()})"
