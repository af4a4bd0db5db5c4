"""Video manifests: JSONL, one video per line, with timed captions.

Schema (documented in data_manifests/README.md):

    {"video_id": "v0001", "path": "videos/v0001.mp4", "split": "train",
     "duration": 12.4,                                   # optional, seconds
     "captions": [{"start": 0.0, "end": 3.1, "text": "a 3 moves left",
                   "kind": "caption"}]}                  # kind optional

`path` is absolute or relative to the manifest file. Every problem is reported
as ``ManifestError`` naming the file, the 1-based line number and what is wrong,
so a user with a million-line manifest can jump straight to the bad line.

Lines are split on ``\n`` only (a trailing ``\r`` of CRLF files is ignored), must
be UTF-8 (a UTF-8 byte-order mark at the start of the file is ignored), and blank
lines (nothing but spaces, tabs and CR) are skipped. A path may name a member of an
uncompressed tar, ``shards/00003.tar#000000014.mp4`` (``tar_members.py``): the tar's path
is resolved and checked like a file's, the member's name is kept as written. With ``root=`` every resolved video path must lie inside that
folder (after following symlinks), so a manifest from elsewhere cannot point a job
at arbitrary files.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
from ..errors import VideolmError
from .tar_members import check_member_name, member_path, split_member

SPLITS = ("train", "val", "test")
CAPTION_KINDS = ("caption", "subtitle", "asr", "query")
_KNOWN_KEYS = {"video_id", "path", "split", "duration", "captions"}


class ManifestError(VideolmError, ValueError):
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
            member = split_member(path)  # only a tar member's tar is a file system path
            try:
                path = os.path.relpath(member[0] if member else path, relative_to)
            except ValueError:  # different drive on Windows
                path = member[0] if member else path
            if member:
                path = member_path(path, member[1])
        d = {"video_id": self.video_id, "path": path, "split": self.split}
        if self.duration is not None:
            d["duration"] = self.duration
        d["captions"] = [c.to_dict() for c in self.captions]
        return d


def _short(value, limit: int = 60) -> str:
    """repr for error messages, cut so a 1 MB field does not become a 1 MB message."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return _cut(repr(value), limit)


def _keys(keys) -> str:
    names = (k if k.isprintable() else repr(k) for k in sorted(keys))
    return _cut(", ".join(names), 80)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# Searched with a compiled pattern, not a Python loop per character: manifests hold millions of captions.
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
_BAD_ID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _check_text(value: str, what: str, controls: bool = False) -> None:
    """Refuse strings that cannot be written back as UTF-8 or passed to the OS / HDF5."""
    bad = (_BAD_ID if controls else _BAD_TEXT).search(value)
    if bad is None:
        return
    o = ord(bad.group())
    if o == 0:
        raise ValueError(f"{what} contains a NUL character (\\u0000)")
    if 0xD800 <= o <= 0xDFFF:
        raise ValueError(f"{what} contains a lone surrogate \\u{o:04x} (not valid Unicode)")
    raise ValueError(f"{what} contains a control character \\u{o:04x}")


def _number(value, what: str) -> float:
    # bool is an int subclass in Python; `true` as a time is a typo, not 1.0 s.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {_short(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer with hundreds of digits
        raise ValueError(f"{what} must be finite, got an integer too large for a float") from None
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
    _check_text(text, f"captions[{index}].text")
    kind = raw.get("kind")
    if kind is not None and not (isinstance(kind, str) and kind in CAPTION_KINDS):
        raise ValueError(f"captions[{index}].kind {_short(kind, 40)} is not one of {', '.join(CAPTION_KINDS)}")
    unknown = set(raw) - {"start", "end", "text", "kind"}
    if unknown:
        raise ValueError(f"captions[{index}]: unknown field(s): {_keys(unknown)}")
    return Caption(start=start, end=end, text=text, kind=kind)


