"""What every importer shares: the error class, the summary, finding video files,
video durations, and turning a format's raw records into manifest entries.

An importer (one function per public format) only parses its input and yields
``RawVideo`` records; ``Assembler`` applies the rules that must be the same for
every format (duplicates, missing files, whole-video caption spans, counting), so a
user reading the summary of one format can trust it means the same for another.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..manifest import SPLITS, Caption, VideoEntry
from ..tar_members import member_path, open_member, split_member
from ...errors import VideolmError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")  # order of preference when one id has several files
EXAMPLES = 5  # ids / lines named per reason in the summary

# Drop reasons shared between formats; a format may add its own (e.g. MSR-VTT's split CSVs).
MISSING = "video file not found under {videos}"
NO_CAPTIONS = "no captions"
DUPLICATE = "duplicate id"


class ImporterError(VideolmError, ValueError):
    """A problem the user can fix (bad input file, wrong flag); the message is one line.

    Not called ImportError: that name is Python's own exception for failed imports.
    """


# --------------------------------------------------------------------------- counting


class Tally:
    """reason -> count and the first few examples, for drops, skipped lines and notes."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        n = self.counts.get(reason, 0)
        self.counts[reason] = n + 1
        if n < EXAMPLES:
            self.examples.setdefault(reason, []).append(example)

    def frozen(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        return {r: (n, tuple(self.examples.get(r, ()))) for r, n in self.counts.items()}


@dataclass
class Report:
    """Handed to an importer so it can count what it drops or skips while parsing."""

    dropped: Tally = field(default_factory=Tally)  # whole videos left out
    skipped: Tally = field(default_factory=Tally)  # caption lines / input lines left out
    notes: Tally = field(default_factory=Tally)  # written, but the user should know


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class ImportSummary:
    """What run_import did; dropped / skipped / notes map a reason to (count, first examples)."""

    fmt: str
    out: Path
    written: int
    captions: int
    per_split: dict[str, int]
    dropped: dict[str, tuple[int, tuple[str, ...]]]
    skipped: dict[str, tuple[int, tuple[str, ...]]]
    notes: dict[str, tuple[int, tuple[str, ...]]]
    seconds: float

    def lines(self) -> list[str]:
        head = f"import {self.fmt}:"
        splits = ", ".join(f"{s} {self.per_split[s]:,}" for s in SPLITS if self.per_split.get(s))
        out = [f"{head} wrote {_plural(self.written, 'video')} with {_plural(self.captions, 'caption')} to {self.out} "
               f"in {self.seconds:.1f} s ({splits})"]
        for title, table in (("dropped", self.dropped), ("skipped", self.skipped), ("note", self.notes)):
            for reason, (n, first) in table.items():
                more = ", ..." if n > len(first) else ""
                out.append(f"{head} {title} {n:,}: {reason} (first: {', '.join(first)}{more})")
        if not self.dropped:
            out.append(f"{head} nothing dropped")
        return out


# --------------------------------------------------------------------------- records


@dataclass
class RawVideo:
    """One video as a format describes it, before files and durations are resolved.

    ``captions`` are final except whole-video captions (``whole_video``), whose ``end``
    is None until the duration is known (from the annotation or the file header).
    Importers build Caption objects directly: HowTo100M has millions of lines, and a
    second object per line would cost seconds.
    ``path`` is a format's explicit location relative to --videos (WebVid's page_dir/id.mp4).
    ``stems`` are other file names (without extension) the video may have, tried after
    its id (ActivityNet's ``v_<youtube id>`` is often downloaded as ``<youtube id>.mp4``).
    """

    video_id: str
    split: str | None
    captions: list[Caption]
    duration: float | None = None
    path: str | None = None
    stems: tuple[str, ...] = ()


def whole_video(text: str, kind: str = "caption") -> Caption:
    """A caption spanning the whole video; the assembler fills in its end."""
    return Caption(0.0, None, text, kind)  # type: ignore[arg-type]  # placeholder, never written


class VideoFinder:
    """Finds video files under one folder: by explicit path, or by id (file stem).

    The folder is scanned once, lazily, into a stem -> path map: with a million ids,
    trying four extensions per id would be four million stat calls.
    """

    def __init__(self, root: Path):
        self.root = os.path.abspath(root)
        self._by_stem: dict[str, str] | None = None

    def _scan(self) -> dict[str, str]:
        rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
        best: dict[str, tuple[int, str]] = {}
        stack, seen_dirs = [self.root], set()
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                if e.is_dir():  # follows symlinks: datasets are often linked in from elsewhere
                    stack.append(e.path)
                    continue
                stem, ext = os.path.splitext(e.name)
                r = rank.get(ext.lower())
                if r is None:
                    continue
                # Preferred extension first, then the smallest path, so the choice does not
                # depend on directory listing order.
                cand = (r, e.path)
                if stem not in best or cand < best[stem]:
                    best[stem] = cand
        return {stem: p for stem, (_, p) in best.items()}

    def by_id(self, video_id: str) -> str | None:
        if self._by_stem is None:
            self._by_stem = self._scan()
        return self._by_stem.get(video_id)

    def by_path(self, rel: str) -> str | None:
        member = split_member(rel)
        if member is not None:  # a tar member (WebDataset): the importer read it from that tar
            tar = os.path.normpath(os.path.join(self.root, member[0]))
            return member_path(tar, member[1]) if os.path.isfile(tar) else None
        p = os.path.join(self.root, rel)  # an absolute `rel` stays absolute
        return os.path.normpath(p) if os.path.isfile(p) else None

    def expected(self, video_id: str, rel: str | None) -> str:
        if rel is None:  # the common case, a million times for HowTo100M: no normpath needed
            return f"{self.root}{os.sep}{video_id}.mp4"
        return os.path.normpath(os.path.join(self.root, rel))


_ISO = re.compile(r"P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
                  r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?", re.IGNORECASE)


def parse_duration(value) -> float | None:
    """Seconds from a number, a numeric string or an ISO-8601 duration ("PT00H00M11S");
    None when it is not one or not positive (the manifest only accepts durations > 0)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        m = _ISO.fullmatch(text)
        if m and text.upper() not in ("P", "PT"):
            seconds = (float(m["d"] or 0) * 86400 + float(m["h"] or 0) * 3600 + float(m["m"] or 0) * 60
                       + float(m["s"] or 0))
        else:
            try:
                seconds = float(text)
            except ValueError:
                return None
    else:
        return None
    # Rounded to microseconds: "end time - start time" gives 11.719999999999999 for 149.44 - 137.72.
    return round(seconds, 6) if math.isfinite(seconds) and seconds > 0 else None


def probe_duration(path: str) -> float | None:
    """Duration from the file header (no decoding); None for unreadable files."""
    import av

    try:
        source = open_member(path) if split_member(path) else path  # a tar member is read in place
        with av.open(source) as c:
            if c.duration:
                return parse_duration(c.duration / 1e6)
            for s in c.streams.video:
                if s.duration and s.time_base:
                    return parse_duration(float(s.duration * s.time_base))
    except Exception:  # probing is best-effort: any unreadable file just has no known duration
        return None
    return None


_NUMBER_TYPES = (int, float)  # exact types: bool is an int subclass, and `true` is not a time
_INF = float("inf")
BAD_TIME = "caption line with a non-numeric time"
BAD_RANGE = "caption line with a negative or infinite time, or end < start"
EMPTY_TEXT = "caption line with empty text"


def check_line(start, end, text) -> tuple[float, float] | str:
    """(start, end) as floats for a usable timed caption line, else the reason to skip it.

    Exact type() checks: numpy scalars are converted by the caller (tolist()), and a
    JSON `true` is not a time. The HowTo100M importer inlines the all-good case.
    """
    if type(start) not in _NUMBER_TYPES or type(end) not in _NUMBER_TYPES:
        return BAD_TIME
    if not 0 <= start <= end < _INF:  # also false for NaN
        return BAD_RANGE
    if type(text) is not str or not text or text.isspace():
        return EMPTY_TEXT
    return float(start), float(end)


def number_or_text(value):
    """A CSV cell as a number when it parses as one (times in CSV files are text)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------- input files


def require_file(path, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImporterError(f"{flag} {path}: no such file")
    return path


def load_json(path, flag: str):
    """A whole (small) annotation file; errors name the file, line and column."""
    path = require_file(path, flag)
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ImporterError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} at column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise ImporterError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def jsonl_objects(path: Path, report: Report) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) of each non-blank line of a JSONL file; a line that is
    not JSON is reported (``file:line``) and skipped, a line that is not UTF-8 stops."""
    with open(path, "rb") as f:  # lines decoded one by one, so an error names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ImporterError(f"{path}:{lineno}: not UTF-8 text (invalid byte at column {exc.start + 1})") \
                    from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark written by some editors
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skipped.add("malformed JSON line", f"{path}:{lineno} ({exc.msg} at column {exc.colno})")
                continue
            yield lineno, obj


def expect(ok: bool, path, problem: str) -> None:
    if not ok:
        raise ImporterError(f"{path}: {problem}")


def csv_rows(path, flag: str, required: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """Stream (line number, row dict) from a CSV file with a header; a missing column
    raises an error that lists the columns the file has."""
    path = require_file(path, flag)
    # Some caption fields exceed the csv module's 128 KiB default field limit.
    csv.field_size_limit(1 << 30)
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise ImporterError(f"{path}: no column {', '.join(repr(c) for c in missing)}; the file's columns "
                                    f"are {', '.join(repr(c) for c in header) if header else '(none: empty file)'}")
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            raise ImporterError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ImporterError(f"{path}: not UTF-8 text near line {reader.line_num + 1}: {exc.reason}") from None


# --------------------------------------------------------------------------- assembling


class Assembler:
    """Turns RawVideo records into VideoEntry objects, counting what it drops."""

    def __init__(self, finder: VideoFinder, report: Report, keep_missing: bool, default_split: str,
                 progress: bool = False):
        self.finder, self.report = finder, report
        self.keep_missing, self.default_split = keep_missing, default_split
        self.progress = progress
        self.seen: set[str] = set()
        self.written = self.captions = self.missing_checked = 0
        self.explicit_paths = False  # some record named its own file (WebVid page_dir, CSV --path-col)
        self.per_split = {s: 0 for s in SPLITS}
        self.missing_reason = MISSING.format(videos=finder.root)

    def __call__(self, records: Iterable[RawVideo]) -> Iterator[VideoEntry]:
        last = time.monotonic()
        for n, rec in enumerate(records, start=1):
            entry = self._one(rec)
            if entry is not None:
                yield entry
            if self.progress and n % 20000 == 0 and time.monotonic() - last > 5:
                last = time.monotonic()
                print(f"import: {n:,} videos read, {self.written:,} written", file=sys.stderr, flush=True)

    def _one(self, rec: RawVideo) -> VideoEntry | None:
        vid, dropped = rec.video_id, self.report.dropped
        if vid in self.seen:
            dropped.add(DUPLICATE, vid)
            return None
        self.seen.add(vid)
        if not rec.captions:
            dropped.add(NO_CAPTIONS, vid)
            return None
        path = None
        if rec.path:
            self.explicit_paths = True
            path = self.finder.by_path(rec.path)
        if path is None:
            path = self.finder.by_id(vid)
        for stem in rec.stems:
            path = path or self.finder.by_id(stem)
        if path is None:
            self.missing_checked += 1
            if not self.keep_missing:
                dropped.add(self.missing_reason, vid)
                return None
            path = self.finder.expected(vid, rec.path)
            exists = False
        else:
            exists = True
        duration, captions = rec.duration, rec.captions
        if any(c.end is None for c in captions):
            if duration is None and exists:
                duration = probe_duration(path)
            if duration is None:
                self.report.notes.add("duration unknown (video file missing or unreadable): whole-video "
                                      "captions end at 0.0", vid)
            end = duration or 0.0
            captions = [Caption(0.0, end, c.text, c.kind) if c.end is None else c for c in captions]
        split = rec.split or self.default_split
        self.written += 1
        self.captions += len(captions)
        self.per_split[split] += 1
        return VideoEntry(video_id=vid, path=path, split=split, duration=duration, captions=tuple(captions))

    def nothing_written_message(self, source: str) -> str:
        counts = self.report.dropped.counts
        others = [f"{n:,} {r}" for r, n in counts.items() if r != self.missing_reason]
        if not self.seen:
            skipped = [f"skipped {n:,} {r}" for r, n in self.report.skipped.counts.items()]
            why = others + skipped
            return f"{source} holds no usable videos" + (f" ({'; '.join(why)})" if why else "")
        if counts.get(self.missing_reason):
            also = f"; also dropped: {'; '.join(others)}" if others else ""
            return (f"none of the {self.missing_checked:,} videos were found under {self.finder.root} (looked for "
                    f"<id>{'/'.join(VIDEO_EXTENSIONS)}{', and the paths the input names' if self.explicit_paths else ''}); "
                    f"use --keep-missing to write them anyway{also}")
        return f"no videos written from {source}: dropped {'; '.join(others)}"
