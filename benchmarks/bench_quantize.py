#!/usr/bin/env python
"""Speed, quality and memory of visual-word quantisation (videolm/quantize/kmeans.py).

Prints ONE JSON object on stdout (progress goes to stderr). Everything is measured
in the same process run, so the ratios are meaningful on a noisy machine:

* ``flat``: one flat k-means codebook (k=1024, normalize "none") on 200,000 x 512
  float32 iid standard normal data (``np.random.default_rng(0).standard_normal``),
  the setting of the issue. Baseline: scikit-learn ``MiniBatchKMeans`` with its
  defaults (``_kmeans_sklearn``); then our faiss ``fast`` and ``accurate`` presets
  (``_kmeans_faiss`` with ``PRESETS``). Fit wall time excludes the inertia, which is
  computed the same way for every method: the sum over ALL points of the squared L2
  distance to the nearest centroid (faiss ``IndexFlatL2``, summed in float64).
  Targets: ``fast`` no worse inertia than MiniBatchKMeans in no more wall time;
  ``accurate`` at least 1.5 % lower inertia than MiniBatchKMeans.
  ``--sweep`` adds candidate faiss settings (niter x max_points_per_centroid) and the
  inertia-per-iteration curve of one long full-batch run, to choose the presets.
* ``hierarchical``: the VideoBERT tree, k=12, 4 levels (20,736 words), on 500,000 x
  1024 generated features (a 4-level hierarchical Gaussian mixture, below):
  ``fit_codebook`` with the fast preset on all 500k points, then ``Codebook.assign``
  of all points; target: fit + assign under 3 minutes on 2 cores. Assignment
  throughput (clips/s) is compared, in the same run, with the per-node reference walk
  it replaced (tests/test_quantize.py, timed on the first 65,536 points, whose words
  must be identical), with one read pass over the same features (``x.sum()``) and one
  level's product (``x @ centroids.T``, 12 columns), and with memory-bandwidth and
  sgemm bounds.
* ``cli``: peak RSS and wall time of the real ``videolm quantize`` subprocess
  (``--sample 500000 --k 12 --levels 4``) on a feature directory holding the same
  features as float16 shards (cached under ``--out``); bound: sample x dim x 4 B x 3.
  ``--skip-cli`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# flat benchmark (the setting)
FLAT_N, FLAT_DIM, FLAT_K = 200_000, 512, 1024
ACCURATE_GAIN = 0.015  # accurate must be at least this much below MiniBatchKMeans' inertia
SWEEP_NITER = (4, 6, 8, 10, 15)
SWEEP_MPPC = (32, 64, 128, 256)
CURVE_NITER = 40  # length of the full-batch run whose per-iteration objective is reported with --sweep

# hierarchical benchmark / CLI
H_N, H_DIM, H_K, H_LEVELS = 500_000, 1024, 12, 4
H_TARGET_S = 180.0
REF_N = 65_536  # points the slow reference walk is timed on: two of assign's 32768-row chunks
SHARDS, CLIPS_PER_VIDEO = 10, 20
# Bump when the generated features change, so a stale cached feature directory is not reused.
GEN_VERSION = 1
GEN_SEED = 1
GEN_SCALES = (1.0, 0.7, 0.5, 0.35)  # per-dimension std of the offsets added at tree levels 1..4
GEN_NOISE = 0.5  # per-dimension std of the isotropic noise around each leaf mean


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _r(x, n=4):
    return None if x is None else round(float(x), n)


# --------------------------------------------------------------------------- flat codebook


def flat_data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((FLAT_N, FLAT_DIM)).astype(np.float32)


def inertia_of(x: np.ndarray, centroids: np.ndarray, chunk: int = 50_000) -> float:
    """Sum over all rows of x of the squared L2 distance to the nearest centroid."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    total = 0.0
    for a in range(0, len(x), chunk):
        d, _ = index.search(x[a : a + chunk], 1)
        total += float(d.sum(dtype=np.float64))
    return total


def _flat_cfg(**kw):
    from videolm.quantize.kmeans import QuantizeConfig

    return QuantizeConfig(k=FLAT_K, levels=1, sample=FLAT_N, normalize="none", **kw)


