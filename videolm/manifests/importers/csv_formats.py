"""CSV inputs: WebVid's results files, and any CSV with one caption per row.

WebVid ``results_2M_train.csv`` / ``results_10M_*.csv`` (columns ``videoid,
contentUrl, duration, page_dir, name``; ``duration`` is ISO 8601, ``PT00H00M11S``)
is streamed row by row: one whole-video caption (``name``) per clip.

The generic ``csv`` format is the fallback for datasets without an importer.
The user names the columns: ``--id-col`` and ``--text-col`` always; ``--start-col``
and ``--end-col`` for timed captions (seconds), otherwise every row is a whole-video
caption; ``--path-col`` for a file location (relative to --videos, or absolute)
when files are not named ``<id>.<ext>``; ``--split-col`` for a per-row split.

Rows of one video may be anywhere in the file, so rows are grouped in memory by id
(in order of first appearance) before anything is written: a CSV with one row per
caption is far smaller than HowTo100M's caption.json, which is the input that must
stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ..manifest import CAPTION_KINDS, SPLITS, Caption
from .common import (EMPTY_TEXT, ImporterError, RawVideo, Report, check_line, csv_rows, number_or_text,
                     parse_duration, whole_video)

# --------------------------------------------------------------------------- WebVid


def import_webvid(report: Report, *, csv) -> Iterator[RawVideo]:
    """One whole-video caption (the clip's `name`) per row; rows are streamed."""
    for line, row in csv_rows(csv, "--csv", ["videoid", "name"]):
        vid = (row["videoid"] or "").strip()
        if not vid:
            report.skipped.add("row without a videoid", f"{csv}:{line}")
            continue
        name = row["name"] or ""
        captions = [whole_video(name)] if name.strip() else []
        page_dir = (row.get("page_dir") or "").strip()
        # WebVid's download scripts store clips as <page_dir>/<videoid>.mp4.
        rel = f"{page_dir}/{vid}.mp4" if page_dir else None
        yield RawVideo(vid, None, captions, duration=parse_duration(row.get("duration")), path=rel)


# --------------------------------------------------------------------------- generic CSV

# Split names other datasets use for the manifest's three.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}


@dataclass
class _Video:
    split: str | None
    path: str | None
    captions: list = field(default_factory=list)


def _split_of(value: str | None, where: str, column: str) -> str | None:
    value = (value or "").strip()
    if not value:
        return None  # the default split (--split)
    split = SPLIT_ALIASES.get(value.lower())
    if split is None:
        raise ImporterError(f"{where}: split {value!r} in column {column!r} is not one of "
                            f"{', '.join(SPLITS)} (or {', '.join(a for a in SPLIT_ALIASES if a not in SPLITS)})")
    return split


def import_csv(report: Report, *, csv, id_col: str, text_col: str, path_col: str | None = None,
               start_col: str | None = None, end_col: str | None = None, split_col: str | None = None,
               kind: str = "caption") -> Iterator[RawVideo]:
    """Rows grouped by id into manifest lines; timed captions when start/end columns are given."""
    if (start_col is None) != (end_col is None):
        raise ImporterError("--start-col and --end-col go together (without both, captions span the whole video)")
    if kind not in CAPTION_KINDS:
        raise ImporterError(f"--kind {kind!r} is not one of {', '.join(CAPTION_KINDS)}")
    required = [c for c in (id_col, text_col, path_col, start_col, end_col, split_col) if c]
    videos: dict[str, _Video] = {}
    for line, row in csv_rows(csv, "--csv", required):
        where = f"{csv}:{line}"
        vid = (row[id_col] or "").strip()
        if not vid:
            report.skipped.add("row with an empty id", where)
            continue
        split = _split_of(row[split_col], where, split_col) if split_col else None
        video = videos.get(vid)
        if video is None:
            path = (row[path_col] or "").strip() if path_col else ""
            video = videos[vid] = _Video(split, path or None)
        elif split_col and split != video.split:
            report.notes.add("rows of one id disagree on the split: the first row's is kept", f"{vid} ({where})")
        text = row[text_col] or ""
        if start_col:
            checked = check_line(number_or_text(row[start_col]), number_or_text(row[end_col]), text)
            if checked.__class__ is str:
                report.skipped.add(checked, f"{vid} ({where})")
                continue
            video.captions.append(Caption(checked[0], checked[1], text, kind))
        elif not text.strip():
            report.skipped.add(EMPTY_TEXT, f"{vid} ({where})")
        else:
            video.captions.append(whole_video(text, kind))
    for vid, video in videos.items():
        yield RawVideo(vid, video.split, video.captions, path=video.path)
