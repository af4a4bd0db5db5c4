"""Retrieval metrics: one rank per query, then R@K, MedR, MnR, bootstrap intervals and a paired test.

Rank of a query = 1 + the number of candidates scoring *strictly higher* than
its best-scoring correct candidate.

* **Ties** go in the correct candidate's favour: a wrong candidate with the
  ground truth's score does not push it down. "The same score" means within
  ``TIE_TOLERANCE`` (1e-6): identical vectors at different gallery positions can
  come out of BLAS kernels an ulp apart, and that must not decide a rank. Such candidates are counted
  per query (``ties``), so a pessimistic rank is ``rank + ties``; the report
  gives how many queries had any. (Sorting all scores and looking the ground
  truth up with ``np.where(sorted == gt)`` instead counts a tied wrong
  candidate both before and after the ground truth.)
* **Several correct candidates** (a video with five captions, asked the other
  way round): the best-scoring one counts; the others are not "higher".
* **NaN** scores are treated as -inf: a NaN candidate never outranks anything,
  and a ground truth scored NaN ranks below every finite candidate.

Ground truth is given in CSR form, ``GroundTruth(indptr, indices)``: query i's
correct candidates are ``indices[indptr[i]:indptr[i + 1]]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECALL_KS = (1, 5, 10)
TIE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class GroundTruth:
    indptr: np.ndarray  # (n_queries + 1,)
    indices: np.ndarray  # candidate indices, grouped by query

    def __post_init__(self):
        counts = np.diff(self.indptr)
        if (counts < 1).any():
            raise ValueError(f"query {int(np.flatnonzero(counts < 1)[0])} has no correct candidate")

    @classmethod
    def single(cls, targets) -> "GroundTruth":
        """One correct candidate per query: ``targets[i]``."""
        targets = np.asarray(targets, dtype=np.int64)
        return cls(np.arange(len(targets) + 1, dtype=np.int64), targets)

    @classmethod
    def from_lists(cls, lists) -> "GroundTruth":
        lengths = [len(x) for x in lists]
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, np.int64)
        return cls(indptr, indices)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def rows(self, start: int, stop: int) -> "GroundTruth":
        ptr = self.indptr[start : stop + 1]
        return GroundTruth(ptr - ptr[0], self.indices[ptr[0] : ptr[-1]])

    def of(self, query: int) -> np.ndarray:
        return self.indices[self.indptr[query] : self.indptr[query + 1]]

    def transpose(self, n_candidates: int) -> "GroundTruth":
        """The other direction: candidate j's correct queries (every candidate must have one)."""
        queries = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        order = np.argsort(self.indices, kind="stable")
        counts = np.bincount(self.indices, minlength=n_candidates)
        indptr = np.zeros(n_candidates + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return GroundTruth(indptr, queries[order])


def _clean(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float32)
    if np.isnan(s).any():
        s = np.where(np.isnan(s), np.float32(-np.inf), s)
    return s


def best_gt_scores(scores: np.ndarray, gt: GroundTruth) -> np.ndarray:
    """Per query, the highest (NaN-cleaned) score among its correct candidates."""
    rows = np.repeat(np.arange(len(gt)), np.diff(gt.indptr))
    vals = scores[rows, gt.indices]
    return np.maximum.reduceat(vals, gt.indptr[:-1])


def rank_and_ties(scores: np.ndarray, best: np.ndarray, is_gt: np.ndarray | None = None,
                  tol: float = TIE_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """Per row: 1 + candidates above ``best`` (beyond ``tol``), and non-correct ones within ``tol`` of it."""
    b = best[:, None]
    above = scores > b + tol
    near = ~above & (scores >= b - tol)  # -inf rows: -inf >= -inf, so NaN ties with a NaN ground truth
    if is_gt is not None:
        near &= ~is_gt
    return 1 + above.sum(1).astype(np.int64), near.sum(1).astype(np.int64)


def ranks_from_scores(scores: np.ndarray, gt: GroundTruth, tol: float = TIE_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, ties) for a full (n_queries, n_candidates) score block; see the module docstring."""
    s = _clean(scores)
    if s.shape[0] != len(gt):
        raise ValueError(f"{s.shape[0]} score rows for {len(gt)} queries")
    best = best_gt_scores(s, gt)
    rows = np.repeat(np.arange(len(gt)), np.diff(gt.indptr))
    is_gt = np.zeros(s.shape, dtype=bool)
    is_gt[rows, gt.indices] = True
    return rank_and_ties(s, best, is_gt, tol)


def summarize(ranks: np.ndarray, ks=RECALL_KS) -> dict:
    """R@K in percent, median and mean rank."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("no queries to score")
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out["MedR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    return out


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """R@k in percent for k = 1..max_k."""
    counts = np.bincount(np.minimum(np.asarray(ranks), max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return 100.0 * np.cumsum(counts) / len(ranks)


def _resamples(n: int, n_boot: int, seed: int, chunk: int = 200):
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def bootstrap_ci(ranks: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 ks=RECALL_KS) -> dict:
    """Percentile bootstrap intervals over queries: {metric: [low, high]}."""
    ranks = np.asarray(ranks)
    stats = {f"R@{k}": [] for k in ks} | {"MedR": [], "MnR": []}
    for idx in _resamples(len(ranks), n_boot, seed):
        r = ranks[idx]
        for k in ks:
            stats[f"R@{k}"].append(100.0 * (r <= k).mean(1))
        stats["MedR"].append(np.median(r, axis=1))
        stats["MnR"].append(r.mean(1))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {name: [float(np.percentile(np.concatenate(v), lo)), float(np.percentile(np.concatenate(v), hi))]
            for name, v in stats.items()}


def paired_bootstrap(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 1, n_boot: int = 10000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Is R@k of A different from B's on the same queries? Resamples queries, keeping pairs together.

    Returns the observed difference A - B (percentage points), its percentile
    interval and a two-sided p-value (twice the smaller tail of the bootstrap
    differences on either side of zero, at least 1/n_boot).
    """
    a, b = np.asarray(ranks_a), np.asarray(ranks_b)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same queries: {a.shape[0]} vs {b.shape[0]} ranks")
    diff = 100.0 * ((a <= k).astype(np.float64) - (b <= k))
    deltas = np.concatenate([diff[idx].mean(1) for idx in _resamples(len(diff), n_boot, seed)])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    p = 2 * min((deltas <= 0).mean(), (deltas >= 0).mean())
    return {"metric": f"R@{k}", "delta": float(diff.mean()),
            "ci": [float(np.percentile(deltas, lo)), float(np.percentile(deltas, hi))],
            "p_value": float(min(1.0, max(p, 1.0 / n_boot))), "n_boot": n_boot}
