"""Moment-retrieval metrics as TVR reports them: R@K at temporal IoU thresholds, plus mean IoU.

The rule (TVR's ``eval_by_task_type``, Lei et al. 2020): a query counts at R@K for
IoU ``θ`` when at least one of its first K predictions names the right video and
overlaps the true span with IoU >= θ. For SVMR every prediction is in the right
video; for VCMR a span in another video never counts, whatever its times.

Here each query gets a *hit rank* per threshold: the 1-based position of its first
correct prediction (``MISS`` when none of its predictions is correct), so
``R@K = mean(hit_rank <= K)`` and the bootstrap of ``retrieval.metrics`` applies
unchanged. Mean IoU is the IoU of each query's top prediction (0 when it names
another video or there is none), averaged over queries.
"""

from __future__ import annotations

import numpy as np

from ..retrieval.metrics import bootstrap_ci, summarize
from .spans import temporal_iou

IOU_THRESHOLDS = (0.5, 0.7)
MOMENT_KS = (1, 5, 10, 100)
MISS = np.iinfo(np.int64).max // 2  # hit rank of a query none of whose predictions is correct


def prediction_ious(pred_videos: np.ndarray, pred_spans: np.ndarray, gt_video: int, gt_span) -> np.ndarray:
    """(K,) IoU of each prediction with the true moment, 0 for a prediction in another video."""
    iou = temporal_iou(np.asarray(pred_spans, np.float64).reshape(-1, 2), np.asarray(gt_span, np.float64))
    return np.where(np.asarray(pred_videos) == gt_video, iou, 0.0)


def hit_ranks(ious: np.ndarray, threshold: float) -> int:
    """1-based position of the first prediction with IoU >= ``threshold``, ``MISS`` when there is none."""
    hit = np.flatnonzero(np.asarray(ious) >= threshold)
    return int(hit[0]) + 1 if len(hit) else MISS


def query_outcome(pred_videos, pred_spans, gt_video: int, gt_span, thresholds=IOU_THRESHOLDS) -> dict:
    """One query's hit rank per threshold and its top-1 IoU."""
    ious = prediction_ious(pred_videos, pred_spans, gt_video, gt_span)
    return {"ranks": {t: hit_ranks(ious, t) for t in thresholds}, "iou1": float(ious[0]) if len(ious) else 0.0}


def mean_ci(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean over queries."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, len(values), size=(min(200, n_boot - a), len(values)))].mean(1)
                            for a in range(0, n_boot, 200)])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return [float(np.percentile(means, lo)), float(np.percentile(means, hi))]


def moment_metrics(outcomes: list[dict], thresholds=IOU_THRESHOLDS, ks=MOMENT_KS, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """``{"metrics": {"R@K IoU=θ": %, "mIoU": %}, "ci95": {same: [lo, hi]}, "n_queries"}`` over the outcomes."""
    if not outcomes:
        raise ValueError("no queries to score")
    metrics, ci = {}, {}
    for t in thresholds:
        ranks = np.array([o["ranks"][t] for o in outcomes], np.int64)
        got, interval = summarize(ranks, ks), bootstrap_ci(ranks, n_boot, seed, ks=ks)
        for k in ks:
            metrics[f"R@{k} IoU={t}"], ci[f"R@{k} IoU={t}"] = got[f"R@{k}"], interval[f"R@{k}"]
    ious = 100.0 * np.array([o["iou1"] for o in outcomes])
    metrics["mIoU"], ci["mIoU"] = float(ious.mean()), mean_ci(ious, n_boot, seed)
    return {"metrics": metrics, "ci95": ci, "n_queries": len(outcomes)}


def video_metrics(ranks: np.ndarray, ks=MOMENT_KS, n_boot: int = 1000, seed: int = 0) -> dict:
    """VR: R@K of the right video's rank among the split's videos, with intervals (and MedR, MnR)."""
    ranks = np.asarray(ranks, np.int64)
    return {"metrics": summarize(ranks, ks), "ci95": bootstrap_ci(ranks, n_boot, seed, ks=ks),
            "n_queries": len(ranks)}
