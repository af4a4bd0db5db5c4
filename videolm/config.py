"""Loading and saving the frozen per-stage config dataclasses (YAML / JSON / CLI values).

Each stage owns its configs (``extract.config.ExtractConfig``, ``quantize.kmeans.QuantizeConfig``,
``pretrain.recipe.TrainConfig``, ...); this module only turns them into plain data and back.
``to_dict`` gives JSON/YAML-safe values and ``from_dict`` rejects unknown keys, so a
typo in a YAML file is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Type, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: Type[T], data: dict[str, Any]) -> T:
    """Build a (possibly nested) frozen dataclass, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)  # real types, also under `from __future__ import annotations`
    kwargs = {}
    for name, value in data.items():
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            kwargs[name] = from_dict(ftype, value)
        else:
            kwargs[name] = _coerce(cls.__name__, name, ftype, value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _coerce(owner: str, name: str, ftype, value):
    """Numbers from YAML/CLI text: PyYAML reads ``1e-4`` as a string (YAML 1.1 wants ``1.0e-4``)."""
    options = set(typing.get_args(ftype)) - {type(None)} or {ftype}  # `int | None` -> {int}
    base = next(iter(options)) if len(options) == 1 else None
    if value is None or base not in (int, float) or isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}.{name}: expected a number, got {value!r}") from None
    if base is int:
        if number != int(number):
            raise ConfigError(f"{owner}.{name}: expected an integer, got {value!r}")
        return int(number)
    return number


def load_yaml(path: str | Path, cls: Type[T]) -> T:
    # safe_load only: a `!!python/object` tag is a ConstructorError (a YAMLError), never code execution.
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {_first_line(exc)}") from None
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _first_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())  # YAML errors span several lines (context, problem, mark)
    return text if len(text) <= 300 else text[:300] + "..."


def save_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

