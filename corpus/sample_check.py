"""Validation and repair of one image-text sample from an untrusted source.

Every input sample ends as exactly one of: kept (possibly repaired, each repair counted)
or rejected with a reason. Nothing is dropped silently, so `input = kept + rejected`.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we decode at all; anything else is rejected rather than handed to a rarer,
# less-hardened PIL plugin.
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE = re.compile(r"\s+")

# Rejection reasons (a sample is skipped).
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
MISSING_IMAGE = "missing_image"
TRUNCATED_TAR_MEMBER = "truncated_tar_member"
UNSAFE_MEMBER = "unsafe_member"
DUPLICATE_KEY = "duplicate_key"
UNREADABLE_SHARD = "unreadable_shard"


@dataclass
class Sample:
    """One raw sample as a source found it; `problem` is set when the source already
    knows it cannot be used (a truncated or unsafe tar member, say)."""

    key: str | None  # None when a whole shard could not be read
    unit: str  # the input shard or folder chunk it came from
    origin: str  # member or file path, for error messages
    image: bytes | None = None
    caption: bytes | str | None = None
    meta: dict = field(default_factory=dict)
    problem: str | None = None
    detail: str = ""


@dataclass
class CleanSample:
    key: str
    image: bytes
    ext: str  # "png" | "jpg"
    width: int
    height: int
    alt_text: str
    meta: dict
    repairs: list[str]


@dataclass
class Rejection:
    key: str | None
    unit: str
    origin: str
    reason: str
    detail: str

    def as_row(self) -> dict:
        return {
            "key": self.key,
            "shard": self.unit,
            "origin": self.origin,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class SampleLimits:
    max_pixels: int = 40_000_000  # width x height read from the header, before decoding
    max_side: int = 1024  # larger images are downscaled (a repair), not rejected
    min_side: int = 8
    max_alt_text_chars: int = 1000


def clean_alt_text(raw: bytes | str | None, limits: SampleLimits) -> tuple[str, list[str]]:
    """Decode and tidy a caption; returns the text and the repairs made."""
    repairs: list[str] = []
    if raw is None:
        return "", ["missing_alt_text", "empty_alt_text"]
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            # Web alt-text that is not UTF-8 is nearly always Windows-1252 / Latin-1.
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            repairs.append("alt_text_not_utf8")
    else:
        text = raw
    cleaned = _SPACE.sub(" ", _CONTROL.sub(" ", text)).strip()
    if _CONTROL.search(text):
        repairs.append("alt_text_control_chars")
    if len(cleaned) > limits.max_alt_text_chars:
        cleaned = cleaned[: limits.max_alt_text_chars].rstrip()
        repairs.append("alt_text_truncated")
    if not cleaned:
        repairs.append("empty_alt_text")
    return cleaned, repairs


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: scale to 8 bit instead of clipping at 255.
        img = img.convert("F")
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    return img.convert("RGB")


def check_sample(sample: Sample, limits: SampleLimits) -> CleanSample | Rejection:
    """Decode, repair or reject one sample."""

    def reject(reason: str, detail: str) -> Rejection:
        return Rejection(sample.key, sample.unit, sample.origin, reason, detail)

    if sample.problem:
        return reject(sample.problem, sample.detail)
    if not sample.image:
        return reject(MISSING_IMAGE, "no image member/file for this key")
    alt_text, repairs = clean_alt_text(sample.caption, limits)
    if sample.meta.pop("_bad_json", False):
        repairs.append("bad_json_sidecar")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(sample.image), formats=DECODABLE_FORMATS)
            w, h = img.size
            if w * h > limits.max_pixels:
                return reject(DECOMPRESSION_BOMB, f"{w}x{h} exceeds {limits.max_pixels} pixels")
            fmt = img.format
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return reject(DECOMPRESSION_BOMB, str(e))
    except OSError as e:
        reason = TRUNCATED_IMAGE if "truncated" in str(e) else CORRUPT_IMAGE
        return reject(reason, f"{type(e).__name__}: {e}")
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError) as e:
        return reject(CORRUPT_IMAGE, f"{type(e).__name__}: {e}")
    if min(w, h) < limits.min_side:
        return reject(TOO_SMALL, f"{w}x{h} is below {limits.min_side} px")

    changed = False
    if getattr(img, "n_frames", 1) > 1:
        repairs.append("first_frame_only")
        changed = True
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        repairs.append("exif_rotated")
        changed = True
    if img.mode != "RGB":
        repairs.append(f"converted_{img.mode.replace(';', '_')}")
        img = _to_rgb(img)
        changed = True
    if max(img.size) > limits.max_side:
        img.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
        repairs.append("resized_oversized")
        changed = True

    ext = "jpg" if fmt == "JPEG" else "png"
    data = sample.image
    if changed or fmt not in ("JPEG", "PNG"):
        buf = io.BytesIO()
        if ext == "jpg":
            img.save(buf, format="JPEG", quality=95)
        else:
            img.save(buf, format="PNG")
        data = buf.getvalue()
        if fmt not in ("JPEG", "PNG"):
            repairs.append(f"reencoded_{fmt.lower()}")
    return CleanSample(
        sample.key, data, ext, img.size[0], img.size[1], alt_text, sample.meta, repairs
    )
