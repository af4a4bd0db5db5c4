"""Frozen, per-stage configs: built from CLI flags or YAML, saved beside every output.

Each stage owns one dataclass. They are plain data: ``to_dict`` gives JSON/YAML-safe
values and ``from_dict`` rejects unknown keys, so a typo in a YAML file is an error
rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


class TrainError(RuntimeError):
    """A pretraining run that cannot go on (too little data for a batch, a non-finite loss).

    Defined here, not in train.py, so the CLI can catch it without importing torch.
    """


@dataclass(frozen=True)
class SamplingSpec:
    """How clips are cut from a video.

    Frames are sampled at ``fps`` on the video's real time line (stream
    timestamps). A clip is ``frames_per_clip`` consecutive samples, so it spans
    ``frames_per_clip / fps`` seconds; clip starts are ``clip_stride`` seconds
    apart. Frames are resized so the short side is ``short_side`` pixels (None:
    keep) and centre-cropped to ``crop`` x ``crop`` (None: no crop).
    """

    fps: float = 4.0
    frames_per_clip: int = 4
    clip_stride: float = 1.0
    short_side: int | None = 64
    crop: int | None = None

    def __post_init__(self):
        if not self.fps > 0:
            raise ConfigError(f"fps must be positive, got {self.fps}")
        if self.frames_per_clip < 1:
            raise ConfigError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")
        if not self.clip_stride > 0:
            raise ConfigError(f"clip_stride must be positive, got {self.clip_stride}")
        if self.short_side is not None and self.short_side < 2:
            raise ConfigError(f"short_side must be >= 2, got {self.short_side}")
        if self.crop is not None:
            if self.crop < 1:
                raise ConfigError(f"crop must be >= 1, got {self.crop}")
            if self.short_side is not None and self.crop > self.short_side:
                raise ConfigError(f"crop {self.crop} is larger than short_side {self.short_side}")

    @property
    def clip_seconds(self) -> float:
        return self.frames_per_clip / self.fps


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines the contents of a feature shard.

    Sampling fields left as None take the encoder's default (``default_sampling``);
    ``resolve_sampling`` fills them. ``short_side=0`` keeps the native size and
    ``crop=0`` disables cropping.
    """

    encoder: str = "pixels"
    weights: str | None = None
    backend: str = "av"
    fps: float | None = None
    frames_per_clip: int | None = None
    clip_stride: float | None = None
    short_side: int | None = None
    crop: int | None = None
    shard_size: int = 500
    batch_size: int = 64  # clips per encoder forward pass
    device: str = "cpu"
    workers: int = 2  # decoder processes; 0 decodes in the main process (no time limit)
    threads: int = 0  # decoder threads per worker; 0 lets the decoder choose
    timeout: float = 120.0  # seconds a video may go without a decoded clip before it is declared hung

    def __post_init__(self):
        if self.backend not in ("av", "decord"):
            raise ConfigError(f"backend must be 'av' or 'decord', got {self.backend!r}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("shard_size and batch_size must be >= 1")
        if self.workers < 0 or self.threads < 0:
            raise ConfigError("workers and threads must be >= 0")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")

    def resolve_sampling(self, default: SamplingSpec) -> SamplingSpec:
        def pick(value, fallback):
            return fallback if value is None else value

        short = pick(self.short_side, default.short_side)
        crop = pick(self.crop, default.crop)
        return SamplingSpec(
            fps=float(pick(self.fps, default.fps)),
            frames_per_clip=int(pick(self.frames_per_clip, default.frames_per_clip)),
            clip_stride=float(pick(self.clip_stride, default.clip_stride)),
            short_side=None if not short else int(short),
            crop=None if not crop else int(crop),
        )


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
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        nested = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if nested is not None and isinstance(value, dict):
            kwargs[name] = from_dict(nested, value)
        else:
            kwargs[name] = _coerce(cls.__name__, name, ftype if isinstance(ftype, str) else str(ftype), value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _coerce(owner: str, name: str, ftype: str, value):
    """Numbers from YAML/CLI text: PyYAML reads ``1e-4`` as a string (YAML 1.1 wants ``1.0e-4``)."""
    base = ftype.replace(" ", "").replace("|None", "")
    if value is None or base not in ("int", "float") or isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}.{name}: expected a number, got {value!r}") from None
    if base == "int":
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


# Nested dataclass types by name, so from_dict can rebuild them from plain dicts.
_DATACLASSES = {"SamplingSpec": SamplingSpec, "ExtractConfig": ExtractConfig}
