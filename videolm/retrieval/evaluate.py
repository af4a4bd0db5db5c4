"""Scoring a retrieval evaluation from text and video vectors: search, re-ranking, metrics.

Path: queries and gallery (``queries``) -> pooled dual-encoder vectors
(``encoding.PairEncoder``, or a baseline's) -> ``search`` (exact or faiss) ->
optional cross-encoder re-ranking of each query's top K (``model.align_score``,
UniVL's FT-Align) -> ranks -> metrics with bootstrap intervals, both directions:

* ``t2v``: every query text ranks the split's videos;
* ``v2t``: every video that has a query ranks all query texts (with several
  captions per video, its best-ranked caption counts; see ``metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .index_cache import CACHE_MODES
from .metrics import GroundTruth, bootstrap_ci, rank_and_ties, summarize
from .protocols import settings
from .queries import QUERY_MODES, QuerySet
from .search import SearchConfig, SearchResult, returned_hits, search

DIRECTIONS = ("t2v", "v2t")


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"
    query_mode: str = "video"
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank_top: int = 0  # re-rank each query's top K with the cross encoder; 0: off
    batch_size: int = 64
    device: str = "cpu"
    bootstrap: int = 1000  # resamples for the 95% intervals
    seed: int = 0
    top: int = 10  # list length written per query
    index_cache: str = "auto"  # faiss-ivf/hnsw indexes saved beside the features and reused (index_cache.py)
    protocol: str | None = None  # a named protocol (protocols.py); split and query_mode must agree with it

    def __post_init__(self):
        if self.query_mode not in QUERY_MODES:
            raise ConfigError(f"query mode must be one of {', '.join(QUERY_MODES)}, got {self.query_mode!r}")
        if self.protocol is not None:
            settings(self.protocol, self.split, self.query_mode)  # raises on an unknown name or a contradiction
        if self.index_cache not in CACHE_MODES:
            raise ConfigError(f"index cache must be one of {', '.join(CACHE_MODES)}, got {self.index_cache!r}")
        if self.rerank_top < 0 or self.batch_size < 1 or self.bootstrap < 1 or self.top < 1:
            raise ConfigError("rerank_top must be >= 0; batch_size, bootstrap and top >= 1")


def rerank(result: SearchResult, gt: GroundTruth, k: int, pair_scores) -> SearchResult:
    """Re-order each query's first `k` candidates by ``pair_scores(queries, candidates)``.

    A ground truth inside the top k gets 1 + the number of top-k candidates the
    cross encoder scores strictly higher; one outside keeps its rank (> k).
    """
    k = min(k, result.top_ids.shape[1])
    ids = result.top_ids[:, :k]
    valid = ids >= 0
    qi, ci = np.nonzero(valid)
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    scores[qi, ci] = pair_scores(qi, ids[qi, ci])
    hit = returned_hits(ids, gt) & valid
    found = hit.any(1)
    best = np.where(hit, scores, -np.inf).max(1)
    new_ranks, new_ties = rank_and_ties(scores, best, hit | ~valid)
    ranks = np.where(found, new_ranks, result.ranks)
    ties = np.where(found, new_ties, result.ties)
    order = np.lexsort((ids, -scores), axis=1)
    top_ids, top_scores = result.top_ids.copy(), result.top_scores.copy()
    top_ids[:, :k] = np.take_along_axis(ids, order, 1)
    top_scores[:, :k] = np.take_along_axis(scores, order, 1)
    return SearchResult(ranks, ties, top_ids, top_scores, result.seconds, {**result.params, "rerank_top": k},
                        result.gt_not_returned, result.index)


def direction_report(result: SearchResult, keys: list[str], cfg: EvalConfig) -> dict:
    return {
        "metrics": summarize(result.ranks),
        "ci95": bootstrap_ci(result.ranks, n_boot=cfg.bootstrap, seed=cfg.seed),
        "n_queries": len(result.ranks),
        "queries_with_ties": int((result.ties > 0).sum()),
        "gt_not_returned": result.gt_not_returned,
        "per_query": {"keys": list(keys), "ranks": result.ranks.tolist()},
    }


def evaluate_embeddings(qs: QuerySet, text_vecs: np.ndarray, video_vecs: np.ndarray, cfg: EvalConfig,
                        pair_scores=None, cache=None) -> tuple[dict, dict]:
    """Search, optional re-rank and metrics for both directions from precomputed vectors.

    ``pair_scores(text_indices, video_indices) -> scores`` is the cross
    encoder (needed when ``cfg.rerank_top``); ``cache`` an ``index_cache.IndexCache``
    for the faiss indexes (None: built every time). Returns (report part, results by direction).
    """
    top = max(cfg.top, cfg.rerank_top)
    gt = qs.t2v_truth()
    index_for = {"t2v": None, "v2t": None}
    if cache is not None:  # t2v searches the videos, v2t the query texts
        index_for = {"t2v": cache.index_for("videos", qs.video_ids), "v2t": cache.index_for("texts", qs.keys)}
    results = {"t2v": search(text_vecs, video_vecs, gt, cfg.search, top, index_for["t2v"])}
    queried, gt_v = qs.v2t()
    results["v2t"] = search(video_vecs[queried], text_vecs, gt_v, cfg.search, top, index_for["v2t"])
    if cfg.rerank_top:
        if pair_scores is None:
            raise ConfigError("re-ranking needs a model with a cross encoder")
        results["t2v"] = rerank(results["t2v"], gt, cfg.rerank_top, lambda q, c: pair_scores(q, c))
        results["v2t"] = rerank(results["v2t"], gt_v, cfg.rerank_top, lambda q, c: pair_scores(c, queried[q]))
    keys = {"t2v": qs.keys, "v2t": [qs.video_ids[v] for v in queried]}
    part = {d: direction_report(results[d], keys[d], cfg) for d in DIRECTIONS}
    return part, results


def rankings_rows(qs: QuerySet, results: dict) -> list[dict]:
    """One JSON-able row per query and direction: its top list and the right answer's rank."""
    rows = []
    queried, gt_v = qs.v2t()
    r = results["t2v"]
    for q, key in enumerate(qs.keys):
        rows.append({"direction": "t2v", "query": key, "text": qs.texts[q], "target": [qs.video_ids[qs.targets[q]]],
                     "rank": int(r.ranks[q]), "ties": int(r.ties[q]),
                     "top": [{"id": qs.video_ids[i], "score": round(float(s), 6)}
                             for i, s in zip(r.top_ids[q], r.top_scores[q]) if i >= 0]})
    r = results["v2t"]
    for q, v in enumerate(queried):
        rows.append({"direction": "v2t", "query": qs.video_ids[v], "target": [qs.keys[t] for t in gt_v.of(q)],
                     "rank": int(r.ranks[q]), "ties": int(r.ties[q]),
                     "top": [{"id": qs.keys[i], "score": round(float(s), 6)}
                             for i, s in zip(r.top_ids[q], r.top_scores[q]) if i >= 0]})
    return rows
