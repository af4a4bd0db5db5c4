"""Importers: public video-text dataset annotations -> a videolm manifest.

``run_import("howto100m", out, videos, captions="caption.json")`` reads a dataset's
own annotation files, finds each video's file under ``videos``, and writes a
manifest (see data_manifests/README.md, "Importing public datasets"). The
command line is ``videolm import <format> ...``.

Each entry of ``IMPORTERS`` is a generator function ``f(report, **options)``
yielding ``RawVideo`` records; its keyword options are the format's flags, and its
first option is the format's main input file (named in error messages).
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Iterator

from ..manifest import SPLITS, VideoEntry, write_manifest
from .annotated import import_msrvtt, import_youcook2
from .common import Assembler, ImporterError, ImportSummary, RawVideo, Report, VideoFinder
from .csv_formats import import_csv, import_webvid
from .moments import import_activitynet, import_didemo, import_tvr
from .streamed import import_howto100m, import_tvsub
from .webdataset import import_webdataset

IMPORTERS = {
    "msrvtt": import_msrvtt,
    "youcook2": import_youcook2,
    "howto100m": import_howto100m,
    "webvid": import_webvid,
    "tvsub": import_tvsub,
    "activitynet": import_activitynet,
    "didemo": import_didemo,
    "tvr": import_tvr,
    "csv": import_csv,
    "webdataset": import_webdataset,
}
SELF_LOCATING = {"webdataset"}  # formats whose records carry their own video paths: no --videos

__all__ = ["IMPORTERS", "ImporterError", "ImportSummary", "RawVideo", "run_import"]


def _options(fmt: str, importer, given: dict) -> str:
    """Check the format's options by the importer's signature (a wrong flag name is a
    user error, not a TypeError traceback); returns the main input's option name: the
    first one given (formats with one file per split need only one of them)."""
    params = [p for name, p in inspect.signature(importer).parameters.items() if name != "report"]
    names = [p.name for p in params]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ImporterError(f"format {fmt!r} has no option(s) {', '.join(unknown)}; its options are {', '.join(names)}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and given.get(p.name) is None]
    if missing:
        raise ImporterError(f"format {fmt!r} needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return next((n for n in names if n in given), names[0])


def _stop_if_empty(entries: Iterator[VideoEntry], assembler: Assembler, source: str):
    yield from entries
    # Raised before write_manifest renames its temporary file: no empty manifest is left behind.
    if assembler.written == 0:
        raise ImporterError(assembler.nothing_written_message(source))


def run_import(fmt: str, out, videos=None, keep_missing: bool = False, default_split: str = "train",
               progress: bool = False, **format_options) -> ImportSummary:
    """Import one dataset's annotations into the manifest `out`; see the module docstring."""
    importer = IMPORTERS.get(fmt)
    if importer is None:
        raise ImporterError(f"unknown format {fmt!r}; known: {', '.join(IMPORTERS)}")
    if default_split not in SPLITS:
        raise ImporterError(f"--split {default_split!r} is not one of {', '.join(SPLITS)}")
    format_options = {k: v for k, v in format_options.items() if v is not None}
    main_input = _options(fmt, importer, format_options)
    if videos is None and fmt not in SELF_LOCATING:
        raise ImporterError(f"format {fmt!r} needs --videos (the folder holding the video files)")
    # Formats that name their own files resolve relative paths against the working directory.
    videos, out = Path(videos if videos is not None else os.getcwd()), Path(out)
    if not keep_missing and not videos.is_dir():
        raise ImporterError(f"--videos {videos}: no such folder (with --keep-missing the manifest is written "
                            f"with the expected paths anyway)")
    t0 = time.perf_counter()
    report = Report()
    assembler = Assembler(VideoFinder(videos), report, keep_missing, default_split, progress=progress)
    entries = assembler(importer(report, **format_options))
    source = format_options.get(main_input, fmt)
    source = ", ".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source)
    try:
        write_manifest(_stop_if_empty(entries, assembler, source), out)
    except BaseException:
        # write_manifest writes <out>.tmp and renames it only on success; do not leave it behind.
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            os.remove(tmp)
        raise
    return ImportSummary(fmt=fmt, out=out, written=assembler.written, captions=assembler.captions,
                         per_split=dict(assembler.per_split), dropped=report.dropped.frozen(),
                         skipped=report.skipped.frozen(), notes=report.notes.frozen(),
                         seconds=time.perf_counter() - t0)
