"""WebDataset tars, as video2dataset writes them: one manifest line per sample.

A sample is the run of consecutive members sharing a key: WebDataset's key is a
member's name up to the first dot of its basename, directory prefix included
(``part/000000014.mp4`` and ``part/000000014.json`` are sample ``part/000000014``).
The video is the sample's ``.mp4`` (or ``.webm``/``.mkv``/``.avi``/``.mov``), kept in
its tar and addressed as ``<tar>#<member>`` (``manifests/tar_members.py``); the caption
is its ``.txt``, or a field of its ``.json`` (``caption_field``).

video2dataset's ``.json`` is read for three things: ``status`` (a sample whose
status is not ``success``, ``failed_to_download`` for instance, is dropped and
counted with its ``error_message``), ``clips`` (a clipped sample holds only the span
``[[start, end]]`` of its source video, in seconds or ``HH:MM:SS.mmm``; its file
starts at 0, so its duration is ``end - start``), and a duration (ffprobe's
``video_metadata.format.duration``, else a ``duration`` column kept from the input).

Shard arguments are paths, globs, or brace patterns (``{00000..00099}``, ``{a,b}``)
expanded the way webdataset's braceexpand does, numbers padded to the wider bound.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from ..tar_members import member_path
from .common import VIDEO_EXTENSIONS, ImporterError, RawVideo, Report, parse_duration, whole_video

TAR_VIDEO_EXTENSIONS = VIDEO_EXTENSIONS + (".mov",)
SMALL = 1 << 20  # .txt / .json members larger than this are not metadata: refused, counted
NOT_SUCCESS = "video2dataset status {status!r}"
NO_VIDEO = "sample without a video member (.mp4/.webm/.mkv/.avi/.mov)"
BAD_JSON = "sample .json does not parse"
BAD_CLIPS = "sample .json has an unreadable 'clips' span"

# --------------------------------------------------------------------------- shard patterns

_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def _closing(text: str, start: int) -> int:
    """Index of the brace closing the one at ``start``; -1 when unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _top_level_split(body: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    return parts + [body[last:]]


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b; ``{00..02}`` keeps the padding; ``{x,y}`` alternatives, nested."""
    start = pattern.find("{")
    end = _closing(pattern, start) if start >= 0 else -1
    if end < 0:
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    rest = expand_braces(tail)
    m = _RANGE.fullmatch(body)
    if m:
        lo, hi = int(m[1]), int(m[2])
        width = max(len(m[1]), len(m[2])) if m[1].startswith("0") or m[2].startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    else:
        options = _top_level_split(body)
        if len(options) == 1:  # "{x}" is not an expansion: the braces stay, as in shells
            return [head + "{" + x + "}" + r for x in expand_braces(body) for r in rest]
    return [head + x + r for opt in options for x in expand_braces(opt) for r in rest]


def expand_shards(patterns) -> list[str]:
    """Every tar the arguments name, in the order given; a name that matches nothing is an error."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    tars: list[str] = []
    for pattern in patterns:
        for name in expand_braces(str(pattern)):
            if any(c in name for c in "*?["):
                found = sorted(glob.glob(name))
                if not found:
                    raise ImporterError(f"shards {name}: the glob matches no file")
                tars += found
            elif not os.path.isfile(name):
                what = "a directory, not a tar file" if os.path.isdir(name) else "no such file"
                raise ImporterError(f"shards {name}: {what}" + (f" (from {pattern})" if name != pattern else ""))
            else:
                tars.append(name)
    if not tars:
        raise ImporterError("no shards given")
    return tars


# --------------------------------------------------------------------------- samples


@dataclass
class _Sample:
    key: str
    video: str | None = None  # the video member's name
    text: str | None = None
    meta: dict | None = None
    problem: tuple[str, str] | None = None  # (reason, example) when a member could not be read
    members: list[str] = field(default_factory=list)


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member: WebDataset's split at the first dot of the basename."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def _read_small(tf: tarfile.TarFile, info: tarfile.TarInfo) -> str:
    if info.size > SMALL:
        raise ValueError(f"{info.size:,} bytes, more than metadata")
    data = tf.extractfile(info).read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start})") from None


