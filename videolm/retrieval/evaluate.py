"""Text-to-video retrieval evaluation of a pretrained model (``videolm eval-retrieval``).

Path: manifest split -> queries (text) and gallery (videos with features) ->
pooled dual-encoder vectors (``model.text_embedding`` / ``video_embedding``) ->
``search`` (exact or faiss) -> optional cross-encoder re-ranking of each
query's top K (``model.align_score``, UniVL's FT-Align) -> ranks -> metrics
with bootstrap intervals, both directions:

* ``t2v``: every query text ranks the split's videos;
* ``v2t``: every video that has a query ranks all query texts (with several
  captions per video, its best-ranked caption counts; see ``metrics``).

Queries (``query_mode``):

* ``video`` (default): one per video, the caption of kind ``query`` when the
  manifest marks one (e.g. MSR-VTT 1k-A's sentence), else its captions
  (kind ``caption`` or unset) joined in time order, as in training; captions
  that all share one time span are alternatives, and the first one is used;
* ``caption``: every caption is its own query (MSR-VTT "full" protocol).

Subtitles and ASR lines are not descriptions and never become queries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, VideolmError
from ..features.shards import FeatureStore
from ..manifests.manifest import VideoEntry
from .metrics import GroundTruth, bootstrap_ci, rank_and_ties, summarize
from ..quantize.kmeans import TOKEN_OFFSET
from .search import SearchConfig, SearchResult, returned_hits, search

log = logging.getLogger("videolm.retrieval.evaluate")
QUERY_MODES = ("video", "caption")
DESCRIPTION_KINDS = (None, "caption")
DIRECTIONS = ("t2v", "v2t")


class EvalError(VideolmError, ValueError):
    """Evaluation cannot run on this input; the message says why."""


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

    def __post_init__(self):
        if self.query_mode not in QUERY_MODES:
            raise ConfigError(f"query mode must be one of {', '.join(QUERY_MODES)}, got {self.query_mode!r}")
        if self.rerank_top < 0 or self.batch_size < 1 or self.bootstrap < 1 or self.top < 1:
            raise ConfigError("rerank_top must be >= 0; batch_size, bootstrap and top >= 1")


# --------------------------------------------------------------------------- queries

@dataclass
class QuerySet:
    video_ids: list[str]  # the gallery, in manifest order
    texts: list[str]  # one per query
    keys: list[str]  # "<video_id>" (video mode) or "<video_id>#<n>" (caption mode)
    targets: np.ndarray  # gallery index of each query's video
    missing: list[str] = field(default_factory=list)  # split videos without features
    no_query: int = 0  # gallery videos without any description
    empty: list[str] = field(default_factory=list)  # keys of queries with blank text, left out

    def t2v_truth(self) -> GroundTruth:
        return GroundTruth.single(self.targets)

    def v2t(self) -> tuple[np.ndarray, GroundTruth]:
        """(gallery indices that have queries, their correct query indices)."""
        # One stable sort groups each video's queries (in query order); no scan per video.
        order = np.argsort(self.targets, kind="stable")
        queried, counts = np.unique(self.targets[order], return_counts=True)
        indptr = np.zeros(len(queried) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return queried, GroundTruth(indptr, order.astype(np.int64))


def build_queries(entries: list[VideoEntry], store: FeatureStore, mode: str) -> QuerySet:
    gallery = [e for e in entries if e.video_id in store]
    missing = [e.video_id for e in entries if e.video_id not in store]
    if not gallery:
        raise EvalError(f"none of the {len(entries)} videos of the split have features in {store.directory}")
    qs = QuerySet([e.video_id for e in gallery], [], [], np.zeros(0, np.int64), missing)
    targets = []
    for vi, e in enumerate(gallery):
        caps = sorted(e.captions, key=lambda c: (c.start, c.end))
        marked = [c for c in caps if c.kind == "query"]
        described = [c for c in caps if c.kind in DESCRIPTION_KINDS]
        if mode == "video":
            if len({(c.start, c.end) for c in described}) == 1:
                # Captions sharing one time span (MSR-VTT's 20 sentences) are alternative
                # descriptions, not a sequence: the first one (manifest order) is the query.
                described = described[:1]
            chosen = marked[:1] or described
            pool = [(e.video_id, " ".join(c.text.strip() for c in chosen))] if chosen else []
        else:
            pool = [(f"{e.video_id}#{n}", c.text) for n, c in enumerate(marked + described)]
        if not pool:
            qs.no_query += 1
        for key, text in pool:
            if not text.strip():
                qs.empty.append(key)
                continue
            qs.texts.append(text.strip())
            qs.keys.append(key)
            targets.append(vi)
    qs.targets = np.asarray(targets, dtype=np.int64)
    if missing:
        log.warning("%d of %d split videos have no features and are left out of the gallery, e.g. %s",
                    len(missing), len(entries), ", ".join(missing[:5]))
    if qs.empty:
        log.warning("%d quer%s with empty text left out: %s", len(qs.empty), "y" if len(qs.empty) == 1 else "ies",
                    ", ".join(qs.empty[:5]))
    if not qs.texts:
        raise EvalError(f"no queries: none of the {len(gallery)} videos has a non-empty caption "
                        "(kind 'caption', 'query' or unset)")
    return qs


# --------------------------------------------------------------------------- encoding

def _video_batch(store: FeatureStore, video_ids: list[str], max_frames: int, tokens: bool):
    feats = [store.get(v) for v in video_ids]
    picks = []
    for f in feats:  # longer than the model's window: an even spread of clips over the whole video
        n = len(f.features)
        picks.append(np.arange(n) if n <= max_frames else np.linspace(0, n - 1, max_frames).round().astype(int))
    T = max(len(p) for p in picks)
    video = torch.zeros(len(feats), T, feats[0].features.shape[1])
    mask = torch.zeros(len(feats), T, dtype=torch.bool)
    toks = torch.zeros(len(feats), T, dtype=torch.long) if tokens else None
    for i, (f, p) in enumerate(zip(feats, picks)):
        video[i, : len(p)] = torch.from_numpy(np.asarray(f.features[p], dtype=np.float32))
        mask[i, : len(p)] = True
        if tokens:
            if f.tokens is None:
                raise EvalError(f"the model reads visual words but {f.video_id} has none: "
                                f"run `videolm quantize --features {store.directory}`")
            toks[i, : len(p)] = torch.from_numpy(np.asarray(f.tokens[p], dtype=np.int64)) + TOKEN_OFFSET
    return video, mask, toks


class PairEncoder:
    """Runs a model's encoders in batches, with its tokenizer and limits."""

    def __init__(self, model, tokenizer, store: FeatureStore, batch_size: int = 64, device: str = "cpu"):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.batch_size, self.device = batch_size, torch.device(device)
        cfg = model.cfg
        self.max_frames, self.max_text_len = cfg.max_frames, cfg.max_text_len
        self.tokens = cfg.video_input == "tokens"
        if not self.tokens and cfg.feature_dim != store.dim:
            raise EvalError(f"the checkpoint expects {cfg.feature_dim}-d clip features but {store.directory} "
                            f"holds {store.dim}-d ones (extracted with another encoder?)")
        if self.tokens:
            book = store.codebook_attrs
            if book is None:
                raise EvalError(f"the model reads visual words but {store.directory} has no codebook: run "
                                f"`videolm quantize --features {store.directory}` with the training k/levels")
            if int(book["model_vocab_size"]) != cfg.visual_vocab:
                raise EvalError(f"the model has a visual vocabulary of {cfg.visual_vocab} ids but the codebook of "
                                f"{store.directory} gives {book['model_vocab_size']}; quantise with the training k/levels")

    def text_states(self, texts: list[str]):
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].bool().to(self.device)
        return self.model.encode_text(ids, mask), mask

    def video_states(self, video_ids: list[str]):
        video, mask, toks = _video_batch(self.store, video_ids, self.max_frames, self.tokens)
        mask = mask.to(self.device)
        return self.model.encode_video(mask, video.to(self.device), None if toks is None else toks.to(self.device)), mask

    @torch.inference_mode()
    def _embed(self, items: list[str], states, pool, progress) -> np.ndarray:
        out = []
        for a in range(0, len(items), self.batch_size):
            h, m = states(items[a : a + self.batch_size])
            out.append(pool(h, m).float().cpu().numpy())
            if progress is not None:
                progress.update(len(h))
        return np.concatenate(out)

    def embed_texts(self, texts: list[str], progress=None) -> np.ndarray:
        return self._embed(texts, self.text_states, self.model.text_embedding, progress)

    def embed_videos(self, video_ids: list[str], progress=None) -> np.ndarray:
        return self._embed(video_ids, self.video_states, self.model.video_embedding, progress)

    @torch.inference_mode()
    def align_scores(self, texts: list[str], video_ids: list[str]) -> np.ndarray:
        """Cross-encoder alignment score of each (text, video) pair.

        Re-ranking sends each query with its K candidates, so within a batch every
        distinct text and video is encoded once and its states repeated per pair.
        """
        out = []
        for a in range(0, len(texts), self.batch_size):
            t_uniq, t_idx = np.unique(np.asarray(texts[a : a + self.batch_size], dtype=object), return_inverse=True)
            v_uniq, v_idx = np.unique(np.asarray(video_ids[a : a + self.batch_size], dtype=object),
                                      return_inverse=True)
            th, tm = self.text_states(list(t_uniq))
            vh, vm = self.video_states(list(v_uniq))
            t_idx, v_idx = torch.as_tensor(t_idx, device=th.device), torch.as_tensor(v_idx, device=vh.device)
            ct, _ = self.model.cross(th[t_idx], tm[t_idx], vh[v_idx], vm[v_idx])
            out.append(self.model.align_score(ct[:, 0]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


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
                        result.gt_not_returned)


# --------------------------------------------------------------------------- evaluation

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
                        pair_scores=None) -> tuple[dict, dict]:
    """Search, optional re-rank and metrics for both directions from precomputed vectors.

    ``pair_scores(text_indices, video_indices) -> scores`` is the cross
    encoder (needed when ``cfg.rerank_top``). Returns (report part, results by direction).
    """
    top = max(cfg.top, cfg.rerank_top)
    gt = qs.t2v_truth()
    results = {"t2v": search(text_vecs, video_vecs, gt, cfg.search, top)}
    queried, gt_v = qs.v2t()
    results["v2t"] = search(video_vecs[queried], text_vecs, gt_v, cfg.search, top)
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
