"""Single-video moment baselines that read no pixels: the whole video, and one span at the best prior position.

A moment model earns its SVMR numbers only where it beats what the annotation's
layout alone gives. ``whole_video`` predicts every query's video from start to end
(the score of not localising at all). ``PriorSpan`` predicts one fixed span in
*relative* time, ``[a, a + length]`` of each video's extent, with ``a`` and
``length`` chosen on a grid to maximise R@1 at IoU 0.5 on the training queries
(ties: the higher mean IoU). IoU does not change when both spans are scaled, so a
relative span is fitted and applied the same way on videos of any length.

Both give one prediction per query in its own video, so only the single-video
setting (SVMR) is scored; R@K for K > 1 equals R@1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..features.shards import FeatureStore
from .job import MomentQueries
from .metrics import IOU_THRESHOLDS, moment_metrics, query_outcome

GRID = 0.02  # relative start and length step of the prior span's search


def query_extents(qs: MomentQueries, store: FeatureStore) -> np.ndarray:
    """(Q,) seconds of each query's video: its duration, or its last clip's end when that is later."""
    extent = {e.video_id: max(float(store.clip_times(e.video_id)[-1, 1]), e.duration or 0.0) for e in qs.videos}
    return np.array([extent[qs.videos[t].video_id] for t in qs.targets])


def relative_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(P, Q) IoU of each candidate span ``pred`` (P, 2) with each moment ``gt`` (Q, 2)."""
    inter = np.clip(np.minimum(pred[:, None, 1], gt[None, :, 1]) - np.maximum(pred[:, None, 0], gt[None, :, 0]),
                    0, None)
    union = (pred[:, 1] - pred[:, 0])[:, None] + (gt[:, 1] - gt[:, 0])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass(frozen=True)
class PriorSpan:
    start: float  # relative, 0..1
    length: float
    train_r1: float  # R@1 IoU 0.5 (%) on the queries it was fitted on
    train_queries: int

    @classmethod
    def fit(cls, qs: MomentQueries, extents: np.ndarray) -> PriorSpan:
        gt = np.asarray(qs.spans, np.float64) / extents[:, None]
        steps = np.round(np.arange(GRID, 1 + 1e-9, GRID), 6)
        cand = np.array([(a, a + n) for n in steps for a in np.round(np.arange(0, 1 - n + 1e-9, GRID), 6)])
        iou = relative_iou(cand, gt)
        r1, mean = (iou >= 0.5).mean(1), iou.mean(1)
        best = int(np.lexsort((-mean, -r1))[0])
        a, b = cand[best]
        return cls(float(a), float(b - a), float(100 * r1[best]), len(gt))

    def spans(self, extents: np.ndarray) -> np.ndarray:
        return np.stack([self.start * extents, (self.start + self.length) * extents], 1)


def svmr_report(qs: MomentQueries, spans: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """SVMR metrics (R@K at IoU 0.5/0.7, mIoU, with intervals) of one predicted span per query."""
    outcomes = [query_outcome([t], [span], t, gt, IOU_THRESHOLDS) for t, span, gt in zip(qs.targets, spans, qs.spans)]
    return moment_metrics(outcomes, n_boot=n_boot, seed=seed)


def baseline_reports(train: MomentQueries, test: MomentQueries, store: FeatureStore, n_boot: int = 1000) -> dict:
    """``{"whole video": {...}, "prior span": {...}}``: each with its SVMR metrics on ``test``."""
    test_ext = query_extents(test, store)
    prior = PriorSpan.fit(train, query_extents(train, store))
    whole = np.stack([np.zeros_like(test_ext), test_ext], 1)
    return {
        "whole video": {"SVMR": svmr_report(test, whole, n_boot), "n_queries": len(test.texts)},
        "prior span": {"SVMR": svmr_report(test, prior.spans(test_ext), n_boot), "n_queries": len(test.texts),
                       "prior": {"start": prior.start, "length": prior.length, "train_R@1 IoU=0.5": prior.train_r1,
                                 "train_queries": prior.train_queries}},
    }
