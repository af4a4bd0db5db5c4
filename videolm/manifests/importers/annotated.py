"""MSR-VTT and YouCook2: datasets whose annotations come as one JSON file.

These files are small (MSR-VTT: 10k videos and 200k sentences; YouCook2: 2k videos),
so they are loaded whole; the output is still streamed to the manifest.

Field names follow the public releases:

* MSR-VTT ``MSRVTT_data.json``: ``{"videos": [{"video_id", "start time", "end time",
  "split": "train"|"validate"|"test", ...}], "sentences": [{"video_id", "caption",
  "sen_id"}]}``; the 1k-A split CSVs ``MSRVTT_train.9k.csv`` (column ``video_id``)
  and ``MSRVTT_JSFUSION_test.csv`` (``key, vid_key, video_id, sentence``).
* YouCook2 ``youcookii_annotations_trainval.json``: ``{"database": {id: {"subset":
  "training"|"validation", "duration", "annotations": [{"id", "segment": [start, end],
  "sentence"}]}}}``.
"""

from __future__ import annotations

import re

from typing import Iterator

from ..manifest import Caption
from .common import (RawVideo, Report, check_line, csv_rows, expect, load_json, parse_duration, require_file,
                     whole_video)

MSRVTT_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
YOUCOOK2_SPLITS = {"training": "train", "validation": "val", "testing": "test"}
NOT_IN_SPLIT_CSV = "not in any split CSV"
NOT_ANNOTATED = "in a split CSV but not in the annotations"


def _norm(text: str) -> str:
    # JSFusion's sentence and MSR-VTT's caption of it may differ in case, spacing and
    # punctuation ("A car drives." vs "a car drives"): compare words only.
    return " ".join(re.findall(r"\w+", text.lower()))


def _msrvtt_split_csvs(train_csv, test_csv, report: Report) -> tuple[dict[str, str], dict[str, str]] | None:
    """video_id -> split from the 1k-A CSVs, and test video_id -> its JSFusion query sentence."""
    if train_csv is None and test_csv is None:
        return None
    split_of: dict[str, str] = {}
    queries: dict[str, str] = {}
    if train_csv is not None:
        for _, row in csv_rows(train_csv, "--train-csv", ["video_id"]):
            split_of[row["video_id"].strip()] = "train"
    if test_csv is not None:
        for line, row in csv_rows(test_csv, "--test-csv", ["video_id", "sentence"]):
            vid = row["video_id"].strip()
            if split_of.get(vid) == "train":
                # Evaluation must not see training videos; the test CSV wins, and the user is told.
                report.notes.add("in both split CSVs: written as test", vid)
            split_of[vid] = "test"
            sentence = (row["sentence"] or "").strip()
            if sentence and vid not in queries:
                queries[vid] = sentence
    return split_of, queries


def import_msrvtt(report: Report, *, annotations, train_csv=None, test_csv=None) -> Iterator[RawVideo]:
    """One manifest line per MSR-VTT video; its sentences are whole-video captions."""
    path = require_file(annotations, "--annotations")
    csvs = _msrvtt_split_csvs(train_csv, test_csv, report)
    data = load_json(path, "--annotations")
    expect(isinstance(data, dict) and isinstance(data.get("videos"), list) and isinstance(data.get("sentences"), list),
           path, "expected an object with lists 'videos' and 'sentences' (MSR-VTT's MSRVTT_data.json)")
    # Sentences grouped by video, in sen_id order (the file lists them in that order, but
    # nothing guarantees it).
    sentences: dict[str, list[tuple]] = {}
    for i, s in enumerate(data["sentences"]):
        expect(isinstance(s, dict) and isinstance(s.get("video_id"), str) and isinstance(s.get("caption"), str),
               path, f"sentences[{i}] must be an object with string 'video_id' and 'caption', got {s!r:.120}")
        sen_id = s.get("sen_id", i)
        sentences.setdefault(s["video_id"], []).append((sen_id if isinstance(sen_id, (int, float)) else i, i,
                                                         s["caption"]))
    annotated = set()
    for i, v in enumerate(data["videos"]):
        expect(isinstance(v, dict) and isinstance(v.get("video_id"), str), path,
               f"videos[{i}] must be an object with a string 'video_id', got {v!r:.120}")
        vid = v["video_id"]
        annotated.add(vid)
        if csvs is None:
            split = MSRVTT_SPLITS.get(v.get("split"))
            expect(split is not None, path, f"videos[{i}] ({vid}): 'split' {v.get('split')!r} is not one of "
                                            f"train, validate, test")
            query = None
        else:
            split = csvs[0].get(vid)
            if split is None:
                report.dropped.add(NOT_IN_SPLIT_CSV, vid)
                continue
            query = csvs[1].get(vid)
        duration = None
        start, end = v.get("start time"), v.get("end time")
        if isinstance(start, (int, float)) and isinstance(end, (int, float)):
            duration = parse_duration(end - start)
        texts = [t for _, _, t in sorted(sentences.get(vid, ()))]
        captions = [whole_video(t) for t in texts if t.strip()]
        if query is not None:
            # Mark the matching sentence as the query rather than adding a duplicate caption.
            match = next((k for k, c in enumerate(captions) if _norm(c.text) == _norm(query)), None)
            if match is None:
                captions.append(whole_video(query, "query"))
            else:
                captions[match] = whole_video(captions[match].text, "query")
        yield RawVideo(vid, split, captions, duration=duration)
    if csvs is not None:
        for vid in csvs[0]:
            if vid not in annotated:
                report.dropped.add(NOT_ANNOTATED, vid)


def import_youcook2(report: Report, *, annotations) -> Iterator[RawVideo]:
    """Timed captions from YouCook2's segments; one manifest line per video."""
    data = load_json(annotations, "--annotations")
    path = annotations
    expect(isinstance(data, dict) and isinstance(data.get("database"), dict), path,
           "expected an object with a 'database' object (YouCook2's youcookii_annotations_*.json)")
    for vid, v in data["database"].items():
        expect(isinstance(v, dict), path, f"database[{vid!r}] must be an object, got {type(v).__name__}")
        split = YOUCOOK2_SPLITS.get(v.get("subset"))
        expect(split is not None, path, f"database[{vid!r}]: 'subset' {v.get('subset')!r} is not one of "
                                        f"{', '.join(YOUCOOK2_SPLITS)}")
        anns = v.get("annotations", [])
        expect(isinstance(anns, list), path, f"database[{vid!r}]: 'annotations' must be a list")
        captions = []
        for k, a in enumerate(anns):
            seg = a.get("segment") if isinstance(a, dict) else None
            if not (isinstance(seg, (list, tuple)) and len(seg) == 2):
                report.skipped.add("caption line without a [start, end] segment", f"{vid}#{k}")
                continue
            checked = check_line(seg[0], seg[1], a.get("sentence"))
            if isinstance(checked, str):
                report.skipped.add(checked, f"{vid}#{k}")
                continue
            captions.append(Caption(checked[0], checked[1], a["sentence"], "caption"))
        yield RawVideo(vid, split, captions, duration=parse_duration(v.get("duration")))

