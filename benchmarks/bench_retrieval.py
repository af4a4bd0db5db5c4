#!/usr/bin/env python
"""Speed of retrieval search (videolm/retrieval/search.py) and of metric computation (videolm/retrieval/metrics.py).

Prints ONE JSON object on stdout (progress goes to stderr). Every ratio compares
timings taken in the same run:

* ``search``: 100,000 x 512 L2-normalised iid Gaussian gallery, 1,000 queries, each
  a gallery vector plus Gaussian noise, renormalised (``--noise`` = expected norm of
  the noise against the unit vector; the planted vector is the ground truth).
  ``bare_exact`` (numpy ``queries @ gallery.T`` + argpartition top-10, the baseline
  of every ratio), then ``search()`` in modes exact, faiss-flat, faiss-ivf and
  faiss-hnsw. Each index is built once (build time reported apart); searches are
  repeated in interleaved rounds. Quality of each mode: top-1 agreement with the
  exact top-1, recall of the exact top-10 in its top-10, and R@1 against the planted
  ground truth. ``--hard-noise`` repeats the quality numbers with noisier queries.
* ``metrics``: ranks + ``summarize`` for 10,000 queries x 10,000 videos, each method
  in a fresh subprocess (time and peak memory): ``search(mode="exact")``, chunked
  ``ranks_from_scores`` alone, and a naive full-matrix argsort.
* ``index_cache``: ``evaluate_embeddings`` (what ``eval-retrieval`` runs after encoding:
  both directions' search, ranks, metrics) on the search part's data with an empty
  index cache (builds and saves), then again (reads the saved indexes), per cached mode
  (faiss-ivf, faiss-hnsw); ``ratio_warm_over_cold`` = warm seconds / cold seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

import videolm.retrieval.search as vsearch
from videolm.retrieval.evaluate import EvalConfig, evaluate_embeddings
from videolm.retrieval.index_cache import CACHED_SEARCH_MODES, IndexCache
from videolm.retrieval.metrics import GroundTruth, ranks_from_scores, summarize
from videolm.retrieval.queries import QuerySet
from videolm.retrieval.search import SearchConfig, search

GIB = 2**30
SPEEDUP_TARGET, AGREEMENT_TARGET = 5.0, 0.95
METRIC_TIME_TARGET_S, METRIC_MEMORY_TARGET = 5.0, 2 * GIB
# name: (full, --quick). nlist, nprobe, hnsw_m, ef_* were tuned on the full setting (README).
SIZES = {"gallery": (100_000, 5_000), "queries": (1_000, 200), "metric_n": (10_000, 2_000),
         "nlist": (1024, 64), "repeats": (3, 1)}
MODES = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _r(x, n=4):
    return None if x is None else round(float(x), n)


# --------------------------------------------------------------------------- data


def unit_gallery(n: int, dim: int, seed: int, chunk: int = 20_000) -> np.ndarray:
    """float32 from the start and normalised per chunk: no float64 or full-size temporaries,
    so the data itself does not set a memory peak higher than what is measured after it."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    for a in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - a), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[a : a + len(block)] = block
    return x


def noisy_queries(gallery: np.ndarray, n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Query i = gallery[target i] + N(0, noise^2 / dim) per dimension, renormalised;
    cos(query, target) is about 1 / sqrt(1 + noise^2)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, len(gallery), n)
    q = gallery[targets] + rng.standard_normal((n, gallery.shape[1]), dtype=np.float32) * np.float32(
        noise / np.sqrt(gallery.shape[1]))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, targets


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- search


def bare_exact_top(queries: np.ndarray, gallery: np.ndarray, top: int, chunk: int = 1024) -> dict:
    """The fair numpy baseline: only what a top-k search needs (scores, then the top by score, ties
    by id, as search.py orders them), no ranks. Chunked like search()'s exact mode."""
    ids = np.empty((len(queries), top), np.int64)
    matmul_s = topk_s = 0.0
    for a in range(0, len(queries), chunk):
        t0 = time.perf_counter()
        s = queries[a : a + chunk] @ gallery.T
        t1 = time.perf_counter()
        np.negative(s, out=s)  # in place: argpartition picks the smallest
        part = np.argpartition(s, top - 1, axis=1)[:, :top]
        order = np.lexsort((part, np.take_along_axis(s, part, 1)), axis=1)
        ids[a : a + len(s)] = np.take_along_axis(part, order, 1)
        matmul_s += t1 - t0
        topk_s += time.perf_counter() - t1
    return {"ids": ids, "matmul_s": matmul_s, "topk_s": topk_s, "seconds": matmul_s + topk_s}


