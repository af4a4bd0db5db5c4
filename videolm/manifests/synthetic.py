"""The embedded default dataset: moving handwritten digits with timed captions.

``synthesize(out_dir, n_videos, seed)`` writes ``out_dir/videos/<id>.mp4`` and
``out_dir/manifest.jsonl``. Each video shows 2-4 sequential events such as
"a red 3 moves left": a digit from scikit-learn's bundled handwriting set
(``load_digits``, real data, no download), tinted with a named colour, sliding
across a dim static background. Every event gets one caption with its real
start/end time, so a retrieval model has to read identity, colour, direction
and (through the timing) order off the pixels. ``style`` (``STYLES``) changes the
text: ``narrated`` replaces the captions with HowTo100M-style speech
(``narration.py``), ``order_pairs`` renders pairs of videos with the same events
in opposite orders.

Design choices, and why:

* Video ``i`` is a pure function of ``(seed, i)`` (``make_spec``), so it does not
  depend on ``n_videos`` and two seeds give disjoint sets (train seed 0 vs test
  seed 1).
* Train videos draw handwriting samples from 80% of ``load_digits``; val/test
  videos from the other 20%, so held-out retrieval must generalise to unseen
  handwriting rather than match memorised strokes.
* Duration, frame rate, resolution and background vary per video so decoding
  code meets some variety; H.264 with B-frames (``superfast``) makes the decoder
  reorder frames as real footage does.
* x264 is run single-threaded with macroblock-tree rate control off: with
  ``mbtree`` on we measured different bytes for identical input within one
  process, which would break "same seed -> identical files".
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

from ..errors import ConfigError
from .manifest import SPLITS, Caption, VideoEntry, write_manifest
from .narration import narrate

# Saturated colours that stay distinct from each other on a dim background and
# after yuv420p chroma subsampling and 4x4 colour thumbnails.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 40),
    "green": (55, 215, 65),
    "blue": (70, 110, 255),
    "yellow": (245, 225, 50),
    "white": (240, 240, 240),
    "magenta": (225, 65, 225),
}
DIRECTIONS = ("left", "right", "up", "down")
SIZES = ((160, 120), (176, 132), (192, 144), (160, 96), (168, 112))  # (w, h); even for yuv420p
FRAME_RATES = (24, 25, 30)
BACKGROUNDS = ("gradient", "texture")  # "plain" is also accepted, for tests
MIN_EVENT_S = 1.6  # >= 1.5 s after rounding, so every event contains a full 1 s clip
_SEED_SALT = 0x5EED_D161  # keeps these streams apart from other users of the same seed
_HELDOUT_MOD = 5  # samples with index % 5 == 4 are reserved for val/test handwriting
# clean: one caption per event (downstream sets); narrated: HowTo100M-style speech instead
# (narration.py, the pretraining corpus); order_pairs: videos 2k and 2k+1 show the same
# events in opposite orders, each with a "..., then ..." query (an order-only distinction)
STYLES = ("clean", "narrated", "order_pairs")


@dataclass(frozen=True)
class Event:
    """One digit crossing the frame between ``start`` and ``end`` seconds."""

    digit: int
    colour: str
    direction: str
    start: float
    end: float
    sample: int | None = None  # index into load_digits(); None: first sample of the class
    scale: float = 0.45  # sprite height as a fraction of frame height
    lane: float = 0.5  # position across the motion axis, fraction of the free range
    span: tuple[float, float] = (0.0, 1.0)  # part of the free range traversed, low->high

    def __post_init__(self):
        if not 0 <= self.digit <= 9:
            raise ValueError(f"digit must be 0-9, got {self.digit}")
        if self.colour not in PALETTE:
            raise ValueError(f"colour {self.colour!r} is not one of {', '.join(PALETTE)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"need 0 <= start < end, got {self.start}..{self.end}")


@dataclass(frozen=True)
class VideoSpec:
    events: tuple[Event, ...]
    fps: int = 25
    size: tuple[int, int] = (160, 120)  # (width, height)
    duration: float = 6.0  # seconds; rendered as round(duration * fps) frames
    background: str = "gradient"
    seed: int = 0  # background texture / tint

    @property
    def n_frames(self) -> int:
        return int(round(self.duration * self.fps))


def caption_for(event: Event) -> str:
    return f"a {event.colour} {event.digit} moves {event.direction}"


# --------------------------------------------------------------------------- data

@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, offline

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=None)
def _pool(digit: int, split: str) -> np.ndarray:
    """Indices of samples of `digit` that videos of `split` may use."""
    _, target = _digits()
    idx = np.flatnonzero(target == digit)
    heldout = idx % _HELDOUT_MOD == _HELDOUT_MOD - 1
    return idx[~heldout] if split == "train" else idx[heldout]


def _resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of an (H, W) or (H, W, C) float array (pixel-centre aligned)."""
    h, w = img.shape[:2]
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = ys - y0, xs - x0
    if img.ndim == 3:
        fy, fx = fy[:, None, None], fx[None, :, None]
    else:
        fy, fx = fy[:, None], fx[None, :]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


