"""Run config of an asset whose output DVC versions: it may not change a parameter.

`dvc commit` records the stage's parameters as params.yaml states them. A Dagster run
config that changed one (say `synthetic_ratio: 0.5` against params.yaml's 0.95) would build
data with 0.5 while dvc.lock says 0.95. So a run config may repeat params.yaml's value
and nothing else; a different value is refused, naming the two ways that keep DVC's
record true: edit params.yaml, or run a DVC experiment (`dvc exp run -S`), which records
the value it sets. A blend compared outside the lineage is the `caption_ablation` job's
work (it writes under data/ablation, which DVC does not track).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg

T = TypeVar("T")


class TrackedParamOverrideError(ValueError):
    """A run config changes a parameter that DVC records from params.yaml."""


def _cli_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def stage_config(project, stage: str, config: dg.Config, build: Callable[[dict[str, Any]], T]) -> T:
    """The typed config of a DVC-versioned `stage`: params.yaml's section, with the run
    config's set (non-None) fields, each checked by `build` first (so a bad value fails
    with the config's own message) and then refused if it differs from params.yaml."""
    params = project.params(stage)
    overrides = {k: v for k, v in config.model_dump().items() if v is not None}
    built = build({**params, **overrides})
    recorded = build(params)
    changed = {
        k: (getattr(built, k), getattr(recorded, k))
        for k in overrides
        if getattr(built, k) != getattr(recorded, k)
    }
    if changed:
        told = ", ".join(f"{k}={new!r} (params.yaml: {old!r})" for k, (new, old) in changed.items())
        sets = [f"{stage}.{k}={_cli_value(new)}" for k, (new, _) in changed.items()]
        raise TrackedParamOverrideError(
            f"{stage}: the run config sets {told}. DVC versions this asset's output and "
            f"records params.yaml's values in dvc.lock, so data built with the run config's "
            f"would be recorded with params.yaml's. Change params.yaml, or run a DVC "
            f"experiment, which records what it sets: "
            f"`dvc exp run {' '.join('-S ' + s for s in sets)}` "
            f"(make dvc-exp EXP_SET='{' '.join(sets)}'). To compare caption blends without "
            f"touching the lineage, run the caption_ablation job."
        )
    return built
