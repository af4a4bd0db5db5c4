#!/usr/bin/env python
"""Resident memory of ``videolm extract`` over a long job of short videos.

Prints ONE JSON object on stdout (progress goes to stderr). Per backend (``av``,
``decord``) it runs ``run_extract`` (the ``videolm extract`` job, ``pixels``
encoder, default 2 decoder workers) over a manifest of ``--videos`` short videos,
in a fresh child process so one backend's run does not colour the other's parent.

Inputs: ``--distinct`` (default 10) synthetic videos rendered once with
``make_spec``/``render_video`` and cut to ``--seconds`` (default 1.5 s) at their
native 160-192 px size; the manifest points ``--videos`` ids at *hard links* of
those files (one link per id, so every id has its own path, while the disk holds
only the distinct files). Rendering is cached under ``bench_out/memory_inputs``.

What is sampled: VmRSS (``/proc/<pid>/status``) of the job's process (``parent``)
and of every descendant process (``workers``: the decoder processes, and any
helper multiprocessing starts), summed as ``total``:

* synchronously each time a video is written (the job's ``_Progress.update``
  hook, wrapped in this benchmark, no library change), keyed by videos done;
* and every 0.5 s from a thread, for the peak.

``rss_at[k]`` is the median of the per-video samples for videos ``k-9 .. k``
(a 10-video window smooths the encoder-batch sawtooth). ``growth_pct`` compares
video ``--from`` (default 100) with the last video; the requirement is < 10 %
for ``total`` (``parent`` and ``workers`` are reported beside it, and judged too).

This module's top level imports only the standard library on purpose: decoder
workers are started with ``spawn``, which re-imports the main module in every worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench_out" / "memory_inputs"
LIMIT_PCT = 10.0
GEN_VERSION = 1  # bump when the rendered inputs change


# --------------------------------------------------------------------------- leak injection (harness self-test)
# BENCH_MEMORY_LEAK_KB=N makes every decoder worker keep N KiB per decoded video
# (touched, so resident), like a decoder library that leaks per reader. It shows
# that the measurement sees a worker-side leak. Spawned workers import this file
# as ``__mp_main__``, which is where the patch is applied; the job never sees it.
_LEAKED: list = []


def _inject_leak(kib: int) -> None:
    from videolm.extract import workers

    real = workers.iter_clips

    def leaky(*a, **kw):
        _LEAKED.append(bytearray(b"x" * (kib * 1024)))
        return real(*a, **kw)

    workers.iter_clips = leaky


if __name__ == "__mp_main__" and os.environ.get("BENCH_MEMORY_LEAK_KB"):
    _inject_leak(int(os.environ["BENCH_MEMORY_LEAK_KB"]))


def log(msg: str) -> None:
    print(f"[bench_memory] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- RSS of a process tree

def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MiB; 0 when the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    todo, seen = children(pid), []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def tree_rss(pid: int) -> tuple[float, float, int]:
    """(parent MiB, sum over descendants MiB, number of descendants)."""
    kids = descendants(pid)
    return rss_mb(pid), sum(rss_mb(k) for k in kids), len(kids)


# --------------------------------------------------------------------------- inputs

def make_inputs(n_videos: int, distinct: int, seconds: float, work: Path) -> Path:
    """A manifest of ``n_videos`` ids, each a hard link to one of ``distinct`` short videos."""
    import dataclasses

    from videolm.manifests.manifest import VideoEntry, write_manifest
    from videolm.manifests.synthetic import make_spec, render_video

    src = CACHE / f"v{GEN_VERSION}_{seconds:g}s"
    src.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(distinct):
        p = src / f"short_{i:03d}.mp4"
        if not p.exists():
            spec = make_spec(0, i)
            fps = spec.fps
            render_video(dataclasses.replace(spec, duration=round(seconds * fps) / fps), p)
        files.append(p)
    links = work / "videos"
    links.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(n_videos):
        target = links / f"mem-{k:05d}.mp4"
        try:
            os.link(files[k % distinct], target)
        except OSError:  # another file system: a copy does as well (the files are ~20 kB)
            import shutil

            shutil.copyfile(files[k % distinct], target)
        entries.append(VideoEntry(f"mem-{k:05d}", str(target), "train", None, ()))
    return write_manifest(entries, work / "manifest.jsonl")


# --------------------------------------------------------------------------- one backend, in a child

def child_run(args) -> dict:
    """Run the job in this process and return its samples (called in a fresh child)."""
    from videolm.extract.config import ExtractConfig
    from videolm.extract import job

    me = os.getpid()
    per_video: list[tuple[int, float, float, int]] = []  # (videos done, parent, workers, n workers)
    timed: list[tuple[float, int, float, float, int]] = []
    state = {"done": 0, "stop": False}

    class _Recording(job._Progress):
        def update(self, clips, failed):
            super().update(clips, failed)
            state["done"] = self.videos
            p, w, n = tree_rss(me)
            per_video.append((self.videos, p, w, n))

    job._Progress = _Recording  # the job looks the class up when it starts

    def sampler():
        t0 = time.monotonic()
        while not state["stop"]:
            p, w, n = tree_rss(me)
            timed.append((round(time.monotonic() - t0, 2), state["done"], p, w, n))
            time.sleep(0.5)

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        manifest = make_inputs(args.videos, args.distinct, args.seconds, work)
        prep_s = time.perf_counter() - t0
        cfg = ExtractConfig(encoder="pixels", backend=args.child, workers=args.workers, shard_size=args.shard_size)
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        summary = job.run_extract(manifest, work / "out", cfg, progress=True)
        wall = time.perf_counter() - t0
        state["stop"] = True
        thread.join()
    return {
        "backend": args.child,
        "videos_ok": summary.videos_ok,
        "videos_failed": summary.videos_failed,
        "clips": summary.clips,
        "wall_s": round(wall, 2),
        "inputs_s": round(prep_s, 2),
        "per_video": per_video,
        "timed": timed,
    }


def window(per_video, k: int, col: int, width: int = 10) -> float:
    vals = [row[col] for row in per_video if k - width < row[0] <= k]
    return statistics.median(vals) if vals else float("nan")


def analyse(raw: dict, start: int) -> dict:
    pv = raw["per_video"]
    last = pv[-1][0] if pv else 0
    pv_total = [(d, p, w, n, p + w) for d, p, w, n in pv]
    at = {}
    for k in sorted({start, last}):
        at[str(k)] = {name: round(window(pv_total, k, col), 1) for name, col in
                      (("parent", 1), ("workers", 2), ("total", 4))}
    a, b = at[str(start)], at[str(last)]
    growth = {name: round(100.0 * (b[name] - a[name]) / a[name], 2) if a[name] else None
              for name in ("parent", "workers", "total")}
    timed = raw["timed"]
    peak = max(timed, key=lambda r: r[2] + r[3]) if timed else None
    # A coarse curve for the report: every 10 % of the run.
    curve = []
    for k in sorted({max(1, round(last * f / 10)) for f in range(1, 11)}):
        curve.append({"videos": k, "parent_mb": round(window(pv_total, k, 1), 1),
                      "workers_mb": round(window(pv_total, k, 2), 1), "total_mb": round(window(pv_total, k, 4), 1)})
    return {
        "backend": raw["backend"],
        "videos_ok": raw["videos_ok"],
        "videos_failed": raw["videos_failed"],
        "clips": raw["clips"],
        "wall_s": raw["wall_s"],
        "decoder_processes": max((r[3] for r in pv), default=0),
        "rss_mb_at": at,
        "growth_pct": growth,
        "from_video": start,
        "to_video": last,
        "peak_total_mb": round(peak[2] + peak[3], 1) if peak else None,
        "peak_at_videos": peak[1] if peak else None,
        "curve": curve,
        "limit_pct": LIMIT_PCT,
        "pass": bool(raw["videos_ok"] == last and all(g is not None and g < LIMIT_PCT for g in growth.values())),
    }


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import av
        import decord

        info["pyav"], info["decord"] = av.__version__, decord.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="200 videos, growth from video 100")
    ap.add_argument("--backends", default="av,decord")
    ap.add_argument("--from", dest="start", type=int, default=100, help="growth is measured from this video")
    ap.add_argument("--distinct", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.videos = 200
    if args.child:
        print(json.dumps(child_run(args)))
        return
    if args.videos <= args.start:
        ap.error(f"--videos must exceed --from ({args.start})")
    results, t0 = {}, time.perf_counter()
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        log(f"{backend}: {args.videos} videos")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--videos", str(args.videos),
               "--distinct", str(args.distinct), "--seconds", str(args.seconds), "--workers", str(args.workers),
               "--shard-size", str(args.shard_size)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True)
        results[backend] = analyse(json.loads(proc.stdout), args.start)
        r = results[backend]
        log(f"{backend}: total {r['rss_mb_at'][str(args.start)]['total']} -> "
            f"{r['rss_mb_at'][str(r['to_video'])]['total']} MiB ({r['growth_pct']['total']:+.2f} %), "
            f"{r['wall_s']} s, {'pass' if r['pass'] else 'FAIL'}")
    print(json.dumps({
        "benchmark": "bench_memory",
        "videos": args.videos,
        "distinct_files": args.distinct,
        "seconds_per_video": args.seconds,
        "workers": args.workers,
        "shard_size": args.shard_size,
        "injected_leak_kib_per_video": int(os.environ.get("BENCH_MEMORY_LEAK_KB") or 0),
        "results": results,
        "pass": all(r["pass"] for r in results.values()),
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }, indent=1))


if __name__ == "__main__":
    main()
