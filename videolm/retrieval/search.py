"""Nearest-neighbour search over a gallery of vectors, with one rank per query (see ``metrics``).

Modes (``SearchConfig.mode``):

* ``exact``: inner products in chunks of queries (never the whole matrix at
  once), ranks counted exactly; the only mode that supports dual softmax.
* ``faiss-flat``: faiss ``IndexFlatIP``, exact inner products with faiss' own
  kernels; gives the exact path's ranks and lists.
* ``faiss-ivf``: ``IndexIVFFlat`` (inverted lists over k-means cells, ``nlist``
  cells, ``nprobe`` visited per query), approximate.
* ``faiss-hnsw``: ``IndexHNSWFlat`` (graph with ``hnsw_m`` links per node,
  ``ef_search`` candidates explored per query), approximate.

An index returns each query's ``k`` best candidates. When the ground truth is
among them, its rank is 1 + the returned candidates scoring strictly higher.
When it is not, the index missed it or it ranks below ``k``: the query is
scored exactly against the whole gallery and gets rank ``max(exact rank, k + 1)``,
so an approximate index's miss counts as a miss for R@K while MedR/MnR stay
close to exact. The number of such queries is reported (``gt_not_returned``).

Lists are ordered by score, then by candidate index, so ties do not make
results depend on the backend.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConfigError
from .metrics import GroundTruth, _clean, rank_and_ties, ranks_from_scores

SEARCH_MODES = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")


@dataclass(frozen=True)
class SearchConfig:
    mode: str = "exact"
    k: int = 100  # candidates an index returns per query (faiss modes)
    nlist: int = 0  # IVF cells; 0: 4 * sqrt(gallery size), at most gallery / 39 (faiss' training minimum)
    nprobe: int = 32  # IVF cells visited per query
    hnsw_m: int = 32  # HNSW links per node
    ef_construction: int = 80
    ef_search: int = 128
    chunk: int = 1024  # queries scored at once in the exact path (fewer for big galleries, see _chunk_rows)
    dsl: bool = False  # dual softmax over queries (exact mode only)
    dsl_temperature: float = 100.0  # inverse temperature of the dual softmax prior
    threads: int = 0  # faiss threads; 0 keeps faiss' default

    def __post_init__(self):
        if self.mode not in SEARCH_MODES:
            raise ConfigError(f"search must be one of {', '.join(SEARCH_MODES)}, got {self.mode!r}")
        if self.dsl and self.mode != "exact":
            raise ConfigError("dual softmax (--dsl) re-weights every score by all queries' scores; "
                              "it needs --search exact")
        if min(self.k, self.nprobe, self.hnsw_m, self.ef_search, self.chunk) < 1 or self.nlist < 0:
            raise ConfigError("search k, nprobe, hnsw_m, ef_search and chunk must be >= 1 (nlist >= 0)")


@dataclass
class SearchResult:
    ranks: np.ndarray  # (n_queries,) 1-based, see metrics
    ties: np.ndarray  # (n_queries,) wrong candidates scoring exactly like the ground truth
    top_ids: np.ndarray  # (n_queries, top) candidate indices, best first (-1 past the gallery)
    top_scores: np.ndarray  # (n_queries, top)
    seconds: dict = field(default_factory=dict)  # build / search / rank times
    params: dict = field(default_factory=dict)  # what was searched with (goes into the report)
    gt_not_returned: int = 0
    index: dict | None = None  # faiss modes: built or reused, and the seconds of each step (``index_cache``)


def _sorted_top(scores: np.ndarray, ids: np.ndarray | None, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `top` per row of `scores` (candidate ids `ids`, or column indices), by score then id."""
    n, m = scores.shape
    if ids is None:
        ids = np.broadcast_to(np.arange(m), (n, m))
    if top < m:  # argpartition by score; ties at the cut resolved by id below
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
    order = np.lexsort((ids, -scores), axis=1)
    out_ids = np.full((n, top), -1, dtype=np.int64)
    out_scores = np.full((n, top), -np.inf, dtype=np.float32)
    w = min(top, ids.shape[1])
    out_ids[:, :w] = np.take_along_axis(ids, order, 1)[:, :w]
    out_scores[:, :w] = np.take_along_axis(scores, order, 1)[:, :w]
    return out_ids, out_scores


