"""Typed views of params.yaml, the one parameter file read by Dagster and `dvc repro`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

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


def build_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """`cls(**values)`, refusing keys the dataclass does not have (a typo in params.yaml
    must not be silently ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    return cls(**values)


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
        d = dict(d)
        nested = {
            "world": WorldConfig,
            "noise": NoiseRates,
            "limits": SampleLimits,
        }
        for key, sub in nested.items():
            if key in d:
                d[key] = build_config(sub, d[key] or {}, f"raw_alt_text_dataset.{key}")
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
