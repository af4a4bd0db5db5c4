"""ActivityNet Captions, DiDeMo and TVR: timed descriptions of moments, one file per split.

These are the datasets moment retrieval, paragraph-to-video retrieval and dense
captioning are evaluated on. Each release has one annotation file per split, given as
``--train`` / ``--val`` / ``--test`` (at least one); every video of a file gets that
file's split. Files are loaded whole (the largest, TVR's train file, is ~20 MB), the
output is streamed.

Field names follow the public releases:

* ActivityNet Captions ``train.json``, ``val_1.json``, ``val_2.json``: ``{"v_<youtube
  id>": {"duration": s, "timestamps": [[start, end], ...], "sentences": [...]}}``.
  val_1 and val_2 are two annotations of the same videos: give one of them.
* DiDeMo ``train_data.json``, ``val_data.json``, ``test_data.json``: ``[{"video":
  "<flickr file name>", "description", "times": [[s, e], ...] (one pair of 5-second
  segment indices 0-5 per annotator), "annotation_id", ...}]``.
* TVR ``tvr_{train,val,test_public}_release.jsonl``: one query per line, ``{"desc_id",
  "desc", "vid_name", "duration", "ts": [start, end], "type"}`` (no ``ts`` in
  test_public), joined by ``vid_name`` with TVQA's subtitles (``--subtitles``, the
  ``tvsub`` format).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from ..manifest import SPLITS, Caption
from .common import (ImporterError, RawVideo, Report, check_line, expect, jsonl_objects, load_json,
                     parse_duration, require_file)
from .streamed import import_tvsub

PAST_END = "caption span past the video's duration: its end is clamped to the duration"
AFTER_END = "caption line starting at or after the video's end"
NO_SPAN = "caption line without a [start, end] time pair"
DIDEMO_SEGMENT = 5.0  # seconds per DiDeMo segment
DIDEMO_SEGMENTS = 6  # indices 0-5: the first 30 s of each video
DIDEMO_TIE = "annotators tie on the moment: the span overlapping the others most is kept"
DIDEMO_BAD_TIMES = "annotation without a valid segment pair (indices 0-5, start <= end)"


def split_files(files: tuple, what: str) -> list[tuple[str, Path]]:
    """[(split, path)] of the --train/--val/--test files given; at least one is needed."""
    given = [(split, f) for split, f in zip(SPLITS, files) if f is not None]
    if not given:
        raise ImporterError(f"give at least one of --train, --val, --test ({what})")
    return [(split, require_file(f, f"--{split}")) for split, f in given]


def timed_caption(start, end, text, duration: float | None, report: Report, where: str) -> Caption | None:
    """A timed caption with its end clamped to a known duration; None (counted) when unusable."""
    checked = check_line(start, end, text)
    if checked.__class__ is str:
        report.skipped.add(checked, where)
        return None
    start, end = checked
    if duration is not None and end > duration:
        if start >= duration:
            report.skipped.add(AFTER_END, where)
            return None
        report.notes.add(PAST_END, where)
        end = duration
    return Caption(start, end, text.strip(), "caption")


def _pair(value) -> tuple | None:
    return tuple(value) if isinstance(value, (list, tuple)) and len(value) == 2 else None


# --------------------------------------------------------------------------- ActivityNet Captions


def import_activitynet(report: Report, *, train=None, val=None, test=None) -> Iterator[RawVideo]:
    """One manifest line per video, one timed caption per sentence."""
    for split, path in split_files((train, val, test), "ActivityNet Captions: train.json, val_1.json or val_2.json"):
        data = load_json(path, f"--{split}")
        expect(isinstance(data, dict), path, "expected an object {video id: {\"duration\", \"timestamps\", "
                                             "\"sentences\"}} (ActivityNet Captions' train.json / val_1.json)")
        for vid, v in data.items():
            yield _activitynet_video(vid, v, split, path, report)


def _activitynet_video(vid: str, v, split: str, path: Path, report: Report) -> RawVideo:
    expect(isinstance(v, dict), path, f"video {vid!r}: expected an object, got {type(v).__name__}")
    stamps, sentences = v.get("timestamps"), v.get("sentences")
    for key, col in (("timestamps", stamps), ("sentences", sentences)):
        what = "is missing" if key not in v else f"must be a list, got {type(col).__name__}"
        expect(isinstance(col, list), path, f"video {vid!r}: '{key}' {what}")
    expect(len(stamps) == len(sentences), path, f"video {vid!r}: 'timestamps' and 'sentences' have different "
                                                f"lengths ({len(stamps)}, {len(sentences)})")
    duration = parse_duration(v.get("duration"))
    if duration is None:
        report.notes.add("no positive 'duration': spans are not clamped", vid)
    captions = []
    for k, (ts, text) in enumerate(zip(stamps, sentences)):
        pair = _pair(ts)
        if pair is None:
            report.skipped.add(NO_SPAN, f"{vid}#{k}")
            continue
        c = timed_caption(pair[0], pair[1], text, duration, report, f"{vid}#{k}")
        if c is not None:
            captions.append(c)
    # Downloads name files v_<id>.mp4 or <youtube id>.mp4.
    stems = (vid[2:],) if vid.startswith("v_") and len(vid) > 2 else ()
    return RawVideo(vid, split, captions, duration=duration, stems=stems)


# --------------------------------------------------------------------------- DiDeMo


def didemo_moment(times) -> tuple[tuple[int, int] | None, bool]:
    """The annotators' moment as (first, last) segment index, and whether there was a tie.

    The span most annotators chose; on a tie, the tied span with the largest summed
    temporal IoU with all annotators' spans (the one they agree with most), then the
    earliest. Invalid pairs are ignored; (None, False) when none is valid.
    """
    spans = [p for p in (_pair(t) for t in times) if p is not None and all(type(x) is int for x in p)
             and 0 <= p[0] <= p[1] < DIDEMO_SEGMENTS] if isinstance(times, list) else []
    if not spans:
        return None, False
    counts = Counter(spans)
    top = max(counts.values())
    tied = sorted(s for s, n in counts.items() if n == top)
    if len(tied) == 1:
        return tied[0], False

    def agreement(s):
        return sum(n * _iou(s, o) for o, n in counts.items())

    return max(tied, key=lambda s: (agreement(s), -s[0], -s[1])), True


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = min(a[1], b[1]) - max(a[0], b[0]) + 1
    union = max(a[1], b[1]) - min(a[0], b[0]) + 1
    return max(inter, 0) / union


def import_didemo(report: Report, *, train=None, val=None, test=None) -> Iterator[RawVideo]:
    """Annotations grouped by video; each description is a timed caption over its moment."""
    for split, path in split_files((train, val, test), "DiDeMo: train_data.json, val_data.json or test_data.json"):
        data = load_json(path, f"--{split}")
        expect(isinstance(data, list), path, "expected a list of annotations [{\"video\", \"description\", "
                                             "\"times\"}] (DiDeMo's train_data.json / val_data.json / test_data.json)")
        videos: dict[str, tuple[str, list]] = {}  # id -> (file name, captions), in order of first appearance
        for i, a in enumerate(data):
            expect(isinstance(a, dict) and isinstance(a.get("video"), str) and bool(a["video"].strip()), path,
                   f"[{i}] must be an object with a string 'video', got {a!r:.120}")
            name = a["video"].strip()
            vid = os.path.splitext(name)[0] or name
            captions = videos.setdefault(vid, (name, []))[1]
            where = f"{vid}#{a.get('annotation_id', i)}"
            moment, tie = didemo_moment(a.get("times"))
            if moment is None:
                report.skipped.add(DIDEMO_BAD_TIMES, where)
                continue
            if tie:
                report.notes.add(DIDEMO_TIE, where)
            start, end = moment[0] * DIDEMO_SEGMENT, (moment[1] + 1) * DIDEMO_SEGMENT
            c = timed_caption(start, end, a.get("description"), None, report, where)
            if c is not None:
                captions.append(c)
        for vid, (name, captions) in videos.items():
            # The annotation's file name (often .mov, .m4v...) first, then <id>.mp4/... anywhere under --videos.
            yield RawVideo(vid, split, captions, path=name)


# --------------------------------------------------------------------------- TVR


def _tvr_subtitles(subtitles, report: Report) -> dict[str, list[Caption]]:
    return {rec.video_id: rec.captions for rec in import_tvsub(report, subtitles=subtitles)}


def import_tvr(report: Report, *, train=None, val=None, test=None, subtitles=None) -> Iterator[RawVideo]:
    """TVR queries grouped by clip (timed captions), with the clip's subtitles when given."""
    files = split_files((train, val, test), "TVR: tvr_train_release.jsonl, tvr_val_release.jsonl or "
                                            "tvr_test_public_release.jsonl")
    subs = _tvr_subtitles(subtitles, report) if subtitles is not None else {}
    for split, path in files:
        for vid, (duration, captions) in _tvr_clips(path, report).items():
            yield RawVideo(vid, split, captions + subs.pop(vid, []), duration=duration)
    for vid in subs:
        report.notes.add("subtitled clip without a TVR query in the files given: not written", vid)