def _add_member(sample: _Sample, tf: tarfile.TarFile, info: tarfile.TarInfo, ext: str, where: str) -> None:
    sample.members.append(info.name)
    if ext in TAR_VIDEO_EXTENSIONS and sample.video is None:
        sample.video = info.name
    elif ext in (".txt", ".json"):
        try:
            text = _read_small(tf, info)
            if ext == ".txt":
                sample.text = text
            else:
                meta = json.loads(text)
                if not isinstance(meta, dict):
                    raise ValueError(f"a JSON {type(meta).__name__}, not an object")
                sample.meta = meta
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            sample.problem = (BAD_JSON if ext == ".json" else "sample .txt unreadable", f"{where} ({exc})")


def iter_samples(tar: str, report: Report) -> Iterator[_Sample]:
    """Samples of one tar in order; a tar that stops being readable is counted, not fatal."""
    current: _Sample | None = None
    try:
        with tarfile.open(tar, "r:") as tf:  # uncompressed: extraction reads members in place
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = sample_key(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = _Sample(key)
                _add_member(current, tf, info, ext, member_path(tar, info.name))
    except (tarfile.TarError, EOFError, OSError) as exc:
        report.skipped.add("unreadable tar (compressed, corrupt or cut short): samples from the damage on "
                           "are not imported", f"{tar} ({exc or type(exc).__name__})")
    if current is not None:
        yield current


# --------------------------------------------------------------------------- fields


def _seconds(value) -> float:
    """video2dataset's span times: seconds, or "HH:MM:SS.mmm" when it kept string times."""
    if isinstance(value, str) and ":" in value:
        h, m, s = value.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"time {value!r}")
    return float(value)


def clip_duration(meta: dict) -> float | None:
    """end - start of a clipped sample's one span; None when the sample was not clipped."""
    clips = meta.get("clips")
    if not clips:
        return None
    if not (isinstance(clips, list) and len(clips) == 1 and isinstance(clips[0], list) and len(clips[0]) == 2):
        raise ValueError(f"'clips' should hold one [start, end] span, got {str(clips)[:60]}")
    start, end = (_seconds(t) for t in clips[0])
    if not 0 <= start < end:
        raise ValueError(f"span [{start}, {end}] is empty or negative")
    return round(end - start, 6)


def meta_duration(meta: dict) -> float | None:
    """ffprobe's duration when video2dataset ran its ffprobe subsampler, else a kept `duration` column."""
    probed = meta.get("video_metadata")
    fmt = probed.get("format") if isinstance(probed, dict) else None
    seconds = parse_duration(fmt.get("duration")) if isinstance(fmt, dict) else None
    return seconds if seconds is not None else parse_duration(meta.get("duration"))


def _caption(sample: _Sample, caption_field: str | None, where: str, report: Report) -> str | None:
    if caption_field is None:
        if sample.text is None:
            report.dropped.add("sample without a .txt caption", where)
        return sample.text
    value = (sample.meta or {}).get(caption_field)
    if not isinstance(value, str):
        why = "no .json" if sample.meta is None else f"no string field {caption_field!r} in its .json"
        report.dropped.add(f"sample without a caption ({why})", where)
        return None
    return value


def _to_raw(tar: str, sample: _Sample, caption_field: str | None, report: Report) -> RawVideo | None:
    where = member_path(tar, sample.key)
    if sample.problem is not None:
        report.dropped.add(*sample.problem)
        return None
    meta = sample.meta or {}
    status = meta.get("status", "success")
    if status != "success":
        report.dropped.add(NOT_SUCCESS.format(status=status), f"{where} ({str(meta.get('error_message'))[:80]})")
        return None
    if sample.video is None:
        report.dropped.add(NO_VIDEO, f"{where} (members: {', '.join(sample.members)[:80]})")
        return None
    try:
        duration = clip_duration(meta)
    except ValueError as exc:
        report.dropped.add(BAD_CLIPS, f"{where} ({exc})")
        return None
    if duration is not None:
        report.notes.add("clipped sample: duration from its 'clips' span", where)
    text = _caption(sample, caption_field, where, report)
    if text is None:
        return None
    captions = [whole_video(text.strip())] if text.strip() else []
    return RawVideo(sample.key, None, captions, duration=duration or meta_duration(meta),
                    path=member_path(tar, sample.video))


def import_webdataset(report: Report, *, shards, caption_field: str | None = None) -> Iterator[RawVideo]:
    """One whole-video caption per successful sample with a video; tars are streamed."""
    for tar in expand_shards(shards):
        tar = os.path.abspath(tar)
        for sample in iter_samples(tar, report):
            raw = _to_raw(tar, sample, caption_field, report)
            if raw is not None:
                yield raw
