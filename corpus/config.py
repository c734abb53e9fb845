"""One way to turn a params.yaml section (a dict) into its typed config dataclass.

`build_config(cls, values, "diffusion_model")` builds nested dataclass fields from nested
dicts, checks every value against its field's annotation (`int`, `float`, `str`, `bool`,
`X | None`, `tuple[X, ...]`, `list[X]`, `dict`, `Literal[...]`) and names what is wrong
by its full dotted key, the way a user finds it in params.yaml:

    diffusion_model.diffusion.max_stepz: unknown key; known: ['beta_schedule', ...]
    diffusion_model.batch_size: expected int, got str '64'

Values are kept as given (an int where a float is expected stays an int), so a config
built here hashes and serializes as the same dict did. Each config's own `__post_init__`
still checks what a type cannot say (ranges, combinations).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot be used: unknown key, wrong type, missing value."""


def build_config(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """An instance of the dataclass `cls` from `values`; `where` is the dotted name of
    `values` in params.yaml (its section), used in every error. Missing keys take the
    field's default; None for a (non-optional) nested dataclass means all its defaults."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of {cls.__name__} settings, got "
            f"{type(values).__name__} {values!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        names = ", ".join(f"{where}.{k}" for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{names}: unknown key{plural}; known: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _convert(values[name], hints.get(name, Any), f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required, and not set")
    return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _reads_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _wrong(value: Any, tp: Any, where: str) -> ConfigError:
    hint = ""
    # PyYAML reads YAML 1.1: a float needs a dot, so `1e-3` is the string "1e-3".
    if isinstance(value, str) and tp is float and _reads_as_float(value):
        hint = " (YAML reads a number without a dot, like 1e-3, as text: write 1.0e-3)"
    return ConfigError(
        f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}"
    )


def _convert(value: Any, tp: Any, where: str) -> Any:
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return build_config(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(value, tp, where)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], where)
        for option in options:  # e.g. `int | str`: the first that accepts the value
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise _wrong(value, tp, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, list | tuple):
            raise _wrong(value, tp, where)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [
                _convert(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item = args[0] if args else Any
            items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong(value, tp, where)
        if not args:
            return dict(value)
        return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong(value, tp, where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(value, tp, where)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong(value, tp, where)
        return value
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise _wrong(value, tp, where)
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _wrong(value, tp, where)
        return value
    return value  # an annotation this builder does not check (a TypeVar, a Protocol)