# --------------------------------------------------------------------------- rendering

def render_background(spec: VideoSpec) -> np.ndarray:
    """The static (H, W, 3) uint8 background; dim (<= ~75) so every palette colour stands out."""
    w, h = spec.size
    rng = np.random.default_rng([_SEED_SALT, spec.seed, 1])
    if spec.background == "plain":
        return np.full((h, w, 3), 30, np.uint8)
    if spec.background == "gradient":
        c0, c1 = rng.uniform(10, 70, 3), rng.uniform(10, 70, 3)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        proj = (xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        bg = c0 + (c1 - c0) * t[..., None]
    elif spec.background == "texture":
        gh, gw = rng.integers(3, 9, size=2)
        coarse = rng.uniform(0, 1, (gh, gw, 3))
        tint = rng.uniform(0.5, 1.0, 3)
        bg = 12 + 50 * _resize_bilinear(coarse, h, w) * tint
        bg = bg + rng.normal(0, 4, (h, w, 1))  # fine grain, same in all channels
    else:
        raise ValueError(f"background {spec.background!r} is not one of {', '.join(BACKGROUNDS)}, plain")
    return np.clip(bg + 0.5, 0, 255).astype(np.uint8)


@dataclass
class _Sprite:
    event: Event
    alpha: np.ndarray  # (S, S, 1) float32 in [0, 1]
    ink: np.ndarray  # (S, S, 3) float32: alpha * colour, premultiplied once per event
    path: tuple[float, float, float, float]  # x0, y0 -> x1, y1: top-left corner at start/end


def _make_sprite(event: Event, w: int, h: int) -> _Sprite:
    images, target = _digits()
    sample = event.sample if event.sample is not None else int(np.flatnonzero(target == event.digit)[0])
    if target[sample] != event.digit:
        raise ValueError(f"sample {sample} is a {target[sample]}, not a {event.digit}")
    s = max(8, min(int(round(event.scale * h)), h - 2, w - 2))
    # Strokes in load_digits are grey and thin; boosting makes the upscaled digit solid.
    alpha = np.clip(_resize_bilinear(images[sample], s, s) * 1.4, 0, 1)[..., None].astype(np.float32)
    ink = alpha * np.asarray(PALETTE[event.colour], np.float32)
    free_x, free_y = w - s, h - s
    a, b = event.span
    if event.direction in ("left", "right"):
        y = event.lane * free_y
        xa, xb = a * free_x, b * free_x
        path = (xa, y, xb, y) if event.direction == "right" else (xb, y, xa, y)
    else:
        x = event.lane * free_x
        ya, yb = a * free_y, b * free_y  # image rows grow downwards
        path = (x, ya, x, yb) if event.direction == "down" else (x, yb, x, ya)
    return _Sprite(event, alpha, ink, path)


def render_frames(spec: VideoSpec):
    """Yield (H, W, 3) uint8 frames; frame n shows time n / fps."""
    w, h = spec.size
    bg = render_background(spec)
    sprites = [_make_sprite(e, w, h) for e in spec.events]
    for n in range(spec.n_frames):
        t = n / spec.fps
        frame = bg.copy()
        for sp in sprites:
            e = sp.event
            if not e.start <= t < e.end:
                continue
            p = (t - e.start) / (e.end - e.start)
            x0, y0, x1, y1 = sp.path
            x, y = int(round(x0 + (x1 - x0) * p)), int(round(y0 + (y1 - y0) * p))
            s = sp.alpha.shape[0]
            region = frame[y : y + s, x : x + s].astype(np.float32)
            frame[y : y + s, x : x + s] = (region * (1 - sp.alpha) + sp.ink + 0.5).astype(np.uint8)
        yield frame


def _default_codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # PyAV built without x264: MPEG-4 part 2 still decodes everywhere
        return "mpeg4"


def render_video(spec: VideoSpec, path: str | os.PathLike, codec: str | None = None) -> Path:
    """Encode `spec` to an .mp4 at `path`, written under a temporary name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    codec = codec or _default_codec()
    w, h = spec.size
    rate = Fraction(spec.fps)
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            # pts counts frames in a 1/fps time base, so timestamps are exactly n / fps
            # (the mp4 muxer rescales them to its own timescale losslessly).
            time_base = stream.codec_context.time_base = 1 / rate
            stream.codec_context.thread_count = 1  # threaded encoders are not bit-reproducible
            if codec == "libx264":
                stream.options = {"preset": "superfast", "crf": "23", "x264-params": "mbtree=0"}
            else:
                stream.codec_context.bit_rate = 600_000
            for n, arr in enumerate(render_frames(spec)):
                frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
                frame.pts = n
                frame.time_base = time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------- dataset

def _plan_times(rng: np.random.Generator, duration: float) -> list[tuple[float, float]]:
    """2-4 sequential, non-overlapping intervals covering most of [0, duration]."""
    # Longer videos get more events, so a single event rarely lasts more than ~8 s.
    n_max = min(4, int(duration // 2.0))
    n = int(rng.integers(max(2, n_max - 1), n_max + 1))
    slack = duration - MIN_EVENT_S * n
    gaps = rng.uniform(0, min(0.6, slack / (2 * (n + 1))), n + 1)  # lead, between, trail
    lengths = MIN_EVENT_S + (slack - gaps.sum()) * rng.dirichlet(np.full(n, 3.0))
    times, t = [], gaps[0]
    limit = np.floor(duration * 100) / 100
    for i in range(n):
        start, end = round(float(t), 2), min(round(float(t + lengths[i]), 2), limit)
        times.append((start, end))
        t += lengths[i] + gaps[i + 1]
    return times


def make_spec(seed: int, index: int, split: str = "train") -> VideoSpec:
    """The spec of video `index` in the set generated with `seed` (independent of set size)."""
    rng = np.random.default_rng([_SEED_SALT, seed, index])
    w, h = SIZES[rng.integers(len(SIZES))]
    fps = int(FRAME_RATES[rng.integers(len(FRAME_RATES))])
    n_frames = int(round(rng.uniform(4.0, 20.0) * fps))
    duration = n_frames / fps
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg_seed = int(rng.integers(2**31))
    events, prev_digit = [], -1
    for start, end in _plan_times(rng, duration):
        # A new digit each time, so "first a 3, then a 7" is always an ordering question.
        digit = int(rng.choice([d for d in range(10) if d != prev_digit]))
        prev_digit = digit
        colour = list(PALETTE)[rng.integers(len(PALETTE))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        travel = rng.uniform(0.7, 1.0)
        offset = rng.uniform(0, 1 - travel)
        events.append(
            Event(
                digit=digit,
                colour=colour,
                direction=direction,
                start=start,
                end=end,
                sample=int(rng.choice(_pool(digit, split))),
                scale=float(rng.uniform(0.40, 0.55)),
                lane=float(rng.uniform(0.1, 0.9)),
                span=(float(offset), float(offset + travel)),
            )
        )
    return VideoSpec(tuple(events), fps=fps, size=(int(w), int(h)), duration=duration,
                     background=background, seed=bg_seed)


def order_pair_spec(seed: int, index: int, split: str = "train") -> VideoSpec:
    """Video ``index`` of an order-pair set: pair ``index // 2``'s events, reversed when ``index`` is odd.

    Both videos of a pair share background, timing slots and every event's look; only
    which event fills which slot differs, so telling them apart needs the order.
    """
    base = make_spec(seed, index // 2, split)
    if index % 2 == 0:
        return base
    slots = base.events
    events = tuple(replace(e, start=slot.start, end=slot.end) for e, slot in zip(reversed(slots), slots))
    return replace(base, events=events)


def order_query(events: tuple[Event, ...]) -> str:
    return ", then ".join(caption_for(e) for e in events)


def _styled(spec: VideoSpec, seed: int, index: int, style: str) -> tuple[Caption, ...]:
    """The manifest captions of a video in ``style``."""
    if style == "narrated":
        return narrate(spec, seed, index)
    captions = tuple(Caption(e.start, e.end, caption_for(e), "caption") for e in spec.events)
    if style == "order_pairs":
        ev = spec.events
        captions += (Caption(ev[0].start, ev[-1].end, order_query(ev), "query"),)
    return captions


def video_id(index: int, seed: int, id_prefix: str = "synth") -> str:
    # The seed is part of the id so train and test manifests can be merged without clashes.
    return f"{id_prefix}-s{seed}-{index:05d}"


def _render_one(args: tuple[int, int, str, str, Path, str]) -> VideoEntry:
    """Video ``index`` of the set: rendered to ``video_dir``, returned as its manifest entry."""
    index, seed, split, id_prefix, video_dir, style = args
    spec = order_pair_spec(seed, index, split) if style == "order_pairs" else make_spec(seed, index, split)
    vid = video_id(index, seed, id_prefix)
    path = render_video(spec, video_dir / f"{vid}.mp4")
    return VideoEntry(vid, str(path), split, round(spec.duration, 6), _styled(spec, seed, index, style))


def synthesize(
    out_dir: str | os.PathLike,
    n_videos: int,
    seed: int,
    split: str = "train",
    id_prefix: str = "synth",
    progress: bool = True,
    workers: int = 1,
    style: str = "clean",
) -> Path:
    """Render `n_videos` videos and their manifest under `out_dir`; returns the manifest path.

    ``workers`` > 1 renders in that many processes (x264 runs single-threaded, see
    above); every video depends only on (seed, index), so the files are the same.
    ``style`` is one of ``STYLES``: the pixels of video i are the same in ``clean``
    and ``narrated``; only the text differs.
    """
    # ConfigError (a ValueError): the command line prints these as one line, exit 2
    if n_videos < 1:
        raise ConfigError(f"n_videos must be >= 1, got {n_videos}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if style not in STYLES:
        raise ConfigError(f"style {style!r} is not one of {', '.join(STYLES)}")
    if style == "order_pairs" and n_videos % 2:
        raise ConfigError(f"order_pairs writes videos in pairs: n_videos must be even, got {n_videos}")
    out_dir = Path(out_dir).resolve()
    jobs = [(i, seed, split, id_prefix, out_dir / "videos", style) for i in range(n_videos)]
    from tqdm import tqdm

    # spawn: a forked child of a process that already runs torch or av threads can hang
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        rendered = pool.map(_render_one, jobs, chunksize=4) if pool else map(_render_one, jobs)
        entries = list(tqdm(rendered, total=n_videos, desc=f"synth {split}", unit="video", disable=not progress))
    finally:
        if pool is not None:
            pool.shutdown()
    return write_manifest(entries, out_dir / "manifest.jsonl")