def fit_timed(x: np.ndarray, backend: str, **kw) -> dict:
    """One fit through videolm.quantize.kmeans.KMEANS (as fit_codebook calls it), then its inertia (not timed)."""
    from videolm.quantize.kmeans import KMEANS

    cfg = _flat_cfg(backend=backend, **kw)
    c0, t0 = time.process_time(), time.perf_counter()
    centroids = KMEANS[backend](x, FLAT_K, cfg, 0)
    fit_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    out = {"fit_s": _r(fit_s, 3), "cpu_s": _r(cpu_s, 2), "inertia": inertia_of(x, centroids)}
    if backend == "faiss":
        out.update(niter=cfg.niter, max_points_per_centroid=cfg.max_points_per_centroid,
                   training_points=min(len(x), cfg.max_points_per_centroid * FLAT_K))
    return out


def _merge_runs(runs: list[dict]) -> dict:
    out = dict(runs[0])
    walls = [r["fit_s"] for r in runs]
    out["fit_s"] = _r(float(np.median(walls)), 3)
    out["cpu_s"] = _r(float(np.median([r["cpu_s"] for r in runs])), 2)
    if len(runs) > 1:
        out["fit_runs_s"] = walls
        out["inertia_spread"] = _r((max(r["inertia"] for r in runs) - min(r["inertia"] for r in runs))
                                   / runs[0]["inertia"], 7)
    return out


def _vs(entry: dict, base: dict) -> None:
    entry["time_ratio_vs_minibatch"] = _r(entry["fit_s"] / base["fit_s"])
    entry["inertia_ratio_vs_minibatch"] = _r(entry["inertia"] / base["inertia"], 5)


def accurate_curve(x: np.ndarray, niter: int) -> list[dict]:
    """One full-batch faiss run (same parameters as _kmeans_faiss, seed 0): faiss's own
    objective at the start of iteration i is the all-points inertia of the centroids
    after i updates, i.e. of the niter=i result; the last entry is computed by us."""
    import faiss

    km = faiss.Kmeans(FLAT_DIM, FLAT_K, niter=niter, seed=0, max_points_per_centroid=10**9,
                      min_points_per_centroid=1, verbose=False)
    t0 = time.perf_counter()
    km.train(x)
    wall = time.perf_counter() - t0
    stats = km.iteration_stats
    rows = []
    for i in range(1, niter):
        st = stats[i]
        rows.append({"niter": i, "inertia": float(st["obj"]) if isinstance(st, dict) else float(st.obj),
                     "fit_s": _r((st["time"] if isinstance(st, dict) else st.time), 2)})
    rows.append({"niter": niter, "inertia": inertia_of(x, np.asarray(km.centroids)), "fit_s": _r(wall, 2)})
    return rows