CHUNK_ELEMENTS = 16_000_000  # scores per exact chunk: ~64 MB, plus ~4x that in sort/partition temporaries


def _chunk_rows(cfg: SearchConfig, n_gallery: int) -> int:
    """Queries per exact chunk: `cfg.chunk`, fewer when the gallery is large, so memory does not grow with it."""
    return max(1, min(cfg.chunk, CHUNK_ELEMENTS // max(1, n_gallery)))


def _dsl_log_norm(queries: np.ndarray, gallery: np.ndarray, cfg: SearchConfig) -> np.ndarray:
    """Per-candidate log-sum-exp over all queries of temperature * score (first pass of dual softmax)."""
    lse = np.full(len(gallery), -np.inf)
    rows = _chunk_rows(cfg, len(gallery))
    for a in range(0, len(queries), rows):
        s = cfg.dsl_temperature * _clean(queries[a : a + rows] @ gallery.T).astype(np.float64)
        lse = np.logaddexp(lse, np.logaddexp.reduce(s, axis=0))
    return lse


def score_chunks(queries: np.ndarray, gallery: np.ndarray, cfg: SearchConfig):
    """Yield (first query, (chunk, n_gallery) scores), dual softmax applied when asked."""
    lse = _dsl_log_norm(queries, gallery, cfg) if cfg.dsl else None
    rows = _chunk_rows(cfg, len(gallery))
    for a in range(0, len(queries), rows):
        s = _clean(queries[a : a + rows] @ gallery.T)
        if lse is not None:
            # CAMoE's dual softmax: each score times the probability that this
            # candidate picks this query among all queries.
            s = (s * np.exp(cfg.dsl_temperature * s.astype(np.float64) - lse)).astype(np.float32)
        yield a, s


def exact_search(queries: np.ndarray, gallery: np.ndarray, gt: GroundTruth, cfg: SearchConfig,
                 top: int = 10) -> SearchResult:
    t0 = time.perf_counter()
    n = len(queries)
    ranks, ties = np.zeros(n, np.int64), np.zeros(n, np.int64)
    top_ids = np.zeros((n, top), np.int64)
    top_scores = np.zeros((n, top), np.float32)
    for a, s in score_chunks(queries, gallery, cfg):
        b = a + len(s)
        ranks[a:b], ties[a:b] = ranks_from_scores(s, gt.rows(a, b))
        top_ids[a:b], top_scores[a:b] = _sorted_top(s, None, top)
    params = {"mode": "exact", "dsl": cfg.dsl}
    if cfg.dsl:
        params["dsl_temperature"] = cfg.dsl_temperature
    return SearchResult(ranks, ties, top_ids, top_scores, {"search": time.perf_counter() - t0}, params)


def build_params(cfg: SearchConfig, n: int) -> dict:
    """What a built index depends on besides the gallery's vectors (``index_cache`` keys on them).

    Search-time settings (``nprobe``, ``ef_search``) are left out: ``tune_index`` sets them
    on a built or a loaded index alike, so changing them does not need a new index.
    """
    if cfg.mode == "faiss-ivf":
        nlist = cfg.nlist or int(4 * math.sqrt(n))
        return {"nlist": max(1, min(nlist, n // 39))}  # faiss warns below 39 training points per cell
    if cfg.mode == "faiss-hnsw":
        return {"hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction}
    return {}


def new_index(gallery: np.ndarray, cfg: SearchConfig):
    """A faiss inner-product index over `gallery`, trained and filled; not yet tuned for searching."""
    import faiss

    x = np.ascontiguousarray(gallery, dtype=np.float32)
    n, d = x.shape
    p = build_params(cfg, n)
    if cfg.mode == "faiss-flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.mode == "faiss-ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    else:
        index = faiss.IndexHNSWFlat(d, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
    index.add(x)
    return index


def tune_index(index, cfg: SearchConfig) -> dict:
    """Set the search-time settings on a built or loaded index; returns every parameter (for the report)."""
    params = build_params(cfg, index.ntotal)
    if cfg.mode == "faiss-ivf":
        index.nprobe = min(cfg.nprobe, params["nlist"])
        params["nprobe"] = index.nprobe
    elif cfg.mode == "faiss-hnsw":
        index.hnsw.efSearch = max(cfg.ef_search, cfg.k)
        params["ef_search"] = index.hnsw.efSearch
    return params


def build_index(gallery: np.ndarray, cfg: SearchConfig):
    """A faiss inner-product index over `gallery`, ready to search; returns (index, params)."""
    index = new_index(gallery, cfg)
    return index, tune_index(index, cfg)


def returned_hits(ids: np.ndarray, gt: GroundTruth) -> np.ndarray:
    """(n_queries, k) bool: which returned candidates are correct for their query."""
    rows = np.repeat(np.arange(len(gt)), np.diff(gt.indptr))
    per_answer = ids[rows] == gt.indices[:, None]  # one row per (query, correct candidate)
    return np.logical_or.reduceat(per_answer, gt.indptr[:-1], axis=0)


def _obtain_index(gallery: np.ndarray, cfg: SearchConfig, index_for) -> tuple[object, dict, dict]:
    """(index ready to search, params, how it was obtained): built here, or from ``index_for`` (a cache)."""
    if index_for is None:
        t0 = time.perf_counter()
        index, params = build_index(gallery, cfg)  # looked up at each call: the benchmark memoises it
        return index, params, {"status": "built", "build_s": time.perf_counter() - t0}
    index, record = index_for(gallery, cfg)
    return index, tune_index(index, cfg), record


def index_search(queries: np.ndarray, gallery: np.ndarray, gt: GroundTruth, cfg: SearchConfig,
                 top: int = 10, index_for=None) -> SearchResult:
    import faiss

    before = faiss.omp_get_max_threads()
    if cfg.threads:  # for this search only; the process keeps its own setting
        faiss.omp_set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        index, params, record = _obtain_index(gallery, cfg, index_for)
        t1 = time.perf_counter()
        k = min(max(cfg.k, top), len(gallery))
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        t2 = time.perf_counter()
    finally:
        faiss.omp_set_num_threads(before)
    scores = np.where(ids < 0, -np.inf, _clean(scores)).astype(np.float32)  # -1: fewer than k found
    hit = returned_hits(ids, gt)
    found = hit.any(1)
    best = np.where(hit, scores, -np.inf).max(1)
    ranks, ties = rank_and_ties(scores, best, hit)
    missed = np.flatnonzero(~found)
    if len(missed):  # score those queries exactly against the whole gallery
        sub = GroundTruth.from_lists([gt.of(q) for q in missed])
        step = _chunk_rows(cfg, len(gallery))
        for a in range(0, len(missed), step):
            rows = missed[a : a + step]
            r, t = ranks_from_scores(queries[rows] @ gallery.T, sub.rows(a, a + len(rows)))
            ranks[rows], ties[rows] = np.maximum(r, k + 1), t
    top_ids, top_scores = _sorted_top(scores, ids, top)
    t3 = time.perf_counter()
    params = {"mode": cfg.mode, "k": k, **params}
    seconds = {"build": record.get("build_s", 0.0), "search": t2 - t1, "rank": t3 - t2}
    if "load_s" in record:
        seconds["load"] = record["load_s"]
    return SearchResult(ranks, ties, top_ids, top_scores, seconds, params, len(missed),
                        {**record, "index_s": t1 - t0})


def search(queries: np.ndarray, gallery: np.ndarray, gt: GroundTruth, cfg: SearchConfig = SearchConfig(),
           top: int = 10, index_for=None) -> SearchResult:
    """Rank `gallery` rows for each of `queries` by inner product; see the module docstring.

    ``index_for(gallery, cfg) -> (index, record)`` supplies the faiss index instead of
    building one here (``index_cache``: a saved one, when it is for these very vectors).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} must be 2-d with the same width")
    if len(gt) != len(queries):
        raise ValueError(f"ground truth for {len(gt)} queries, got {len(queries)} queries")
    if len(gt.indices) and (gt.indices.min() < 0 or gt.indices.max() >= len(gallery)):
        raise ValueError("ground-truth index outside the gallery")
    if cfg.mode == "exact":
        return exact_search(queries, gallery, gt, cfg, top)
    return index_search(queries, gallery, gt, cfg, top, index_for)


def config_dict(cfg: SearchConfig) -> dict:
    return asdict(cfg)
