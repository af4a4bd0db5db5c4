"""Extraction configs: how clips are cut (``SamplingSpec``) and everything that fixes a shard's contents.

Both are frozen dataclasses; ``extract_config.json`` in a feature directory holds
the ``ExtractConfig`` it was made with (``videolm.config.to_dict``), and YAML
files given to ``--config`` load through ``videolm.config.load_yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


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
    # exact: a sample shows the frame on screen at its time. sparse: non-reference
    # frames are never decoded (faster with B-frames; a sample may move to the
    # frame before it). Part of what fixes a shard's contents.
    decode: str = "exact"
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
        if self.decode not in ("exact", "sparse"):
            raise ConfigError(f"decode must be 'exact' or 'sparse', got {self.decode!r}")
        if self.decode == "sparse" and self.backend != "av":
            raise ConfigError("decode: sparse needs backend: av (decord cannot skip frames)")
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
