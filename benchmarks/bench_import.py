#!/usr/bin/env python
"""Streaming import of a HowTo100M-sized caption.json (videolm/importers).

Prints ONE JSON object on stdout (progress goes to stderr).

* Input: a generated HowTo100M-style ``caption.json`` ({video_id: {"start": [...],
  "end": [...], "text": [...]}}) with ``--videos`` videos (default 1,000,000), 3-12
  ASR lines each, 20-160 characters of lower-case words per line, about 1% of lines
  with quotes, braces, backslashes or non-ASCII text. Written streaming into a
  temporary directory (``--tmp``), about 1 GB at 1M videos, deleted at the end.
* ``import``: ``run_import("howto100m", ..., keep_missing=True)`` (what ``videolm
  import howto100m --keep-missing`` calls), no video files, in a fresh subprocess.
* ``json_load`` (baseline): ``json.load`` of the same file in a fresh subprocess: the
  standard way to read it, and what a non-streaming importer would hold in memory.
* ``stream_parse``: only the importer's incremental parser
  (``videolm.manifests.importers.json_stream.iter_object``) over the same file, nothing built or
  written: the parsing share of ``import``, comparable with ``json_load``.

Memory: each child writes "5" to /proc/self/clear_refs once its modules are imported,
which resets VmHWM to the current RSS, and reads VmHWM from /proc/self/status at the
end, so ``peak_rss_bytes`` is the child's own peak (interpreter included). A child's
``ru_maxrss`` is not used: on Linux it starts from the parent's peak.
Targets (1M videos): import under 60 s wall and under 4 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 60.0
TARGET_BYTES = 4 * 1024**3
QUICK_VIDEOS = 20_000
LINE_POOL = 200_000  # distinct caption lines the generator draws from


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- input


def _line_pool(rng: random.Random) -> list[str]:
    syllables = ["ka", "lo", "mi", "re", "tu", "sa", "ne", "po", "di", "ga", "fe", "ro", "bu", "te", "chi", "an"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    vocab += ["the", "and", "you", "so", "we", "it", "to", "a", "is", "just", "going", "now"] * 40
    odd = ['he said "stir it"', "{left} brace", "back\\slash", "crème brûlée", "日本語", "😀", "tab\there"]
    pool = []
    for _ in range(LINE_POOL):
        target = rng.randint(20, 160)
        words, n = [], 0
        while n < target:
            w = rng.choice(vocab)
            words.append(w)
            n += len(w) + 1
        if rng.random() < 0.01:
            words.insert(rng.randrange(len(words)), rng.choice(odd))
        pool.append(" ".join(words))
    return pool


def generate(path: Path, n_videos: int, seed: int = 0) -> dict:
    """Write caption.json streaming; returns what was written (for checking the import)."""
    rng = random.Random(seed)
    pool = _line_pool(rng)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    lines = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("{")
        for i in range(n_videos):
            # 11 characters like a YouTube id: 5 random, then the index in base 64 (unique).
            vid = "".join(rng.choices(alphabet, k=5)) + "".join(alphabet[(i >> (6 * j)) & 63] for j in range(6))
            k = rng.randint(3, 12)
            t, starts, ends = rng.uniform(0, 20), [], []
            for _ in range(k):
                starts.append(round(t, 2))
                t += rng.uniform(1.5, 8.0)
                ends.append(round(t, 2))
            texts = [pool[rng.randrange(LINE_POOL)] for _ in range(k)]
            f.write(("" if i == 0 else ", ") + json.dumps(vid) + ": "
                    + json.dumps({"start": starts, "end": ends, "text": texts}, ensure_ascii=False))
            lines += k
            if i and i % 200_000 == 0:
                log(f"  generated {i:,} videos")
        f.write("}\n")
    return {"videos": n_videos, "caption_lines": lines, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------- children


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(mode: str, src: str, work: str) -> dict:
    if mode == "import":
        from videolm.manifests.importers import run_import
    elif mode == "stream_parse":
        from videolm.manifests.importers.json_stream import iter_object
    reset = _reset_peak()
    rss0 = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    if mode == "import":
        out = Path(work) / "manifest.jsonl"
        s = run_import("howto100m", out, Path(work) / "videos", keep_missing=True, captions=src)
        res = {"written": s.written, "captions": s.captions, "manifest_bytes": out.stat().st_size,
               "dropped": sum(n for n, _ in s.dropped.values()), "skipped_lines": sum(n for n, _ in s.skipped.values())}
    elif mode == "stream_parse":
        with open(src, "rb") as f:
            res = {"videos": sum(1 for _ in iter_object(f, src))}
    else:
        with open(src, "r", encoding="utf-8") as f:
            data = json.load(f)
        res = {"videos": len(data)}
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "peak_rss_bytes": _status_bytes("VmHWM"), "rss_at_start_bytes": rss0,
            "peak_reset": reset, **res}


def run_child(mode: str, src: Path, work: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(work)], capture_output=True,
                          text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(wall, 2)  # interpreter start and imports included
    return res


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=1_000_000, help="videos in the generated caption.json (default 1M)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_VIDEOS:,} videos: a smoke test of a few seconds")
    ap.add_argument("--tmp", help="where the generated file goes (default: a new temporary directory)")
    ap.add_argument("--skip-baseline", action="store_true", help="leave out json_load and stream_parse")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    n = QUICK_VIDEOS if args.quick else args.videos
    work = Path(tempfile.mkdtemp(prefix="bench_import_", dir=args.tmp))
    try:
        (work / "videos").mkdir()
        src = work / "caption.json"
        log(f"generating {n:,} videos into {src}")
        t0 = time.perf_counter()
        info = generate(src, n)
        info["generate_s"] = round(time.perf_counter() - t0, 1)
        log(f"  {info['bytes'] / 1e9:.2f} GB, {info['caption_lines']:,} lines in {info['generate_s']} s")
        result: dict = {
            "benchmark": "import",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
            "input": {"format": "HowTo100M caption.json (generated)", **info},
            "memory_method": "VmHWM of the child process after resetting it through /proc/self/clear_refs "
                             "once its modules are imported (interpreter included)",
        }
        log("import (run_import howto100m --keep-missing) in a subprocess")
        imp = run_child("import", src, work)
        imp["videos_per_s"] = round(n / imp["seconds"])
        imp["input_mb_per_s"] = round(info["bytes"] / 1e6 / imp["seconds"], 1)
        imp["correct"] = imp["written"] == n and imp["captions"] == info["caption_lines"]
        result["import"] = imp
        log(f"  {imp['seconds']} s, peak {imp['peak_rss_bytes'] / 2**20:.0f} MiB")
        (work / "manifest.jsonl").unlink(missing_ok=True)
        if not args.skip_baseline:
            log("baseline: json.load in a subprocess")
            base = run_child("json_load", src, work)
            result["json_load"] = base
            log(f"  {base['seconds']} s, peak {base['peak_rss_bytes'] / 2**20:.0f} MiB")
            log("stream_parse: the importer's parser alone, in a subprocess")
            parse = run_child("stream_parse", src, work)
            result["stream_parse"] = parse
            log(f"  {parse['seconds']} s, peak {parse['peak_rss_bytes'] / 2**20:.0f} MiB")
            result["time_ratio_import_vs_json_load"] = round(imp["seconds"] / base["seconds"], 3)
            result["time_ratio_stream_parse_vs_json_load"] = round(parse["seconds"] / base["seconds"], 3)
            result["peak_rss_ratio_import_vs_json_load"] = round(imp["peak_rss_bytes"] / base["peak_rss_bytes"], 4)
        result["targets"] = {"import_wall_s": TARGET_S, "import_peak_rss_bytes": TARGET_BYTES,
                             "apply_to": "1,000,000 videos" + ("" if n >= 1_000_000 else f" (this run: {n:,})")}
        result["import_under_60s"] = bool(imp["wall_s"] < TARGET_S)
        result["import_under_4gib"] = bool(imp["peak_rss_bytes"] < TARGET_BYTES)
        result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
