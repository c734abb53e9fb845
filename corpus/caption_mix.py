"""The mixed-caption sampler: which caption each training sample gets, epoch by epoch.

The DALL-E 3 report trains on a fixed blend: a sample gets its synthetic caption with
probability `synthetic_ratio` (95% was best) and its original alt-text otherwise, so the
model stays robust to human-style prompts. Public trainers pick uniformly among
captions; here the ratio is exact in expectation, reproducible and recorded.

The choice for (seed, epoch, key) depends on nothing else (not on the order of the rows,
nor on the other samples), so a resumed or re-sharded run makes the same choices.
Captions are normalised first: the report warns that a model picks up distributional
tells of synthetic captions (a fixed opening, stray spaces, template artefacts) and then
needs them in prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from corpus.atomic import write_atomic, write_text_atomic
from corpus.config import ConfigError, build_config

# caption_kind -> the recaptioned dataset's column
CAPTION_COLUMNS: dict[str, str] = {"short": "short_caption", "descriptive": "descriptive_caption"}
SOURCES = ("synthetic", "alt_text", "dropped")


class MixConfigError(ValueError):
    """The sampler configuration or its input cannot give the requested blend."""


@dataclass(frozen=True)
class MixConfig:
    synthetic_ratio: float = 0.95
    caption_kind: str = "descriptive"
    seed: int = 0
    # Share of samples trained with the empty caption, for classifier-free guidance.
    caption_dropout: float = 0.1
    epochs: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.synthetic_ratio, int | float) and 0 <= self.synthetic_ratio <= 1):
            raise MixConfigError(f"synthetic_ratio must be in [0, 1], got {self.synthetic_ratio!r}")
        if self.caption_kind not in CAPTION_COLUMNS:
            raise MixConfigError(
                f"unknown caption_kind {self.caption_kind!r}; expected one of "
                f"{sorted(CAPTION_COLUMNS)}"
            )
        if not 0 <= self.caption_dropout < 1:
            raise MixConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.epochs < 1:
            raise MixConfigError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def column(self) -> str:
        return CAPTION_COLUMNS[self.caption_kind]

    @classmethod
    def from_dict(cls, d: dict) -> MixConfig:
        try:
            return build_config(cls, d, "mixed_sampler")
        except ConfigError as e:
            raise MixConfigError(str(e)) from e


# A fixed opening a captioner (or its fine-tuning data) tends to put before every caption.
_PREFIXES = re.compile(
    r"^(?:(?:a |an )?(?:photo|picture|image|rendering|illustration) of |"
    r"(?:this|the) (?:image|picture|photo) (?:shows|depicts|contains) |caption: ?)",
    re.IGNORECASE,
)
# Special tokens and template leftovers: <|endoftext|>, <pad>, [UNK], </s>, {caption}.
_ARTEFACTS = re.compile(r"<\|?/?[a-z_]+\|?>|\[(?:unk|pad|cls|sep|mask)\]|\{[a-z_]+\}", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def normalize_caption(text: str | None) -> str:
    """Remove the tells that would mark a caption as synthetic or templated: special
    tokens, a fixed opening, a sentence repeated by a looping decoder, stray whitespace."""
    if not isinstance(text, str) or not text:  # None, or NaN from a parquet null
        return ""
    t = _ARTEFACTS.sub(" ", text)
    t = " ".join(t.split())
    t = _PREFIXES.sub("", t).strip()
    sentences, seen = [], set()
    for s in _SENTENCE.split(t):
        if s and s.lower() not in seen:
            seen.add(s.lower())
            sentences.append(s)
    t = " ".join(sentences).strip(" ,;:")
    return t[:1].upper() + t[1:] if t else ""


def _uniforms(seed: int, epoch: int, keys: list[str]) -> np.ndarray:
    """Two independent uniforms in [0, 1) per key, a pure function of (seed, epoch, key)."""
    out = np.empty((len(keys), 2))
    for i, k in enumerate(keys):
        h = hashlib.blake2b(f"{seed}:{epoch}:{k}".encode(), digest_size=16).digest()
        out[i, 0] = int.from_bytes(h[:8], "little") / 2**64
        out[i, 1] = int.from_bytes(h[8:], "little") / 2**64
    return out


def prepare_captions(df: pd.DataFrame, cfg: MixConfig) -> pd.DataFrame:
    """key, shard, alt_text, synthetic (both normalised). Raises before any training if a sample
    lacks the requested synthetic caption (a ratio of 0 needs none)."""
    if cfg.column not in df.columns:
        raise MixConfigError(
            f"the recaptioned dataset has no {cfg.column!r} column (caption_kind "
            f"{cfg.caption_kind!r}); columns: {sorted(df.columns)}"
        )
    if not df["key"].is_unique:
        dup = df.loc[df["key"].duplicated(), "key"].head(5).tolist()
        raise MixConfigError(f"duplicate keys in the recaptioned dataset, e.g. {dup}")
    out = pd.DataFrame(
        {
            "key": df["key"].astype(str),
            "shard": df["shard"].astype(str) if "shard" in df else "",
            "alt_text": [normalize_caption(t) for t in df["alt_text"]],
            "synthetic": [normalize_caption(t) for t in df[cfg.column]],
        }
    )
    missing = out.loc[out["synthetic"] == "", "key"]
    if cfg.synthetic_ratio > 0 and len(missing):
        raise MixConfigError(
            f"{len(missing)} of {len(out)} samples lack a {cfg.caption_kind} synthetic caption "
            f"({cfg.column!r} empty or missing), e.g. keys {missing.head(5).tolist()}; "
            "recaption them or lower synthetic_ratio to 0"
        )
    return out.sort_values("key", ignore_index=True)


def epoch_manifest(captions: pd.DataFrame, cfg: MixConfig, epoch: int) -> pd.DataFrame:
    """key, epoch, source (synthetic | alt_text | dropped), caption: what each sample is
    trained with in this epoch."""
    u = _uniforms(cfg.seed, epoch, captions["key"].tolist())
    synthetic = u[:, 0] < cfg.synthetic_ratio
    dropped = u[:, 1] < cfg.caption_dropout
    source = np.where(dropped, "dropped", np.where(synthetic, "synthetic", "alt_text"))
    caption = np.where(synthetic, captions["synthetic"], captions["alt_text"])
    caption = np.where(dropped, "", caption)
    return pd.DataFrame(
        {"key": captions["key"], "epoch": epoch, "source": source, "caption": caption}
    )


def realized(manifest: pd.DataFrame) -> dict[str, float | int]:
    """Counts by source and the realized synthetic ratio among captioned samples."""
    counts = manifest["source"].value_counts().to_dict()
    n = {s: int(counts.get(s, 0)) for s in SOURCES}
    kept = n["synthetic"] + n["alt_text"]
    return {
        **n,
        "synthetic_ratio": n["synthetic"] / kept if kept else math.nan,
        "dropout": n["dropped"] / len(manifest) if len(manifest) else math.nan,
    }


def manifest_path(out: Path, epoch: int) -> Path:
    return out / f"epoch-{epoch:04d}.parquet"


def write_sampler(captions: pd.DataFrame, cfg: MixConfig, out: Path) -> dict:
    """Write one manifest per epoch and `sampler.json` (config and realized ratios);
    returns the summary. Each file is written to a temp name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("epoch-*.parquet"):  # a shorter run leaves none behind
        stale.unlink()
    per_epoch = []
    for epoch in range(cfg.epochs):
        m = epoch_manifest(captions, cfg, epoch)
        write_atomic(manifest_path(out, epoch), lambda p, m=m: m.to_parquet(p, index=False))
        per_epoch.append({"epoch": epoch, **realized(m)})
    summary = {"config": asdict(cfg), "samples": len(captions), "epochs": per_epoch}
    write_text_atomic(out / "sampler.json", json.dumps(summary, indent=2) + "\n")
    return summary


