"""Typed views of params.yaml, the one parameter file read by Dagster and `dvc repro`."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from corpus.config import build_config
from corpus.sample_check import SampleLimits
from corpus.scene_text import NoiseRates
from corpus.world import WorldConfig

SOURCES = ("synthetic", "webdataset", "folder")


def json_digest(obj: Any, length: int = 12) -> str:
    """A short sha256 of a JSON-able value (configs, generation settings): what cache
    keys and "is this output current" checks compare."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


# Values stated once in params.yaml and read by several sections: {section: {key: source}}.
# `section_params` gives each consumer the source's value; dvc.yaml lists the source key
# among the consuming stage's params (tests/corpus/test_config.py checks it), so that
# `dvc exp run -S autoencoder.resolution=48` reruns every stage that reads it. (YAML
# anchors would say it once too, but `dvc exp run -S` rewrites params.yaml through a
# merge that loses an override of an anchored value without a word.)
SHARED_PARAMS: dict[str, dict[str, str]] = {
    # The captioner's measured decoding, so the corpus gets the captions measured.
    "recaptioned_dataset": {"generation": "captioner.generation"},
    # The diffusion model's image size: the evaluators read images at it.
    "world_judge": {"resolution": "autoencoder.resolution"},
    "reference_clip": {"resolution": "autoencoder.resolution"},
}


def section_params(params: dict[str, Any], section: str) -> dict[str, Any]:
    """One section of a loaded params.yaml with the shared values it reads from other
    sections (`SHARED_PARAMS`). Stating a shared value again in the consumer is an error:
    two places would drift apart."""
    values = copy.deepcopy(params.get(section) or {})
    for key, source in SHARED_PARAMS.get(section, {}).items():
        if key in values:
            raise ValueError(
                f"{section}.{key}: stated once in params.yaml, as {source}; "
                f"remove it from {section} (it reads {source})"
            )
        src_section, _, src_key = source.partition(".")
        src = params.get(src_section) or {}
        if src_key in src:
            values[key] = copy.deepcopy(src[src_key])
    return values


def load_section(path: str | Path, section: str) -> dict[str, Any]:
    """`section_params` of the params file at `path` (the entry points' `--params`)."""
    return section_params(load_params(path), section)


@dataclasses.dataclass(frozen=True)
class RawDatasetParams:
    source: str = "synthetic"
    input_path: str | None = None
    num_images: int = 20_000
    seed: int = 0
    shard_size: int = 1000
    eval_fraction: float = 0.05
    human_fraction: float = 0.05
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    noise: NoiseRates = dataclasses.field(default_factory=NoiseRates)
    limits: SampleLimits = dataclasses.field(default_factory=SampleLimits)
    landing_dir: str = "landing"  # img2dataset shards dropped here join the corpus
    landing_settle_seconds: float = 60.0  # a tar without _stats.json waits this long

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"raw_alt_text_dataset.source {self.source!r} not in {SOURCES}")
        for name in ("eval_fraction", "human_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"raw_alt_text_dataset.{name} must lie in [0, 1], got {v}")
        if self.num_images < 1 or self.shard_size < 1:
            raise ValueError("raw_alt_text_dataset.num_images and shard_size must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RawDatasetParams:
        return build_config(cls, d, "raw_alt_text_dataset")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested parameters as MLflow params: {"a": {"b": 1}} -> {"a.b": "1"}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
