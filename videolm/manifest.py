"""Video manifests: JSONL, one video per line, with timed captions.

Schema (documented in data_manifests/README.md):

    {"video_id": "v0001", "path": "videos/v0001.mp4", "split": "train",
     "duration": 12.4,                                   # optional, seconds
     "captions": [{"start": 0.0, "end": 3.1, "text": "a 3 moves left",
                   "kind": "caption"}]}                  # kind optional

`path` is absolute or relative to the manifest file. Every problem is reported
as ``ManifestError`` naming the file, the 1-based line number and what is wrong,
so a user with a million-line manifest can jump straight to the bad line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

SPLITS = ("train", "val", "test")
CAPTION_KINDS = ("caption", "subtitle", "asr", "query")
_KNOWN_KEYS = {"video_id", "path", "split", "duration", "captions"}


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message says file, line and why."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Caption:
    start: float
    end: float
    text: str
    kind: str | None = None

    def to_dict(self) -> dict:
        d = {"start": self.start, "end": self.end, "text": self.text}
        if self.kind is not None:
            d["kind"] = self.kind
        return d


@dataclass(frozen=True)
class VideoEntry:
    video_id: str
    path: str  # resolved: absolute, or as given when the manifest had no location
    split: str
    duration: float | None = None
    captions: tuple[Caption, ...] = field(default_factory=tuple)

    def to_dict(self, relative_to: str | os.PathLike | None = None) -> dict:
        path = self.path
        if relative_to is not None:
            try:
                path = os.path.relpath(self.path, relative_to)
            except ValueError:  # different drive on Windows
                pass
        d = {"video_id": self.video_id, "path": path, "split": self.split}
        if self.duration is not None:
            d["duration"] = self.duration
        d["captions"] = [c.to_dict() for c in self.captions]
        return d


def _number(value, what: str) -> float:
    # bool is an int subclass in Python; `true` as a time is a typo, not 1.0 s.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r:.60}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def _parse_caption(raw, index: int) -> Caption:
    if not isinstance(raw, dict):
        raise ValueError(f"captions[{index}] must be an object, got {type(raw).__name__}")
    for key in ("start", "end", "text"):
        if key not in raw:
            raise ValueError(f"captions[{index}] is missing '{key}'")
    start = _number(raw["start"], f"captions[{index}].start")
    end = _number(raw["end"], f"captions[{index}].end")
    if start < 0:
        raise ValueError(f"captions[{index}]: start {start} is negative")
    if end < start:
        raise ValueError(f"captions[{index}]: end {end} < start {start}")
    text = raw["text"]
    if not isinstance(text, str):
        raise ValueError(f"captions[{index}].text must be a string, got {type(text).__name__}")
    kind = raw.get("kind")
    if kind is not None and kind not in CAPTION_KINDS:
        raise ValueError(f"captions[{index}].kind {kind!r} is not one of {', '.join(CAPTION_KINDS)}")
    return Caption(start=start, end=end, text=text, kind=kind)


def parse_entry(obj, base_dir: str | None) -> VideoEntry:
    """Validate one decoded JSON object; raises ValueError with a short reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, got {type(obj).__name__}")
    for key in ("video_id", "path", "split"):
        if key not in obj:
            raise ValueError(f"missing field '{key}'")
    video_id = obj["video_id"]
    if not isinstance(video_id, str) or not video_id.strip():
        raise ValueError(f"video_id must be a non-empty string, got {video_id!r:.60}")
    path = obj["path"]
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {path!r:.60}")
    split = obj["split"]
    if split not in SPLITS:
        raise ValueError(f"split {split!r:.40} is not one of {', '.join(SPLITS)}")
    duration = obj.get("duration")
    if duration is not None:
        duration = _number(duration, "duration")
        if duration <= 0:
            raise ValueError(f"duration must be positive, got {duration}")
    raw_captions = obj.get("captions", [])
    if not isinstance(raw_captions, list):
        raise ValueError(f"captions must be a list, got {type(raw_captions).__name__}")
    captions = tuple(_parse_caption(c, i) for i, c in enumerate(raw_captions))
    unknown = set(obj) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    return VideoEntry(video_id=video_id, path=path, split=split, duration=duration, captions=captions)


def iter_manifest(path: str | os.PathLike) -> Iterator[tuple[int, VideoEntry]]:
    """Stream (line_number, entry) pairs, validating as it goes. Blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(path, None, "manifest file does not exist")
    base_dir = str(path.resolve().parent)
    seen: dict[str, int] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(path, lineno, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
            try:
                entry = parse_entry(obj, base_dir)
            except ValueError as exc:
                vid = obj.get("video_id") if isinstance(obj, dict) else None
                who = f" (video_id {vid!r:.60})" if isinstance(vid, str) else ""
                raise ManifestError(path, lineno, f"{exc}{who}") from None
            if entry.video_id in seen:
                raise ManifestError(
                    path, lineno, f"duplicate video_id {entry.video_id!r} (first seen on line {seen[entry.video_id]})"
                )
            seen[entry.video_id] = lineno
            yield lineno, entry


def load_manifest(path: str | os.PathLike, split: str | None = None) -> list[VideoEntry]:
    """Load and validate a whole manifest; optionally keep one split."""
    entries = [e for _, e in iter_manifest(path)]
    if split is not None:
        if split not in SPLITS:
            raise ManifestError(path, None, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        entries = [e for e in entries if e.split == split]
    return entries


def write_manifest(entries: Iterable[VideoEntry], path: str | os.PathLike, relative: bool = True) -> Path:
    """Write entries as JSONL (atomically). Paths become relative to the file when `relative`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = str(path.resolve().parent) if relative else None
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e.to_dict(relative_to=base), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