def read_sampler(out: Path) -> dict:
    path = out / "sampler.json"
    if not path.exists():
        raise FileNotFoundError(f"no mixed sampler at {out}: materialize mixed_sampler first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_manifest(out: Path, epoch: int) -> pd.DataFrame:
    """The manifest of an epoch; epochs beyond the written ones are an error, not a
    silent cycle, so a run never trains on choices nobody recorded."""
    path = manifest_path(out, epoch)
    if not path.exists():
        n = read_sampler(out)["config"]["epochs"]
        raise MixConfigError(
            f"epoch {epoch} has no caption manifest ({n} written in {out}); "
            f"raise mixed_sampler.epochs to at least {epoch + 1}"
        )
    return pd.read_parquet(path)


def read_recaptioned(recaptioned: Path, split: str = "train") -> pd.DataFrame:
    """The rows of one split across every recaptioned shard."""
    files = sorted(Path(recaptioned).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no recaptioned shards in {recaptioned}")
    cols = ["key", "shard", "split", "alt_text", *CAPTION_COLUMNS.values()]
    df = pd.concat([pd.read_parquet(f, columns=cols) for f in files], ignore_index=True)
    return df[df["split"] == split].reset_index(drop=True)


def build_mixed_sampler(recaptioned: Path, out: Path, cfg: MixConfig) -> dict:
    """Validate, normalise and record: `captions.parquet` (both variants per training
    sample), one manifest per epoch and `sampler.json`."""
    captions = prepare_captions(read_recaptioned(recaptioned), cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "captions.parquet", lambda p: captions.to_parquet(p, index=False))
    return write_sampler(captions, cfg, out)


def main() -> None:
    import argparse

    from corpus.params import load_section

    ap = argparse.ArgumentParser(description="Record the mixed-caption blend per epoch.")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--recaptioned", type=Path, default=Path("data/recaptioned"))
    ap.add_argument("--out", type=Path, default=Path("data/mixed_sampler"))
    args = ap.parse_args()
    cfg = MixConfig.from_dict(load_section(args.params, "mixed_sampler"))
    summary = build_mixed_sampler(args.recaptioned, args.out, cfg)
    print(json.dumps(summary["epochs"][0], indent=2))


if __name__ == "__main__":
    main()