def install_index_cache() -> None:
    """search() builds its faiss index on every call; the benchmark times repeated searches, so
    build_index is memoised per (config, gallery). The first call's build time is the one reported."""
    original, cache = vsearch.build_index, {}

    def cached(gallery, cfg):
        key = (cfg, id(gallery))
        if key not in cache:
            cache[key] = original(gallery, cfg)
        return cache[key]

    vsearch.build_index = cached  # search() looks build_index up in its module at each call


def search_config(args, mode: str) -> SearchConfig:
    return SearchConfig(mode=mode, k=args.k, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                        ef_construction=args.ef_construction, ef_search=args.ef_search)


def quality(top_ids: np.ndarray, exact_ids: np.ndarray, ranks: np.ndarray) -> dict:
    overlap = (top_ids[:, :, None] == exact_ids[:, None, :]).any(2).sum(1)
    return {"top1_agreement": _r(np.mean(top_ids[:, 0] == exact_ids[:, 0])),
            "recall_of_exact_top10": _r(overlap.mean() / exact_ids.shape[1]),
            "planted_R@1": _r(summarize(ranks)["R@1"] / 100)}


def search_benchmark(args) -> dict:
    log(f"search: gallery {args.gallery} x {args.dim}, {args.queries} queries, noise {args.noise}")
    gallery = unit_gallery(args.gallery, args.dim, seed=0)
    queries, targets = noisy_queries(gallery, args.queries, args.noise, seed=1)
    gt = GroundTruth.single(targets)
    cfgs = {m: search_config(args, m) for m in MODES if m in args.modes}
    install_index_cache()
    res: dict = {"data": f"gallery rng(0) N(0,1) {args.gallery} x {args.dim} float32, rows L2-normalised; "
                         f"queries: {args.queries} gallery rows (rng(1)) + noise {args.noise}, renormalised",
                 "mean_cos_query_target": _r(np.mean(np.sum(queries * gallery[targets], 1))),
                 "search_config": {f: getattr(next(iter(cfgs.values())), f) for f in (
                     "k", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")}}
    bare_exact_top(queries[:8], gallery, args.top)  # untimed warm-up: BLAS threads, page faults
    modes: dict = {m: {"build_s": 0.0, "runs": []} for m in cfgs}
    for m in [m for m in cfgs if m != "exact"]:  # the first call builds the index (cached afterwards)
        log(f"search: building {m}")
        first = search(queries, gallery, gt, cfgs[m], top=args.top)
        modes[m].update(build_s=_r(first.seconds["build"], 3), params=first.params)
    bare_runs, peaks, entries, load = [], {}, ["bare", *cfgs], []
    for rnd in range(args.repeats):  # interleaved rounds: a noisy neighbour hits every mode alike,
        log(f"search: round {rnd + 1}/{args.repeats}")  # each round starting at a different entry
        load.append(round(os.getloadavg()[0], 2))
        for m in entries[rnd % len(entries):] + entries[: rnd % len(entries)]:
            if m == "bare":
                bare_runs.append(bare_exact_top(queries, gallery, args.top))
                continue
            reset_peak_rss()
            rss0, t0 = _status_kib("VmRSS"), time.perf_counter()
            out = search(queries, gallery, gt, cfgs[m], top=args.top)
            wall = time.perf_counter() - t0
            peaks[m] = max(peaks.get(m, 0), (_status_kib("VmHWM") - rss0) * 1024)
            modes[m]["runs"].append({"call_s": wall, **out.seconds, "result": out})
    bare = {k: statistics.median(r[k] for r in bare_runs) for k in ("seconds", "matmul_s", "topk_s")}
    exact_ids = bare_runs[0]["ids"]
    res["bare_exact"] = {"method": "numpy queries @ gallery.T, then argpartition top-10 sorted by (score, id); "
                                   "no ranks", **{k: _r(v, 4) for k, v in bare.items()},
                         "runs_s": [_r(r["seconds"]) for r in bare_runs]}
    for m, e in modes.items():
        runs = e.pop("runs")
        last = runs[-1]["result"]
        med = {k: statistics.median(r[k] for r in runs) for k in ("call_s", "search", "rank") if k in runs[0]}
        e.update({"search_s": _r(med["search"]), "rank_s": _r(med.get("rank")), "call_s": _r(med["call_s"]),
                  "call_runs_s": [_r(r["call_s"]) for r in runs], "peak_rss_extra_bytes": peaks[m],
                  "gt_not_returned": last.gt_not_returned, **quality(last.top_ids, exact_ids, last.ranks)})
        e["speedup_vs_bare_exact"] = _r(bare["seconds"] / med["search"], 3)
    if "exact" in modes:
        ex_call = modes["exact"]["call_s"]
        for e in modes.values():
            e["call_speedup_vs_search_exact"] = _r(ex_call / e["call_s"], 3)
    res["modes"] = modes
    res["loadavg_1min_per_round"] = load
    res["timing_note"] = (
        f"median of {args.repeats} interleaved rounds (order rotated per round). search_s = "
        "SearchResult.seconds['search']: the faiss index.search call, or the whole exact_search (scores, "
        "ranks, top lists). rank_s: search()'s ranking after the faiss call, including exact re-scoring of "
        "gt_not_returned queries. call_s: the whole search() call, index already built. Targets use "
        "speedup_vs_bare_exact = bare_exact.seconds / search_s. peak_rss_extra_bytes: VmHWM (reset before "
        "the call) minus RSS before it.")
    ok = [m for m, e in modes.items() if m not in ("exact", "faiss-flat")
          and e["speedup_vs_bare_exact"] >= SPEEDUP_TARGET and e["top1_agreement"] >= AGREEMENT_TARGET]
    flat, ex = modes.get("faiss-flat", {}), modes.get("exact", {})
    res["targets"] = {
        "flat_ratio_bare_exact_over_flat": flat.get("speedup_vs_bare_exact"),
        "flat_ratio_search_exact_over_flat": _r(ex["search_s"] / flat["search_s"], 3) if flat and ex else None,
        "flat_no_slower_than_exact": bool(flat.get("speedup_vs_bare_exact", 0) >= 1),
        "approx_modes_meeting_5x_and_95pct": ok,
        "approx_5x_faster_with_95pct_top1": bool(ok),
    }
    if args.hard_noise:
        res["harder_queries"] = harder_queries(args, gallery, cfgs)
    return res


def harder_queries(args, gallery: np.ndarray, cfgs: dict) -> dict:
    """Same (cached) indexes, noisier queries: one search() per approximate mode, quality only
    (exact and faiss-flat return the exact lists by construction; the main part checks that)."""
    out = {}
    for noise in args.hard_noise:
        log(f"search: harder queries, noise {noise}")
        q, targets = noisy_queries(gallery, args.queries, noise, seed=2)
        gt, exact_ids = GroundTruth.single(targets), bare_exact_top(q, gallery, args.top)["ids"]
        row = {"mean_cos_query_target": _r(np.mean(np.sum(q * gallery[targets], 1)))}
        for m, cfg in [(m, c) for m, c in cfgs.items() if m in ("faiss-ivf", "faiss-hnsw")]:
            r = search(q, gallery, gt, cfg, top=args.top)
            row[m] = {**quality(r.top_ids, exact_ids, r.ranks), "gt_not_returned": r.gt_not_returned,
                      "search_s": _r(r.seconds["search"]), "rank_s": _r(r.seconds.get("rank"))}
        out[f"noise_{noise}"] = row
    return out


# --------------------------------------------------------------------------- metrics (subprocess)


def metric_child(method: str, n: int, dim: int, noise: float, use_tracemalloc: bool) -> dict:
    """Runs in a fresh process: make data, reset the peak, compute ranks + summarize once."""
    videos = unit_gallery(n, dim, seed=3)
    texts, targets = noisy_queries(videos, n, noise, seed=4)
    gt = GroundTruth.single(targets)

    def run():
        if method == "search_exact":  # what retrieval.py calls: ranks and top-10 lists
            r = search(texts, videos, gt, SearchConfig(mode="exact"), top=10)
            return summarize(r.ranks) | {"queries_with_ties": int((r.ties > 0).sum())}
        if method == "chunked_ranks":  # ranks only, same 1024-query chunks
            ranks = np.concatenate([ranks_from_scores(texts[a : a + 1024] @ videos.T,
                                                      gt.rows(a, min(a + 1024, n)))[0] for a in range(0, n, 1024)])
        else:  # naive: the whole matrix, full argsort, position of the target (ties: arbitrary order)
            order = np.argsort(-(texts @ videos.T), axis=1)
            ranks = 1 + np.argmax(order == targets[:, None], axis=1)
        return summarize(ranks)

    texts[:64] @ videos.T  # untimed warm-up: BLAS threads start
    out: dict = {"peak_reset": reset_peak_rss(), "rss_before_bytes": _status_kib("VmRSS") * 1024}
    t0 = time.perf_counter()
    out["summary"] = run()
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = _status_kib("VmHWM") * 1024  # since the reset, i.e. during run()
    if use_tracemalloc:  # a second, untimed run: numpy reports its buffers to tracemalloc
        tracemalloc.start()
        run()
        out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out


def metrics_benchmark(args) -> dict:
    methods = ("search_exact", "chunked_ranks", "naive_full_argsort")
    runs: dict = {m: [] for m in methods}
    for rnd in range(args.repeats):
        for m in methods:
            log(f"metrics: {m} {args.metric_n} x {args.metric_n}, round {rnd + 1}/{args.repeats}")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", m, "--metric-n", str(args.metric_n),
                   "--dim", str(args.dim), "--metric-noise", str(args.metric_noise)]
            cmd += ["--tracemalloc"] if rnd == 0 else []  # once is enough: allocations are deterministic
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                return {"error": f"{m}: exit {p.returncode}: {p.stderr.strip()[-800:]}"}
            runs[m].append(json.loads(p.stdout))
    res: dict = {"size": f"{args.metric_n} queries x {args.metric_n} videos x {args.dim}, noise {args.metric_noise}",
                 "memory_method": "each run in a fresh subprocess; after making the data, VmHWM is reset by "
                                  "writing 5 to /proc/self/clear_refs, so peak_rss_bytes = the process's peak RSS "
                                  "during the computation (data and interpreter included); extra = peak - RSS "
                                  "before; tracemalloc_peak_bytes: numpy/python allocations in a second, untimed run "
                                  "(not BLAS's own buffers). getrusage ru_maxrss is not used: on Linux a child "
                                  "starts with its parent's peak (kept across exec), here this script's ~2.2 GB"}
    for m, rs in runs.items():
        res[m] = {"seconds": _r(statistics.median(r["seconds"] for r in rs), 3),
                  "runs_s": [_r(r["seconds"], 3) for r in rs],
                  "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                  "peak_rss_extra_bytes": max(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in rs),
                  "tracemalloc_peak_bytes": rs[0].get("tracemalloc_peak_bytes"),
                  "peak_reset_worked": all(r["peak_reset"] for r in rs), "summary": rs[0]["summary"]}
    ex, naive = res["search_exact"], res["naive_full_argsort"]
    # naive argsort puts tied wrong candidates before the target at random: its MnR may be a bit higher
    res["summary_matches_search_exact"] = {m: all(res[m]["summary"][k] == v for k, v in ex["summary"].items()
                                                  if k in res[m]["summary"]) for m in methods[1:]}
    res["speedup_search_exact_vs_naive"] = _r(naive["seconds"] / ex["seconds"], 2)
    res["targets"] = {"search_exact_under_5_s": bool(ex["seconds"] < METRIC_TIME_TARGET_S),
                      "search_exact_peak_under_2_gib": bool(ex["peak_rss_bytes"] < METRIC_MEMORY_TARGET)}
    return res


# --------------------------------------------------------------------------- index cache


def index_cache_benchmark(args) -> dict:
    """Eval scoring with a cold index cache, then a warm one: what a second eval-retrieval of a checkpoint saves."""
    gallery = unit_gallery(args.gallery, args.dim, seed=0)
    queries, targets = noisy_queries(gallery, args.queries, args.noise, seed=1)
    keys = [f"q{i}" for i in range(len(queries))]
    qs = QuerySet([f"v{i}" for i in range(len(gallery))], keys, keys, targets)
    res: dict = {"data": "the search part's gallery and queries (one query per planted target)",
                 "eval_config": "EvalConfig(search=<the search part's config>, bootstrap=200); no encoding"}
    for m in [m for m in CACHED_SEARCH_MODES if m in args.modes]:
        cfg = EvalConfig(search=search_config(args, m), bootstrap=200)
        runs = {}
        with tempfile.TemporaryDirectory() as d:
            for name in ("cold", "warm"):
                log(f"index_cache: {m}, {name} cache")
                t0 = time.perf_counter()
                part, results = evaluate_embeddings(qs, queries, gallery, cfg, cache=IndexCache(d))
                runs[name] = {"s": time.perf_counter() - t0, "t2v": results["t2v"].index,
                              "ranks": [part[x]["per_query"]["ranks"] for x in ("t2v", "v2t")]}
            index_bytes = os.path.getsize(runs["cold"]["t2v"]["file"])
        cold, warm = runs["cold"], runs["warm"]
        res[m] = {"cold_s": _r(cold["s"], 3), "warm_s": _r(warm["s"], 3),
                  "ratio_warm_over_cold": _r(warm["s"] / cold["s"]),
                  "t2v_index_cold": {k: _r(cold["t2v"].get(k), 3) for k in ("key_s", "build_s", "save_s")},
                  "t2v_index_warm": {k: _r(warm["t2v"].get(k), 3) for k in ("key_s", "load_s")},
                  "warm_reused": warm["t2v"]["status"] == "reused", "t2v_index_bytes": index_bytes,
                  "same_ranks": cold["ranks"] == warm["ranks"]}
    return res


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test in seconds")
    ap.add_argument("--gallery", type=int, help="gallery vectors (default 100000; quick 5000)")
    ap.add_argument("--queries", type=int, help="queries (default 1000; quick 200)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=0.5, help="query noise norm (cos to target ~0.89)")
    ap.add_argument("--hard-noise", default="1.5,3.0", help="extra noise levels, quality only ('' for none)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--k", type=int, default=10, help="candidates per query from a faiss index (SearchConfig.k)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--nlist", type=int, help="IVF cells (default 1024; quick 64)")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--metric-n", type=int, help="queries = videos for the metrics part (default 10000; quick 2000)")
    ap.add_argument("--metric-noise", type=float, default=5.0, help="query noise in the metrics part")
    ap.add_argument("--repeats", type=int, help="timing rounds, median reported (default 3; quick 1)")
    ap.add_argument("--parts", default="search,metrics,index_cache")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.child:
        print(json.dumps(metric_child(args.child, args.metric_n, args.dim, args.metric_noise, args.tracemalloc)))
        return 0
    args.modes = [m for m in args.modes.split(",") if m]
    args.hard_noise = [float(x) for x in args.hard_noise.split(",") if x]
    import faiss  # torch is not imported (only its version read): it would only add memory

    t_start = time.perf_counter()
    result: dict = {
        "benchmark": "retrieval",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "faiss": getattr(faiss, "__version__", None),
                    "faiss_omp_threads": faiss.omp_get_max_threads(), "torch": importlib.metadata.version("torch"),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "tracemalloc")},
    }
    parts = args.parts.split(",")
    if "search" in parts:
        result["search"] = search_benchmark(args)
    if "metrics" in parts:
        result["metrics"] = metrics_benchmark(args)
    if "index_cache" in parts:
        result["index_cache"] = index_cache_benchmark(args)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
