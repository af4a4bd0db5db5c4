#!/usr/bin/env python
"""Extraction from WebDataset tar members against the same videos as plain files.

Prints ONE JSON object on stdout (progress goes to stderr). In one run, on the same
videos: ``videolm synth`` writes them as files, a tar holds the same bytes as members
(with a ``.txt`` and a ``.json`` beside each, as video2dataset writes them), and
``run_extract`` with the ``pixels`` encoder reads them once through a manifest of
member paths (``x.tar#member``) and once through a manifest of files, ``--repeats``
times interleaved (so a noisy neighbour hits both alike) after one untimed run of each,
fresh output each run.
``ratio_tar_over_file`` is the median tar time over the median file time,
``ratio_median_of_pairs`` the median of each repeat's tar / file ratio; the
features are checked to be identical. Also timed: building one tar's member index
(the one pass over its headers a decoder worker makes per tar) and the import.

This module's top level imports only the standard library on purpose: decoder
workers are started with ``spawn``, which re-imports the main module in every worker.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench_tar] {msg}", file=sys.stderr, flush=True)


def make_inputs(work: Path, n_videos: int) -> tuple[Path, Path]:
    """Synthetic videos as files (their manifest) and as one tar of the same bytes."""
    from videolm.manifests.synthetic import synthesize

    manifest = synthesize(work / "synth", n_videos, seed=0, progress=False)
    from videolm.manifests.manifest import load_manifest

    tar = work / "shards" / "00000.tar"
    tar.parent.mkdir(parents=True)
    with tarfile.open(tar, "w") as tf:
        for k, e in enumerate(load_manifest(manifest)):
            key = f"{k:09d}"
            for ext, data in (("mp4", Path(e.path).read_bytes()), ("txt", e.captions[0].text.encode()),
                              ("json", json.dumps({"key": key, "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return manifest, tar


def same_ids_as_files(tar_manifest: Path, file_manifest: Path, out: Path) -> Path:
    """The file manifest under the tar import's ids, in the same order, so both shards line up."""
    from videolm.manifests.manifest import VideoEntry, load_manifest, write_manifest

    files = load_manifest(file_manifest)
    entries = [VideoEntry(t.video_id, f.path, t.split, t.duration, t.captions)
               for t, f in zip(load_manifest(tar_manifest), files)]
    return write_manifest(entries, out)


def time_extract(manifest: Path, out: Path, workers: int) -> float:
    from videolm.extract.config import ExtractConfig
    from videolm.extract.job import run_extract

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s = run_extract(manifest, out, ExtractConfig(encoder="pixels", workers=workers), progress=False)
    seconds = time.perf_counter() - t0
    assert s.videos_failed == 0, s.line()
    return seconds


def identical(a: Path, b: Path) -> bool:
    import numpy as np

    from videolm.features.shards import FeatureStore

    sa, sb = FeatureStore(a), FeatureStore(b)
    if sa.video_ids != sb.video_ids:
        return False
    for v in sa.video_ids:
        x, y = sa.get(v), sb.get(v)
        if not (np.array_equal(x.features, y.features) and np.array_equal(x.starts, y.starts)
                and x.duration == y.duration):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=40, help="synthetic videos (default 40)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per source (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="decoder processes (default 2)")
    args = ap.parse_args()
    from videolm.manifests.importers import run_import
    from videolm.manifests.tar_members import build_index

    with tempfile.TemporaryDirectory(prefix="bench_tar_") as tmp:
        work = Path(tmp)
        log(f"writing {args.videos} videos and their tar")
        file_manifest, tar = make_inputs(work, args.videos)
        t0 = time.perf_counter()
        run_import("webdataset", work / "tar.jsonl", shards=[str(tar)])
        import_s = time.perf_counter() - t0
        file_manifest = same_ids_as_files(work / "tar.jsonl", file_manifest, work / "file.jsonl")
        t0 = time.perf_counter()
        members = len(build_index(str(tar)).members)
        index_s = time.perf_counter() - t0
        for source, manifest in (("tar", work / "tar.jsonl"), ("file", file_manifest)):
            time_extract(manifest, work / f"out_{source}", args.workers)  # untimed: page cache, first imports
        runs = {"tar": [], "file": []}
        for r in range(args.repeats):
            for source, manifest in (("tar", work / "tar.jsonl"), ("file", file_manifest)):
                runs[source].append(time_extract(manifest, work / f"out_{source}", args.workers))
                log(f"repeat {r + 1}: {source} {runs[source][-1]:.2f} s")
        med = {k: statistics.median(v) for k, v in runs.items()}
        result = {
            "videos": args.videos, "workers": args.workers, "encoder": "pixels", "cpus": os.cpu_count(),
            "tar_bytes": tar.stat().st_size, "tar_members": members,
            "extract_s": {"tar": round(med["tar"], 3), "file": round(med["file"], 3)},
            "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "ratio_tar_over_file": round(med["tar"] / med["file"], 3),
            # each repeat's tar run next to its file run: steadier than the medians under a noisy neighbour
            "ratio_median_of_pairs": round(statistics.median(t / f for t, f in zip(runs["tar"], runs["file"])), 3),
            "index_build_ms": round(index_s * 1000, 2), "import_s": round(import_s, 3),
            "identical_features": identical(work / "out_tar", work / "out_file"),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
