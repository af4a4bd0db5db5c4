"""HowTo100M and TVQA subtitles: JSON inputs read as a stream.

Field names follow the public releases:

* HowTo100M ``caption.json``: ``{video_id: {"start": [...], "end": [...], "text":
  [...]}}`` (1.2M videos in one object), or UniVL's ``caption.pickle`` of the same
  shape (numpy arrays allowed).
* TVQA / TVR ``tvqa_subtitles.jsonl`` (any JSONL of this shape): one line per clip,
  ``{"vid_name": ..., "sub": [{"text", "start", "end"}]}``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator

from ..manifest import Caption
from .common import ImporterError, RawVideo, Report, check_line, jsonl_objects, require_file
from .json_stream import DEFAULT_CHUNK, iter_object

PICKLE_SUFFIXES = (".pickle", ".pkl")
_INF = float("inf")


# --------------------------------------------------------------------------- HowTo100M


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1)
    # Protocol 2+ pickles start with the PROTO opcode 0x80; JSON never does.
    return head == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES


def _pickle_items(path: Path) -> Iterator[tuple[str, object]]:
    # A pickle cannot be read incrementally; UniVL's caption.pickle is loaded whole.
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except Exception as exc:  # unpickling can fail in many ways (missing classes, truncation)
        raise ImporterError(f"{path}: could not unpickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ImporterError(f"{path}: expected a dict {{video_id: {{'start', 'end', 'text'}}}}, "
                            f"got {type(data).__name__}")
    for vid, value in data.items():
        if not isinstance(vid, str):
            raise ImporterError(f"{path}: video ids must be strings, got {type(vid).__name__} {vid!r:.60}")
        yield vid, value


def _asr_captions(vid: str, value, path: Path, report: Report) -> list[tuple]:
    if not isinstance(value, dict):
        raise ImporterError(f"{path}: video {vid!r}: expected an object with lists 'start', 'end' and 'text', "
                            f"got {type(value).__name__}")
    cols = []
    for key in ("start", "end", "text"):
        col = value.get(key)
        if hasattr(col, "tolist"):  # numpy arrays in UniVL's pickle; tolist() also gives plain floats
            col = col.tolist()
        if not isinstance(col, (list, tuple)):
            what = "is missing" if key not in value else f"must be a list, got {type(col).__name__}"
            raise ImporterError(f"{path}: video {vid!r}: '{key}' {what}")
        cols.append(col)
    starts, ends, texts = cols
    if not len(starts) == len(ends) == len(texts):
        raise ImporterError(f"{path}: video {vid!r}: 'start', 'end' and 'text' have different lengths "
                            f"({len(starts)}, {len(ends)}, {len(texts)})")
    out = []
    for i, (start, end, text) in enumerate(zip(starts, ends, texts)):
        # check_line inlined for the common case (floats, 0 <= start <= end, text): this
        # loop runs once per ASR line, 7.5M times for 1M videos.
        if (start.__class__ is float and end.__class__ is float and 0.0 <= start <= end < _INF
                and text.__class__ is str and text and not text.isspace()):
            out.append(Caption(start, end, text, "asr"))
            continue
        checked = check_line(start, end, text)
        if checked.__class__ is str:
            report.skipped.add(checked, f"{vid}#{i}")
        else:
            out.append(Caption(checked[0], checked[1], text, "asr"))
    return out


def import_howto100m(report: Report, *, captions, trust_pickle: bool = False,
                     chunk_size: int = DEFAULT_CHUNK) -> Iterator[RawVideo]:
    """Timed ASR lines, one manifest line per video, streamed from caption.json."""
    path = require_file(captions, "--captions")
    if _is_pickle(path):
        if not trust_pickle:
            raise ImporterError(f"{path} is a Python pickle: loading a pickle can run arbitrary code; pass "
                                f"--trust-pickle only for a file you trust (e.g. UniVL's caption.pickle from its "
                                f"official download), or use HowTo100M's caption.json")
        items = _pickle_items(path)
        yield from (RawVideo(vid, None, _asr_captions(vid, value, path, report)) for vid, value in items)
        return
    with open(path, "rb") as f:
        for vid, value in iter_object(f, str(path), chunk_size, key_name="video"):
            yield RawVideo(vid, None, _asr_captions(vid, value, path, report))


# --------------------------------------------------------------------------- TVQA subtitles


def import_tvsub(report: Report, *, subtitles) -> Iterator[RawVideo]:
    """Subtitle lines of each clip; a broken input line is reported and skipped."""
    path = require_file(subtitles, "--subtitles")
    for lineno, obj in jsonl_objects(path, report):
        if not (isinstance(obj, dict) and isinstance(obj.get("vid_name"), str) and obj["vid_name"].strip()
                and isinstance(obj.get("sub"), list)):
            report.skipped.add("line without a string 'vid_name' and a list 'sub'", f"{path}:{lineno}")
            continue
        vid, captions = obj["vid_name"].strip(), []
        for k, s in enumerate(obj["sub"]):
            checked = check_line(s.get("start"), s.get("end"), s.get("text")) if isinstance(s, dict) \
                else "subtitle that is not an object"
            if checked.__class__ is str:
                report.skipped.add(checked, f"{vid}#{k}")
            else:
                captions.append(Caption(checked[0], checked[1], s["text"], "subtitle"))
        yield RawVideo(vid, None, captions)