def parse_entry(obj, base_dir: str | None, root: str | None = None) -> VideoEntry:
    """Validate one decoded JSON object; raises ValueError with a short reason.

    `root`, when given, is an absolute, symlink-free folder (``os.path.realpath``):
    the resolved path must lie inside it.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, got {_json_type(obj)}")
    for key in ("video_id", "path", "split"):
        if key not in obj:
            raise ValueError(f"missing field '{key}'")
    video_id = obj["video_id"]
    if not isinstance(video_id, str) or not video_id.strip():
        raise ValueError(f"video_id must be a non-empty string, got {_short(video_id)}")
    _check_text(video_id, "video_id", controls=True)
    path = obj["path"]
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {_short(path)}")
    _check_text(path, "path")
    split = obj["split"]
    if not (isinstance(split, str) and split in SPLITS):
        raise ValueError(f"split {_short(split, 40)} is not one of {', '.join(SPLITS)}")
    duration = obj.get("duration")
    if duration is not None:
        duration = _number(duration, "duration")
        if duration <= 0:
            raise ValueError(f"duration must be positive, got {duration}")
    raw_captions = obj.get("captions", [])
    if not isinstance(raw_captions, list):
        raise ValueError(f"captions must be a list, got {_json_type(raw_captions)}")
    captions = tuple(_parse_caption(c, i) for i, c in enumerate(raw_captions))
    unknown = set(obj) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown field(s): {_keys(unknown)}")
    path = _resolve_path(path, base_dir, root)
    return VideoEntry(video_id=video_id, path=path, split=split, duration=duration, captions=captions)


def _resolve_path(written: str, base_dir: str | None, root: str | None) -> str:
    """The path made absolute against the manifest's folder and checked against `root`.
    For a tar member (``x.tar#member``) that is the tar's path; the member's name is kept
    as written, since normalising it could change which member it names."""
    member = split_member(written)
    if member is not None:
        check_member_name(member[1])
    file_path = member[0] if member else written
    full = file_path
    if base_dir is not None and not os.path.isabs(file_path):
        full = os.path.normpath(os.path.join(base_dir, file_path))
    if root is not None:
        _check_inside(file_path, full, root)
    return member_path(full, member[1]) if member else full


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_inside(written: str, full: str, root: str) -> None:
    """Refuse a path that, with symlinks followed, is not inside `root` (absolute, `..`, or a link out)."""
    try:
        real = os.path.realpath(full)
    except (OSError, ValueError) as exc:  # symlink loops on some Pythons, odd bytes
        raise ValueError(f"path {_short(written)} cannot be resolved: {exc}") from None
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        how = " through a symlink" if os.path.normpath(os.path.abspath(full)) != real else ""
        raise ValueError(f"path {_short(written)} resolves{how} to {_short(real, 120)}, outside the allowed root {root}")


def _strict_object(pairs: list) -> dict:
    """object_pairs_hook: a key given twice in one object is refused (json would keep the last silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


class _DuplicateKey(ValueError):
    pass


_BLANK = object()  # distinct from the JSON line `null`, which is an error


def _decode_line(raw: bytes, lineno: int):
    """bytes of one line -> decoded JSON value, or ``_BLANK`` for a blank line; ValueError says why not."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte-order mark written by some Windows editors
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {raw[exc.start:exc.start + 1]!r} at column {exc.start + 1})") from None
    if not line.strip(" \t\r\n"):  # JSON's own whitespace only: a line of U+00A0 or U+001C is an error
        return _BLANK
    try:
        return json.loads(line, object_pairs_hook=_strict_object)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    except _DuplicateKey as exc:
        raise ValueError(f"field {_short(exc.args[0], 40)} appears twice in one object") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's 4300-digit limit
        raise ValueError(f"malformed JSON: {_short(str(exc), 120)}") from None


def _resolve_root(manifest: Path, root) -> str | None:
    if root is None:
        return None
    real = os.path.realpath(root)
    if not os.path.isdir(real):
        raise ManifestError(manifest, None, f"root {root} is not a directory")
    return real


def iter_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Iterator[tuple[int, VideoEntry]]:
    """Stream (line_number, entry) pairs, validating as it goes. Blank lines are skipped.

    With `root`, a video path that resolves (symlinks followed) outside that folder
    is a ``ManifestError`` on its line.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(path, None, "manifest file does not exist")
    if path.is_dir():
        raise ManifestError(path, None, "is a directory, not a manifest file")
    real_root = _resolve_root(path, root)
    base_dir = str(path.resolve().parent)
    seen: dict[str, int] = {}
    with open(path, "rb") as f:  # split on b"\n" only: line numbers match `wc -l` and editors
        for lineno, raw in enumerate(f, start=1):
            try:
                obj = _decode_line(raw, lineno)
            except ValueError as exc:
                raise ManifestError(path, lineno, str(exc)) from None
            if obj is _BLANK:
                continue
            try:
                entry = parse_entry(obj, base_dir, real_root)
            except ValueError as exc:
                vid = obj.get("video_id") if isinstance(obj, dict) else None
                who = f" (video_id {_short(vid)})" if isinstance(vid, str) else ""
                raise ManifestError(path, lineno, f"{exc}{who}") from None
            if entry.video_id in seen:
                raise ManifestError(
                    path, lineno,
                    f"duplicate video_id {_short(entry.video_id)} (first seen on line {seen[entry.video_id]})",
                )
            seen[entry.video_id] = lineno
            yield lineno, entry


def load_manifest(path: str | os.PathLike, split: str | None = None,
                  root: str | os.PathLike | None = None) -> list[VideoEntry]:
    """Load and validate a whole manifest; optionally keep one split; optionally confine paths to `root`."""
    if split is not None and split not in SPLITS:
        raise ManifestError(path, None, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    entries = [e for _, e in iter_manifest(path, root=root)]
    if split is not None:
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