def _tvr_clips(path: Path, report: Report) -> dict[str, list]:
    """vid_name -> [duration (the first line's that has one), timed captions], in file order."""
    clips: dict[str, list] = {}
    for lineno, obj in jsonl_objects(path, report):
        where = f"{path}:{lineno}"
        if not (isinstance(obj, dict) and isinstance(obj.get("vid_name"), str) and obj["vid_name"].strip()):
            report.skipped.add("line without a string 'vid_name'", where)
            continue
        vid = obj["vid_name"].strip()
        duration = parse_duration(obj.get("duration"))
        clip = clips.setdefault(vid, [duration, []])
        if clip[0] is None:
            clip[0] = duration
        elif duration is not None and abs(duration - clip[0]) > 0.01:
            report.notes.add("queries of one clip disagree on 'duration': the first is kept", f"{vid} ({where})")
        known, captions = clip
        if "ts" not in obj:
            report.skipped.add("query without 'ts' (no moment: tvr_test_public has none)", f"{vid} ({where})")
            continue
        pair = _pair(obj["ts"])
        if pair is None:
            report.skipped.add(NO_SPAN, f"{vid} ({where})")
            continue
        c = timed_caption(pair[0], pair[1], obj.get("desc"), known, report, f"{vid} ({where})")
        if c is not None:
            captions.append(c)
    return clips
