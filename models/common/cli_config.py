"""Command lines for the evaluator entry points: a params.yaml section, overridden by flags.

`python -m models.evaluation.world_judge --params params.yaml --out data/world_judge --max-steps 50`
reads the `world_judge` section and replaces `max_steps`, the way `dvc repro` and a user
trying one setting both want."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from corpus.params import load_section


def add_config_flags(ap: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    ap.add_argument("--params", default=None, help="params.yaml to read the section from")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = type(f.default) if isinstance(f.default, bool | int | float) else str
        if kind is bool:
            kind = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)


def config_from_args(cls: type, args: argparse.Namespace, section: str, **extra: Any) -> Any:
    values: dict[str, Any] = load_section(args.params, section) if args.params else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    values.update({k: v for k, v in extra.items() if v is not None})
    return cls.from_dict(values)
