"""Seeded fuzzing of the extraction job with damaged video files.

Real H.264 files (short stream-copied cuts of the videos in ../shared/videos, when
present) and synthetic ones are damaged in many ways: bit flips, truncation (also
inside the moov atom and in the first bytes), splices of one file into another,
swapped halves, zeroed and duplicated ranges. All variants go in one manifest and
``run_extract`` runs over it with each backend. The job must finish, account for
every video exactly once (a shard entry with clips, or a failure with a reason),
leave no process behind, respect the per-video time limit and not leak memory.

    pytest -s tests/test_video_fuzz.py                 # quick version (~20 variants)
    pytest -s -m faults tests/test_video_fuzz.py       # full run (220 variants x backends)
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_videos
from videolm.extract.config import ExtractConfig
from videolm.extract.job import run_extract
from videolm.features.layout import list_shards
from videolm.features.shards import ShardReader
from videolm.manifests.manifest import VideoEntry, load_manifest, write_manifest
from videolm.manifests.synthetic import synthesize

SEED = 20240611
TIMEOUT = 10.0  # per-video stall limit for these runs
PER_VIDEO_S = 1.5  # generous wall-time budget per video (2 busy shared cores)
RSS_GROWTH_MB = 300

KINDS = ("bitflip", "bitflip_moov", "truncate", "truncate_moov", "truncate_head", "splice_insert",
         "splice_overwrite", "swap_halves", "zero", "zero_moov", "duplicate")


def _backends() -> list[str]:
    out = ["av"]
    try:
        import decord  # noqa: F401

        out.append("decord")
    except Exception:
        pass
    return out


# ---------------------------------------------------------------- base files


def _cut_real(src: Path, dst: Path, seconds: float, faststart: bool) -> Path:
    """Stream-copy the first ``seconds`` of a real video (no re-encoding: real bitstream)."""
    import av

    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=opts) as out:
        ins = inp.streams.video[0]
        os_ = out.add_stream_from_template(ins) if hasattr(out, "add_stream_from_template") \
            else out.add_stream(template=ins)
        limit = seconds / float(ins.time_base)
        for pkt in inp.demux(ins):
            if pkt.dts is None:
                continue
            if pkt.pts is not None and pkt.pts - (ins.start_time or 0) > limit and pkt.is_keyframe:
                break
            pkt.stream = os_
            out.mux(pkt)
    return dst


def _atoms(data: bytes) -> dict[str, tuple[int, int]]:
    """Top-level MP4 boxes: name -> (offset, size)."""
    out, off = {}, 0
    while off + 8 <= len(data):
        size, typ = struct.unpack(">I4s", data[off : off + 8])
        if size == 1 and off + 16 <= len(data):
            size = struct.unpack(">Q", data[off + 8 : off + 16])[0]
        size = size or len(data) - off
        if size < 8:
            break
        out.setdefault(typ.decode("latin-1"), (off, size))
        off += size
    return out


def make_bases(tmp: Path, n_synth: int) -> list[tuple[str, Path]]:
    """(name, path) of undamaged files: synthetic renders plus short real cuts when available."""
    manifest = synthesize(tmp / "synth", n_synth, seed=SEED % 1000, progress=False)
    bases = [(f"synth{i}", Path(e.path)) for i, e in enumerate(load_manifest(manifest))]
    for i, src in enumerate(shared_videos()[:2]):
        # 3 s cut, moov first (as the originals); 2 s cut, moov last (as most encoders write)
        bases.append((f"real{i}", _cut_real(src, tmp / f"real{i}.mp4", 3.0, faststart=True)))
        bases.append((f"real{i}end", _cut_real(src, tmp / f"real{i}end.mp4", 2.0, faststart=False)))
    return bases


# ---------------------------------------------------------------- mutations


def _range(rng, n: int, max_len: int, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
    hi = n if hi is None else hi
    length = int(rng.integers(1, max(2, min(max_len, hi - lo))))
    start = int(rng.integers(lo, max(lo + 1, hi - length)))
    return start, start + length


def mutate(kind: str, data: bytes, other: bytes, rng) -> bytes:
    b = bytearray(data)
    n = len(b)
    moov = _atoms(data).get("moov", (0, min(n, 4096)))
    if kind in ("bitflip", "bitflip_moov"):
        lo, hi = (moov[0], moov[0] + moov[1]) if kind == "bitflip_moov" else (0, n)
        for pos in rng.integers(lo, hi, size=int(rng.integers(1, 65))):
            b[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if kind == "truncate":
        return data[: int(rng.integers(1, n))]
    if kind == "truncate_moov":
        return data[: int(rng.integers(moov[0], moov[0] + moov[1]))]
    if kind == "truncate_head":
        return data[: int(rng.integers(1, 64))]
    if kind == "splice_insert":
        s, e = _range(rng, len(other), 64 * 1024)
        at = int(rng.integers(0, n))
        return data[:at] + other[s:e] + data[at:]
    if kind == "splice_overwrite":
        s, e = _range(rng, len(other), 64 * 1024)
        at = int(rng.integers(0, n))
        b[at : at + (e - s)] = other[s:e]
        return bytes(b[: max(n, at)])
    if kind == "swap_halves":
        mid = int(rng.integers(n // 4, 3 * n // 4)) if rng.random() < 0.5 else n // 2
        return data[mid:] + data[:mid]
    if kind in ("zero", "zero_moov"):
        lo, hi = (moov[0], moov[0] + moov[1]) if kind == "zero_moov" else (0, n)
        s, e = _range(rng, n, 4096 if kind == "zero_moov" else max(16, n // 4), lo, hi)
        b[s:e] = bytes(e - s)
        return bytes(b)
    if kind == "duplicate":
        s, e = _range(rng, n, max(16, n // 4))
        at = e if rng.random() < 0.5 else int(rng.integers(0, n))
        return data[:at] + data[s:e] + data[at:]
    raise ValueError(kind)


def make_variants(bases: list[tuple[str, Path]], out: Path, n: int, seed: int) -> list[dict]:
    """``n`` damaged files, kinds and bases taken in turn; returns their descriptions."""
    rng = np.random.default_rng(seed)
    blobs = {name: p.read_bytes() for name, p in bases}
    names = [name for name, _ in bases]
    out.mkdir(parents=True, exist_ok=True)
    variants = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        base = names[(i // len(KINDS) + i) % len(names)]
        other = names[int(rng.integers(0, len(names)))]
        data = mutate(kind, blobs[base], blobs[other], rng)
        path = out / f"v{i:03d}_{kind}_{base}.mp4"
        path.write_bytes(data)
        variants.append({"video_id": path.stem, "path": str(path), "kind": kind, "base": base, "size": len(data)})
    return variants


# ---------------------------------------------------------------- process / memory probes


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _children() -> dict[int, str]:
    """Live child processes of this process (zombies included: they were not reaped)."""
    me, out = os.getpid(), {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == me:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out[int(d)] = cmd.strip() or stat.split()[1]
        except (OSError, ValueError):
            continue
    return out


def _is_resource_tracker(cmd: str) -> bool:
    # multiprocessing's spawn start method keeps one resource tracker for the whole
    # interpreter's life; it is not a leftover decoder.
    return "resource_tracker" in cmd


# ---------------------------------------------------------------- the run and its checks


def _reason_class(err: str) -> str:
    if err.startswith("no progress for"):
        return "hung (killed)"
    if err.startswith("decoder process died"):
        return "decoder crashed"
    head = err.split(": ")[0].split(" (")[0]
    return re.sub(r"\d+", "N", head)[:60]


def run_fuzz(tmp: Path, variants: list[dict], bases: list[tuple[str, Path]], backend: str) -> dict:
    entries = [VideoEntry(f"base_{name}", str(p), "train") for name, p in bases]
    entries += [VideoEntry(v["video_id"], v["path"], "train") for v in variants]
    manifest = write_manifest(entries, tmp / f"manifest_{backend}.jsonl")
    cfg = ExtractConfig(encoder="pixels", backend=backend, workers=2, threads=1, timeout=TIMEOUT,
                        shard_size=64, batch_size=32)
    # Warm-up on the clean bases: imports torch and the decoders, so the RSS check below
    # measures the fuzz run itself.
    warm = write_manifest(entries[: len(bases)], tmp / f"warm_{backend}.jsonl")
    ws = run_extract(warm, tmp / f"warm_{backend}", cfg, progress=False)
    assert ws.videos_failed == 0, (tmp / f"warm_{backend}" / "failures.jsonl").read_text()

    before_children = {p for p, c in _children().items() if not _is_resource_tracker(c)}
    rss0 = _rss_mb()
    t0 = time.monotonic()
    out = tmp / f"out_{backend}"
    summary = run_extract(manifest, out, cfg, progress=False)  # must not raise
    wall = time.monotonic() - t0
    rss1 = _rss_mb()
    time.sleep(0.2)
    leftover = {p: c for p, c in _children().items() if p not in before_children and not _is_resource_tracker(c)}

    # every manifest video is accounted for exactly once
    ok: dict[str, int] = {}
    for p in list_shards(out):
        with ShardReader(p) as r:
            for vid, _, n_clips in r.video_spans():
                assert vid not in ok, f"{vid} written twice"
                ok[vid] = n_clips
    failures: dict[str, str] = {}
    for line in (out / "failures.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["video_id"] not in failures, f"{row['video_id']} recorded as failed twice"
        failures[row["video_id"]] = row["error"]
    ids = [e.video_id for e in entries]
    assert not set(ok) & set(failures), f"both written and failed: {set(ok) & set(failures)}"
    missing = set(ids) - set(ok) - set(failures)
    assert not missing, f"silently missing: {sorted(missing)}"
    assert set(ok) | set(failures) == set(ids)
    assert all(n >= 1 for n in ok.values()), {v: n for v, n in ok.items() if n < 1}
    assert all(isinstance(e, str) and e.strip() for e in failures.values()), failures
    for name, _ in bases:  # the undamaged originals decode
        assert f"base_{name}" in ok, failures.get(f"base_{name}")
    # Damage never makes a video longer: a flipped bit in a timestamp table once turned
    # an 8.6 s file into 41,951 one-frame clips (now rejected as damaged timestamps).
    most = max(ok[f"base_{name}"] for name, _ in bases)
    too_long = {v: n for v, n in ok.items() if n > 2 * most + 2}
    assert not too_long, f"damaged videos with implausibly many clips (clean max {most}): {too_long}"
    assert (summary.videos_ok, summary.videos_failed) == (len(ok), len(failures))

    hung = sorted(v for v, e in failures.items() if e.startswith("no progress for"))
    crashed = sorted(v for v, e in failures.items() if e.startswith("decoder process died"))
    assert not leftover, f"processes left behind: {leftover}"
    bound = 30 + PER_VIDEO_S * len(entries) + (TIMEOUT + 5) * len(hung)
    assert wall < bound, f"{wall:.1f} s for {len(entries)} videos ({len(hung)} hung) > {bound:.0f} s"
    assert rss1 - rss0 < RSS_GROWTH_MB, f"parent RSS grew {rss1 - rss0:.0f} MB ({rss0:.0f} -> {rss1:.0f})"

    by_kind = collections.defaultdict(lambda: [0, 0])
    for v in variants:
        by_kind[v["kind"]][0 if v["video_id"] in ok else 1] += 1
    reasons = collections.Counter(_reason_class(e) for e in failures.values())
    result = {"backend": backend, "videos": len(entries), "variants": len(variants), "ok": len(ok),
              "failed": len(failures), "hung": hung, "crashed": crashed, "wall_s": round(wall, 1),
              "rss_growth_mb": round(rss1 - rss0, 1), "by_kind": dict(by_kind), "reasons": dict(reasons)}
    print(f"\n[video fuzz] backend={backend}: {len(entries)} videos ({len(bases)} clean + {len(variants)} damaged) "
          f"in {wall:.1f} s; {len(ok)} decoded ok, {len(failures)} failed, {len(hung)} hung {hung}, "
          f"{len(crashed)} crashed {crashed}; parent RSS {rss0:.0f} -> {rss1:.0f} MB")
    print("  variants by kind (ok/failed): " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(by_kind.items())))
    print("  failure reasons: " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))
    (tmp / f"fuzz_{backend}.json").write_text(json.dumps(result, indent=1))
    if os.environ.get("VIDEO_FUZZ_REPORT"):
        shutil.copy(tmp / f"fuzz_{backend}.json", Path(os.environ["VIDEO_FUZZ_REPORT"]) / f"fuzz_{backend}.json")
    return result


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzzbase")
    return tmp, make_bases(tmp, 4)


def test_mutations_are_seeded_and_cover_every_kind(fuzz_bases, tmp_path):
    _, bases = fuzz_bases
    a = make_variants(bases, tmp_path / "a", 2 * len(KINDS), SEED)
    b = make_variants(bases, tmp_path / "b", 2 * len(KINDS), SEED)
    assert [Path(v["path"]).read_bytes() for v in a] == [Path(v["path"]).read_bytes() for v in b]
    assert {v["kind"] for v in a} == set(KINDS)
    blobs = {n: p.read_bytes() for n, p in bases}
    assert all(Path(v["path"]).read_bytes() != blobs[v["base"]] for v in a)


@pytest.mark.parametrize("backend", _backends())
def test_damaged_videos_quick(fuzz_bases, tmp_path, backend):
    _, bases = fuzz_bases
    variants = make_variants(bases, tmp_path / "variants", 22, SEED)
    run_fuzz(tmp_path, variants, bases, backend)


@pytest.mark.faults
@pytest.mark.parametrize("backend", _backends())
def test_damaged_videos_full(fuzz_bases, tmp_path, backend):
    _, bases = fuzz_bases
    variants = make_variants(bases, tmp_path / "variants", 220, SEED + 1)
    # A named pipe nobody writes: opening it blocks forever, so the kill path (hung decoder,
    # replacement worker, time bound, no leftover process) is exercised at least once.
    fifo = tmp_path / "variants" / "v999_fifo_hang.mp4"
    os.mkfifo(fifo)
    variants.append({"video_id": fifo.stem, "path": str(fifo), "kind": "fifo_hang", "base": "-", "size": 0})
    result = run_fuzz(tmp_path, variants, bases, backend)
    assert result["variants"] >= 200
    assert fifo.stem in result["hung"]
