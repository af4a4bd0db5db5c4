"""Temporal IoU and span decoding from start/end distributions, as HERO decodes VSM's heads.

HERO (Li et al. 2020; linjieli222/HERO ``eval_vcmr.py``, ``utils/tvr_eval_utils.py``)
scores a span from clip ``m`` to clip ``n`` of a video as ``p_start[m] * p_end[n]``,
each a softmax over the video's clips, and keeps only spans with ``m <= n`` and a
length inside limits (an upper-triangular band of the ``(T, T)`` product). For
video-corpus moment retrieval (VCMR) each of a query's top videos weighs its spans
by ``exp(alpha * video_score)``, with ``video_score`` the query-video cosine
(HERO: ``q2c_alpha = 20`` over the top ``max_vcmr_video = 100`` videos), and
the spans of all those videos are ranked together. Non-maximum suppression per
video (HERO: ``nms_thd = 0.5``) then drops spans that overlap a better one.

Lengths here are in clips, ``n - m + 1``: HERO's ``min_pred_l = 2, max_pred_l =
16`` (limits on ``n - m``, the upper one exclusive) are ``min_len = 3, max_len = 16``.
Times come from the clips' own start and end times, not from a fixed interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpanConfig:
    min_len: int = 1  # clips; HERO's TVR setting is 3 (min_pred_l = 2), see docs/moments.md
    max_len: int = 16  # clips; HERO: 16
    alpha: float = 20.0  # VCMR: a video's spans are weighed by exp(alpha * video score) (HERO's q2c_alpha)
    top_videos: int = 100  # VCMR: spans are drawn from the query's top videos only (HERO's max_vcmr_video)
    before_nms: int = 200  # spans kept before suppression (HERO's max_before_nms)
    nms_iou: float | None = 0.5  # suppress a span overlapping a better one of the same video above this; None: off
    top_n: int = 100  # spans kept per query (HERO's max_after_nms; TVR scores R@100)

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"span lengths need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1] or None, got {self.nms_iou}")
        if min(self.top_videos, self.before_nms, self.top_n) < 1:
            raise ValueError("top_videos, before_nms and top_n must be >= 1")


def temporal_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of each span of ``pred`` (..., 2) with ``gt`` (2,) or (..., 2), in [0, 1]; 0 where the union is empty."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    inter = np.clip(np.minimum(pred[..., 1], gt[..., 1]) - np.maximum(pred[..., 0], gt[..., 0]), 0, None)
    union = (pred[..., 1] - pred[..., 0]) + (gt[..., 1] - gt[..., 0]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def length_mask(n_clips: int, min_len: int, max_len: int) -> np.ndarray:
    """(T, T) bool: span (start m, end n) allowed when m <= n and ``min_len <= n - m + 1 <= max_len``."""
    offset = np.arange(n_clips)[None, :] - np.arange(n_clips)[:, None]  # n - m
    return (offset >= min_len - 1) & (offset <= max_len - 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; -inf entries get probability 0."""
    x = np.asarray(logits, np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def span_scores(p_start: np.ndarray, p_end: np.ndarray, cfg: SpanConfig) -> np.ndarray:
    """(T, T) ``p_start[m] * p_end[n]`` on allowed spans, 0 elsewhere."""
    return np.outer(p_start, p_end) * length_mask(len(p_start), cfg.min_len, cfg.max_len)


def top_cells(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices, values) of the ``n`` highest positive entries of ``scores``, best first (ties: lower index)."""
    flat = scores.ravel()
    n = min(n, int((flat > 0).sum()))
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    part = np.argpartition(-flat, n - 1)[:n] if n < len(flat) else np.arange(len(flat))
    order = part[np.lexsort((part, -flat[part]))]
    return order, flat[order]


def nms(spans: np.ndarray, scores: np.ndarray, iou: float | None, keep: int) -> np.ndarray:
    """Indices (into ``spans`` (N, 2), sorted best first) of the spans left after greedy suppression."""
    if iou is None:
        return np.arange(min(keep, len(spans)))
    kept: list[int] = []
    for i in range(len(spans)):
        if len(kept) == keep:
            break
        if not kept or (temporal_iou(spans[kept], spans[i]) <= iou).all():
            kept.append(i)
    return np.asarray(kept, np.int64)


def decode_spans(p_start: np.ndarray, p_end: np.ndarray, times: np.ndarray, cfg: SpanConfig) -> dict:
    """A video's top spans (SVMR): ``{"clips": (K, 2) first/last clip, "seconds": (K, 2), "scores": (K,)}``.

    ``times`` (T, 2) holds each clip's start and end in seconds; a span runs from
    its first clip's start to its last clip's end.
    """
    T = len(p_start)
    idx, vals = top_cells(span_scores(p_start, p_end, cfg), cfg.before_nms)
    clips = np.stack([idx // T, idx % T], 1)
    seconds = np.stack([times[clips[:, 0], 0], times[clips[:, 1], 1]], 1)
    kept = nms(seconds, vals, cfg.nms_iou, cfg.top_n)
    return {"clips": clips[kept], "seconds": seconds[kept], "scores": vals[kept]}


def corpus_spans(video_scores: np.ndarray, probs_of, times: list[np.ndarray], cfg: SpanConfig) -> dict:
    """A query's top (video, span) pairs over the corpus (VCMR), HERO's way.

    ``video_scores`` (V,) query-video scores; ``probs_of(v)`` the (start, end)
    distributions over video v's clips (asked for the top videos only), ``times[v]`` its (T_v, 2) clip times. Spans of
    the top ``top_videos`` videos score ``p_start * exp(alpha * score) * p_end``; the
    best ``before_nms`` over all of them are suppressed per video and the first
    ``top_n`` kept. Returns ``{"videos": (K,), "clips", "seconds", "scores"}``.
    """
    top = np.argsort(-video_scores, kind="stable")[: cfg.top_videos]
    weight = np.exp(cfg.alpha * (video_scores[top] - video_scores[top[0]]))  # relative: exp stays finite
    cand_v, cand_c, cand_s = [], [], []
    for v, w in zip(top, weight):
        p_start, p_end = probs_of(v)
        T = len(p_start)
        idx, vals = top_cells(span_scores(p_start, p_end, cfg) * w, cfg.before_nms)
        cand_v.append(np.full(len(idx), v))
        cand_c.append(np.stack([idx // T, idx % T], 1))
        cand_s.append(vals)
    videos, clips, scores = np.concatenate(cand_v), np.concatenate(cand_c), np.concatenate(cand_s)
    order = np.lexsort((np.arange(len(scores)), -scores))[: cfg.before_nms]
    videos, clips, scores = videos[order], clips[order], scores[order]
    seconds = np.stack([np.array([times[v][c[0], 0], times[v][c[1], 1]]) for v, c in zip(videos, clips)]) \
        if len(videos) else np.zeros((0, 2))
    kept = _nms_per_video(videos, seconds, scores, cfg)
    return {"videos": videos[kept], "clips": clips[kept], "seconds": seconds[kept], "scores": scores[kept]}


def _nms_per_video(videos: np.ndarray, seconds: np.ndarray, scores: np.ndarray, cfg: SpanConfig) -> np.ndarray:
    """Indices (best first) left when each video's spans are suppressed on their own, the first ``top_n``."""
    if cfg.nms_iou is None:
        return np.arange(min(cfg.top_n, len(videos)))
    kept = []
    for v in np.unique(videos):
        mine = np.flatnonzero(videos == v)  # already best first
        kept.extend(mine[nms(seconds[mine], scores[mine], cfg.nms_iou, cfg.top_n)])
    kept = np.asarray(sorted(kept, key=lambda i: (-scores[i], i)), np.int64)
    return kept[: cfg.top_n]