def flat_benchmark(sweep: bool, repeats: int) -> dict:
    from videolm.quantize.kmeans import PRESETS

    log(f"flat: generating {FLAT_N} x {FLAT_DIM} iid N(0,1)")
    x = flat_data()
    res: dict = {
        "data": f"np.random.default_rng(0).standard_normal(({FLAT_N}, {FLAT_DIM})).astype(float32)",
        "k": FLAT_K, "normalize": "none",
        "inertia_method": "sum over all points of the squared L2 distance to the nearest centroid "
                          "(faiss IndexFlatL2 search, float64 sum); not part of fit_s",
        "timing": f"fit_s = median of {repeats} interleaved runs for minibatch and fast (fit_runs_s lists them), one run for accurate and each sweep candidate",
        "total_sum_of_squares": float(np.square(x, dtype=np.float32).sum(dtype=np.float64)),
    }
    # Untimed warm-up (~1 s): without it the first MiniBatchKMeans fit in a process is ~3-5 s slower.
    from sklearn.cluster import MiniBatchKMeans

    MiniBatchKMeans(16, random_state=0, n_init="auto").fit(x)
    fit_timed(x[:20_000], "faiss", niter=2, max_points_per_centroid=16)
    # The two timed against each other are interleaved, so a noisy neighbour hits both alike.
    log(f"flat: MiniBatchKMeans (sklearn defaults) baseline and faiss fast {PRESETS['fast']}, {repeats} x interleaved")
    base_runs, fast_runs = [], []
    for _ in range(repeats):
        base_runs.append(fit_timed(x, "sklearn"))
        fast_runs.append(fit_timed(x, "faiss", **PRESETS["fast"]))
    base, fast = _merge_runs(base_runs), _merge_runs(fast_runs)
    base["method"] = "sklearn MiniBatchKMeans(n_clusters=1024, random_state=0, n_init='auto'), other args default"
    res["minibatch"] = base
    _vs(fast, base)
    res["fast"] = fast
    log(f"flat: faiss accurate {PRESETS['accurate']}")
    acc = fit_timed(x, "faiss", **PRESETS["accurate"])
    _vs(acc, base)
    res["accurate"] = acc
    fast, acc = res["fast"], res["accurate"]
    res["targets"] = {
        "fast": "inertia <= minibatch inertia and fit_s <= minibatch fit_s",
        "accurate": f"inertia <= (1 - {ACCURATE_GAIN}) x minibatch inertia",
    }
    res["fast_meets_target"] = bool(fast["inertia"] <= base["inertia"] and fast["fit_s"] <= base["fit_s"])
    res["accurate_meets_target"] = bool(acc["inertia"] <= (1 - ACCURATE_GAIN) * base["inertia"])
    res["accurate_inertia_reduction_vs_minibatch"] = _r(1 - acc["inertia"] / base["inertia"], 5)
    if sweep:
        cands = []
        for mppc in SWEEP_MPPC:
            for niter in SWEEP_NITER:
                log(f"flat sweep: niter={niter} max_points_per_centroid={mppc}")
                e = fit_timed(x, "faiss", niter=niter, max_points_per_centroid=mppc)
                _vs(e, base)
                e["meets_fast_target"] = bool(e["inertia"] <= base["inertia"] and e["fit_s"] <= base["fit_s"])
                cands.append(e)
        res["sweep"] = cands
        ok = [c for c in cands if c["inertia"] <= base["inertia"] and c["fit_s"] <= 0.5 * base["fit_s"]]
        res["sweep_best_within_half_minibatch_time"] = (
            min(ok, key=lambda c: c["inertia"]) if ok else None)
        log(f"flat sweep: full-batch curve, niter 1..{CURVE_NITER}")
        curve = accurate_curve(x, CURVE_NITER)
        for row in curve:
            row["inertia_ratio_vs_minibatch"] = _r(row["inertia"] / base["inertia"], 5)
            row["time_ratio_vs_minibatch"] = _r(row["fit_s"] / base["fit_s"], 3)
        res["full_batch_curve"] = curve
        res["full_batch_curve_note"] = (
            "one faiss.Kmeans full-batch run, seed 0: entry niter=i is faiss's objective at the start of "
            "iteration i (= all-points inertia of the niter=i result) and the cumulative time to that point")
    return res


# --------------------------------------------------------------------------- generated features


def generate_features(n: int = H_N, dim: int = H_DIM, seed: int = GEN_SEED, chunk: int = 50_000):
    """Yield float32 chunks of a 4-level hierarchical Gaussian mixture, rounded through float16.

    12 top-level means (per-dimension std GEN_SCALES[0]); each node has 12 children
    whose means add an offset of std GEN_SCALES[level]; the 20,736 leaves' mixture
    weights are products of per-node Dirichlet(1) weights (uneven cluster sizes);
    each point = its leaf mean + N(0, GEN_NOISE^2) noise.
    """
    rng = np.random.default_rng(seed)
    k = H_K
    means = np.zeros((1, dim), np.float32)
    weights = np.ones(1)
    for s in GEN_SCALES:
        off = rng.standard_normal((len(means), k, dim), dtype=np.float32) * np.float32(s)
        means = (means[:, None, :] + off).reshape(-1, dim)
        weights = (weights[:, None] * rng.dirichlet(np.ones(k), size=len(weights))).reshape(-1)
    weights /= weights.sum()
    labels = rng.choice(len(means), size=n, p=weights)
    for a in range(0, n, chunk):
        lab = labels[a : a + chunk]
        x = rng.standard_normal((len(lab), dim), dtype=np.float32)
        x *= np.float32(GEN_NOISE)
        x += means[lab]
        yield x.astype(np.float16).astype(np.float32)


def generated_description() -> str:
    return (f"{H_N} x {H_DIM} hierarchical Gaussian mixture (seed {GEN_SEED}): 12^4 = 20736 leaf means built as "
            f"sums of per-level random offsets with per-dimension std {list(GEN_SCALES)} (level 1..4), leaf "
            f"weights = products of Dirichlet(1) per node, points = leaf mean + N(0, {GEN_NOISE}^2) noise, "
            "rounded through float16 (as stored in shards)")


def memcpy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second of np.copyto on a large float32 array (each byte read once and written once)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def sgemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    a = np.ones((n, n), np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def blas_contention_diagnostic(x: np.ndarray, cfg, fingerprint: str, fit_s: float) -> dict:
    """fit_codebook again with numpy's (pthreads) OpenBLAS limited to 1 thread, faiss untouched.

    numpy's ``x @ c.T`` in ``nearest`` and faiss's OpenMP k-means alternate thousands
    of times per tree; each pool's threads spin after their call and steal the other
    pool's cores on a small machine. Same codebook expected (same fingerprint)."""
    from threadpoolctl import ThreadpoolController

    from videolm.quantize.kmeans import fit_codebook

    ctl = ThreadpoolController()
    numpy_blas = [lc.filepath for lc in ctl.lib_controllers if lc.user_api == "blas" and "numpy" in lc.filepath]
    if not numpy_blas:
        return {"skipped": "numpy's BLAS not found by threadpoolctl"}
    log("hierarchical: diagnostic fit with numpy's BLAS at 1 thread")
    with ctl.select(filepath=numpy_blas).limit(limits=1):
        t0 = time.perf_counter()
        cb, _ = fit_codebook(x, cfg)
        t = time.perf_counter() - t0
    return {
        "fit_s": _r(t, 2),
        "speedup_vs_default": _r(fit_s / t, 2),
        "same_codebook": cb.fingerprint() == fingerprint,
        "note": "diagnostic only: numpy's pthreads OpenBLAS limited to 1 thread with threadpoolctl (faiss's OpenMP "
                "and its BLAS untouched); comparable to running with OPENBLAS_NUM_THREADS=1",
    }


def _timed(f, repeats: int = 1):
    """(best wall seconds of ``repeats`` calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _reference_assign():
    """The per-node walk that Codebook.assign replaced, kept verbatim in tests/test_quantize.py."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_quantize import reference_assign

    return reference_assign


def assign_benchmark(cb, x: np.ndarray) -> dict:
    """Codebook.assign of every point; the reference walk on the first REF_N points; same-data baselines."""
    import videolm.quantize.kmeans as km

    log("hierarchical: Codebook.assign of all points")
    calls, real = [], km.nearest  # assign calls nearest only for close calls: count them
    km.nearest = lambda xs, *a, **kw: calls.append(len(xs)) or real(xs, *a, **kw)
    try:
        c0 = time.process_time()
        assign_s, (words, _, _) = _timed(lambda: cb.assign(x))
        assign_cpu = time.process_time() - c0
    finally:
        km.nearest = real
    log(f"hierarchical: reference walk on the first {REF_N} points, then assign on them (best of 3)")
    sub = x[:REF_N]
    ref_s, (ref_words, ref_paths, _) = _timed(lambda: _reference_assign()(cb, sub))
    sub_s, (sub_words, sub_paths, _) = _timed(lambda: cb.assign(sub), 3)
    log("hierarchical: same-data baselines (x.sum(), x @ level-0 centroids)")
    sum_s, _ = _timed(lambda: x.sum(), 3)
    c0s = cb.levels[0]["centroids"]
    mm_s, _ = _timed(lambda: x @ c0s.T, 3)
    cps = len(x) / assign_s
    return {
        "assign_s": assign_s, "words": words, "assign_cpu_s": _r(assign_cpu, 2),
        "close_calls": {"groups": len(calls), "rows": int(sum(calls)),
                        "note": "node groups whose choice was within rounding reach, re-scored by the reference's "
                                "own product (part of assign_s)"},
        "vs_reference": {
            "clips": REF_N,
            "reference_s": _r(ref_s, 2),
            "reference_clips_per_s": round(REF_N / ref_s),
            "assign_s": _r(sub_s, 3),
            "assign_clips_per_s": round(REF_N / sub_s),
            "speedup": _r(ref_s / sub_s, 1),
            "words_identical": bool(np.array_equal(sub_words, ref_words) and np.array_equal(sub_paths, ref_paths)),
            "words_differing": int((sub_words != ref_words).sum()),
            "same_as_full_run": bool(np.array_equal(sub_words, words[:REF_N])),
        },
        "baselines": {
            "sum_pass_s": _r(sum_s, 3),
            "sum_pass_clips_per_s": round(len(x) / sum_s),
            "assign_over_sum_pass": _r(cps * sum_s / len(x), 4),
            "matmul_one_level_s": _r(mm_s, 3),
            "matmul_one_level_clips_per_s": round(len(x) / mm_s),
            "assign_over_matmul_one_level": _r(cps * mm_s / len(x), 4),
            "note": "same x, same run: one float32 read pass (x.sum()) and the root level's product "
                    f"x @ centroids.T ({len(x)} x {x.shape[1]} @ {x.shape[1]} x {len(c0s)}, one BLAS call); "
                    f"assign does {cb.depth} such products per clip",
        },
    }


def hierarchical_benchmark() -> dict:
    from videolm.quantize.kmeans import PRESETS, QuantizeConfig, fit_codebook, normalize_rows, word_stats

    log(f"hierarchical: generating {H_N} x {H_DIM} features")
    t0 = time.perf_counter()
    x = np.empty((H_N, H_DIM), np.float32)
    a = 0
    for block in generate_features():
        x[a : a + len(block)] = block
        a += len(block)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = normalize_rows(x, "l2")
    norm_s = time.perf_counter() - t0

    cfg = QuantizeConfig(k=H_K, levels=H_LEVELS, sample=H_N, normalize="l2", **PRESETS["fast"])
    level_done: dict[int, float] = {}

    def on_level(level, done, total):
        if done == total:
            level_done[level] = time.perf_counter()

    log(f"hierarchical: fit_codebook k={H_K} levels={H_LEVELS} preset fast {PRESETS['fast']}")
    t0 = time.perf_counter()
    c0 = time.process_time()
    cb, inertia = fit_codebook(x, cfg, on_level)
    fit_s = time.perf_counter() - t0
    fit_cpu = time.process_time() - c0
    per_level, prev = [], t0
    for lv in sorted(level_done):
        per_level.append(_r(level_done[lv] - prev, 2))
        prev = level_done[lv]

    diag = blas_contention_diagnostic(x, cfg, cb.fingerprint(), fit_s)

    asg = assign_benchmark(cb, x)
    assign_s = asg.pop("assign_s")
    words = asg.pop("words")
    stats = word_stats(np.bincount(words, minlength=cb.vocab_size), len(cb.levels[-1]["centroids"]))

    log("hierarchical: memory bandwidth and sgemm reference")
    bw = memcpy_bandwidth()
    gflops = sgemm_gflops()
    clip_bytes = H_DIM * 4
    bound = bw / clip_bytes
    clips_per_s = H_N / assign_s
    flops_per_clip = 2 * H_DIM * H_K * H_LEVELS  # k dot products of length dim per level
    total = fit_s + assign_s
    return {
        "data": generated_description(),
        "generate_s": _r(gen_s, 2),
        "normalize_l2_s": _r(norm_s, 2),
        "config": {"k": H_K, "levels": H_LEVELS, "sample": H_N, "normalize": "l2", **PRESETS["fast"]},
        "fit_s": _r(fit_s, 2),
        "fit_cpu_s": _r(fit_cpu, 2),
        "fit_s_per_level": per_level,
        "fit_with_numpy_blas_1_thread": diag,
        "inertia_per_level": [float(v) for v in inertia],
        "assign_s": _r(assign_s, 2),
        "assign_cpu_s": asg.pop("assign_cpu_s"),
        "assign_clips_per_s": round(clips_per_s, 1),
        **asg,
        "fit_plus_assign_s": _r(total, 2),
        "target_s": H_TARGET_S,
        "meets_target": bool(total < H_TARGET_S),
        "word_stats": stats,
        "bandwidth": {
            "memcpy_bytes_per_s": round(bw),
            "bytes_read_per_clip_min": clip_bytes,
            "bound_clips_per_s": round(bound),
            "assign_fraction_of_bound": _r(clips_per_s / bound, 5),
            "sgemm_gflops": _r(gflops, 1),
            "flops_per_clip": int(flops_per_clip),
            "compute_bound_clips_per_s": round(gflops * 1e9 / flops_per_clip),
            "note": "bound = memcpy bandwidth (np.copyto of 512 MiB, best of 5; bytes copied per second) / "
                    "one float32 read of the clip (dim x 4 bytes): the tree's centroids at each node are tiny "
                    "and cache-resident, so one pass over the features is the floor. The compute bound uses "
                    "k dot products of length dim per level at a large-sgemm rate.",
        },
    }


# --------------------------------------------------------------------------- the real CLI


def ensure_feature_dir(root: Path) -> tuple[Path, float | None]:
    """Write the generated features as float16 shards once; reuse them when the marker matches."""
    from videolm.features.layout import shard_name
    from videolm.features.shards import ShardWriter

    d = root / f"quantize_features_v{GEN_VERSION}"
    marker = d / "bench_features.json"
    want = {"version": GEN_VERSION, "n": H_N, "dim": H_DIM, "shards": SHARDS, "clips_per_video": CLIPS_PER_VIDEO,
            "seed": GEN_SEED, "scales": list(GEN_SCALES), "noise": GEN_NOISE}
    if marker.exists() and json.loads(marker.read_text()) == want and all(
            (d / shard_name(i)).exists() for i in range(SHARDS)):
        return d, None
    log(f"cli: writing {SHARDS} float16 shards to {d} (once; cached)")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    per_shard = H_N // SHARDS
    attrs = {"encoder": "pixels", "config": json.dumps({"encoder": "synthetic", "sampling": {}})}
    gen = generate_features(chunk=per_shard)
    starts = np.arange(CLIPS_PER_VIDEO, dtype=np.float32)
    for i in range(SHARDS):
        feats = next(gen)
        w = ShardWriter(d / shard_name(i), H_DIM, attrs)
        for v in range(0, per_shard, CLIPS_PER_VIDEO):
            f = feats[v : v + CLIPS_PER_VIDEO]
            w.add_video(f"s{i:02d}_v{v // CLIPS_PER_VIDEO:05d}", f, starts[: len(f)], starts[: len(f)] + 1.0,
                        float(len(f)))
        w.finish()
    marker.write_text(json.dumps(want))
    return d, time.perf_counter() - t0


def _clean_quantize_outputs(d: Path) -> None:
    from videolm.features.layout import CODEBOOK_NAME, list_token_files, unfinished_quantize_files

    for p in [d / CODEBOOK_NAME, *list_token_files(d), *unfinished_quantize_files(d)]:
        p.unlink(missing_ok=True)


def _status_kb(pid: int) -> dict[str, int]:
    got = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "VmRSS"):
                    got[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return got


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class PeakPoller(threading.Thread):
    """Every ``interval`` s: VmHWM (the kernel's exact peak RSS) of the python process,
    and a (t, RSS) trace so the phase of the peak can be read off."""

    def __init__(self, pid: int, follow_child: bool, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.target: int | None = None if follow_child else pid
        self.hwm_kb = 0
        self.trace: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self):
        while not self.stop.is_set():
            if self.target is None:  # under /usr/bin/time the python process is its child
                kids = _children_of(self.pid)
                self.target = kids[0] if kids else None
            if self.target is not None:
                st = _status_kb(self.target)
                if "VmRSS" in st:
                    self.hwm_kb = max(self.hwm_kb, st.get("VmHWM", 0))
                    self.trace.append((time.perf_counter() - self.t0, st["VmRSS"]))
            self.stop.wait(self.interval)


def cli_benchmark(root: Path) -> dict:
    d, write_s = ensure_feature_dir(root)
    _clean_quantize_outputs(d)
    script = Path(sys.executable).with_name("videolm")
    base = [sys.executable, str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from videolm.cli import main; sys.exit(main())"]
    args = ["quantize", "--features", str(d), "--sample", str(H_N), "--k", str(H_K), "--levels", str(H_LEVELS),
            "--quiet"]
    gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    time_report = root / "quantize_time.txt"
    cmd = ([gnu_time, "-v", "-o", str(time_report)] if gnu_time else []) + base + args
    log("cli: " + " ".join(["videolm"] + args))
    linux = os.path.exists("/proc/self/status")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poller = PeakPoller(proc.pid, follow_child=bool(gnu_time)) if linux else None
    if poller:
        poller.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if poller:
        poller.stop.set()
        poller.join()
    bound = H_N * H_DIM * 4 * 3
    res: dict = {
        "command": "videolm " + " ".join(args),
        "features": f"{SHARDS} float16 shards of {H_N // SHARDS} clips (videos of {CLIPS_PER_VIDEO} clips) holding "
                    "the hierarchical benchmark's features",
        "shards_written_s": _r(write_s, 1),
        "wall_s": _r(wall, 2),
        "bound_bytes": bound,
        "bound_note": "sample x dim x 4 bytes x 3",
    }
    if proc.returncode != 0:
        res["error"] = f"exit {proc.returncode}: {stderr.strip()[-800:]}"
        return res
    res["stdout"] = stdout.strip().splitlines()
    m = re.search(r"fit ([\d.]+) s on (\d+) samples, assign ([\d.]+) s", stdout)
    if m:
        res["cli_fit_s"], res["cli_assign_s"] = float(m.group(1)), float(m.group(3))
    peaks = {}
    if poller and poller.hwm_kb:
        peaks["vmhwm"] = poller.hwm_kb * 1024
        if poller.trace:
            t_peak, rss_peak = max(poller.trace, key=lambda p: p[1])
            res["rss_trace_peak_at_s"] = _r(t_peak, 1)
            step = max(1, len(poller.trace) // 30)
            res["rss_trace_mib"] = [[_r(t, 1), round(kb / 1024)] for t, kb in poller.trace[::step]]
            res["rss_trace_note"] = "[seconds since start, RSS MiB], about 30 evenly spaced polls"
    if gnu_time and time_report.exists():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_report.read_text())
        if m:
            peaks["gnu_time"] = int(m.group(1)) * 1024
    peak = peaks.get("vmhwm") or peaks.get("gnu_time")
    res["peak_rss_bytes"] = peak
    res["peak_rss_bytes_by_method"] = peaks
    res["peak_rss_gib"] = _r(peak / 2**30, 3) if peak else None
    res["peak_over_bound"] = _r(peak / bound, 3) if peak else None
    res["under_bound"] = bool(peak is not None and peak <= bound)
    res["memory_method"] = ("VmHWM of the python process from /proc/<pid>/status polled every 0.2 s"
                            + ("; /usr/bin/time -v maximum resident set size" if gnu_time else ""))
    return res


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench_out"),
                    help="cache of generated feature shards and scratch files (default bench_out/ in the repo)")
    ap.add_argument("--sweep", action="store_true",
                    help=f"also fit candidate faiss settings (niter {SWEEP_NITER} x max_points_per_centroid "
                         f"{SWEEP_MPPC}) and a {CURVE_NITER}-iteration full-batch curve (~3.5 extra minutes)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timing runs of MiniBatchKMeans and the fast preset; median reported (default 3)")
    ap.add_argument("--skip-cli", action="store_true", help="skip the `videolm quantize` peak-memory run")
    ap.add_argument("--parts", default="flat,hierarchical,cli",
                    help="comma-separated subset of flat,hierarchical,cli (default: all)")
    args = ap.parse_args(argv)
    parts = {p for p in args.parts.split(",") if p}
    if args.skip_cli:
        parts.discard("cli")
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    import faiss
    import sklearn
    import threadpoolctl

    from videolm.quantize.kmeans import PRESETS

    result: dict = {
        "benchmark": "quantize",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "faiss_omp_threads": faiss.omp_get_max_threads(),
            "sklearn": sklearn.__version__,
            "blas": [{k: i.get(k) for k in ("internal_api", "num_threads", "version")}
                     for i in threadpoolctl.threadpool_info()],
        },
        "presets": PRESETS,
    }
    if "flat" in parts:
        result["flat"] = flat_benchmark(args.sweep, args.repeats)
        log(f"  done at {time.perf_counter() - t_start:.0f} s")
    if "hierarchical" in parts:
        result["hierarchical"] = hierarchical_benchmark()
        log(f"  done at {time.perf_counter() - t_start:.0f} s")
    if "cli" in parts:
        result["cli"] = cli_benchmark(root)
    result["total_s"] = _r(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
