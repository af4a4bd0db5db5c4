"""Visual words: (hierarchical) k-means codebooks over feature shards.

VideoBERT quantises clip features with hierarchical k-means: k clusters, then k
sub-clusters inside each, ``levels`` deep, giving up to k^levels words (12^4 =
20,736). A clip's word is the leaf reached by walking down the tree, taking the
nearest child at each level; its id is the path read as a base-k number, so the
vocabulary is exactly ``k ** levels`` ids even when some branches are short.

Tree layout (also the codebook file layout, docs/formats.md): level ``l`` holds
``centroids (n_l, dim)``, ``parent (n_l,)`` (a node of level ``l-1``; 0 for level 0)
and ``child_index (n_l,)`` (0..k-1 among its siblings); ``first_child`` and
``num_children`` of level ``l`` point into level ``l+1``. Siblings are contiguous.

Small clusters, deterministically: a node with ``n >= k`` training points gets k
k-means children; with ``1 <= n < k`` points its children are its distinct points
(fewer than k, sorted); with no points (a centroid no sample point is nearest to)
it gets one child equal to itself. Every leaf is therefore at depth ``levels``.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..model.inputs import VISUAL_TOKEN_OFFSET

# Faiss settings. "fast" subsamples each k-means to max_points_per_centroid * k points
# and stops early; measured (benchmarks/bench_quantize.py) to match MiniBatchKMeans'
# inertia in less time. "accurate" is full-batch Lloyd.
# On 200k x 512, k=1024 (benchmarks/bench_quantize.py): fast = 0.25-0.4x MiniBatchKMeans'
# time at 1.06% lower inertia; accurate = 1.74% lower inertia at ~3x its time.
PRESETS = {
    "fast": {"niter": 6, "max_points_per_centroid": 64},
    "accurate": {"niter": 25, "max_points_per_centroid": 100_000},
}


@dataclass(frozen=True)
class QuantizeConfig:
    k: int = 12
    levels: int = 4
    sample: int = 500_000
    niter: int = PRESETS["fast"]["niter"]
    max_points_per_centroid: int = PRESETS["fast"]["max_points_per_centroid"]
    seed: int = 0
    normalize: str = "l2"  # "l2": unit-length features before clustering and assignment; "none"
    backend: str = "faiss"  # or "sklearn" (MiniBatchKMeans)

    def __post_init__(self):
        if self.k < 2:
            raise ConfigError(f"k must be >= 2, got {self.k}")
        if not 1 <= self.levels <= 8:
            raise ConfigError(f"levels must be in 1..8, got {self.levels}")
        # The model adds VISUAL_TOKEN_OFFSET to every word id, and the sum must stay an int32.
        if self.k ** self.levels > 2**31 - 1 - VISUAL_TOKEN_OFFSET:
            raise ConfigError(f"k^levels = {self.k ** self.levels} words does not fit in int32 token ids")
        if self.sample < self.k:
            raise ConfigError(f"sample ({self.sample}) must be at least k ({self.k})")
        if self.normalize not in ("l2", "none"):
            raise ConfigError(f"normalize must be 'l2' or 'none', got {self.normalize!r}")
        if self.backend not in ("faiss", "sklearn"):
            raise ConfigError(f"backend must be 'faiss' or 'sklearn', got {self.backend!r}")
        if self.niter < 1 or self.max_points_per_centroid < 1:
            raise ConfigError("niter and max_points_per_centroid must be >= 1")

    @property
    def vocab_size(self) -> int:
        return self.k ** self.levels


def normalize_rows(x: np.ndarray, how: str, inplace: bool = False) -> np.ndarray:
    """float32 rows, L2-normalised when ``how == "l2"``; ``inplace`` spares a copy of a large sample."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if how == "l2":
        # einsum, not np.linalg.norm: the latter builds an x*x temporary as large as x.
        norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)[:, None]  # zero rows stay zero
        if inplace:
            x /= norms
        else:
            x = x / norms
    return x


# --------------------------------------------------------------------------- k-means backends


def _kmeans_faiss(x: np.ndarray, k: int, cfg: QuantizeConfig, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(
        x.shape[1], k, niter=cfg.niter, seed=seed, max_points_per_centroid=cfg.max_points_per_centroid,
        min_points_per_centroid=1,  # small nodes deep in the tree are expected: no warnings
        verbose=False,
    )
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32)


def _kmeans_sklearn(x: np.ndarray, k: int, cfg: QuantizeConfig, seed: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init="auto")
    km.fit(x)
    return km.cluster_centers_.astype(np.float32)


KMEANS = {"faiss": _kmeans_faiss, "sklearn": _kmeans_sklearn}


def nearest(x: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray | None = None,
            chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Index of and squared distance to the nearest centroid, for each row of x.

    Rows go in chunks so the (rows x centroids) distance matrix stays small even for
    a flat codebook of thousands of words.
    """
    if c_sq is None:
        c_sq = np.einsum("ij,ij->i", centroids, centroids)
    idx = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for a in range(0, len(x), chunk):
        xc = x[a : a + chunk]
        d = c_sq[None, :] - 2.0 * (xc @ centroids.T)
        i = np.argmin(d, axis=1)
        idx[a : a + chunk] = i
        dist[a : a + chunk] = np.maximum(d[np.arange(len(xc)), i] + np.einsum("ij,ij->i", xc, xc), 0.0)
    return idx, dist


# --------------------------------------------------------------------------- the tree


@dataclass
class Codebook:
    k: int
    levels: list[dict[str, np.ndarray]]  # per level: centroids, parent, child_index, first_child, num_children
    normalize: str

    @property
    def depth(self) -> int:
        return len(self.levels)

    @property
    def dim(self) -> int:
        return int(self.levels[0]["centroids"].shape[1])

    @property
    def vocab_size(self) -> int:
        return self.k ** self.depth

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.k}/{self.normalize}".encode())
        for level in self.levels:
            for name in sorted(level):
                h.update(name.encode())
                h.update(np.ascontiguousarray(level[name]).tobytes())
        return h.hexdigest()[:16]

    def leaf_words(self) -> np.ndarray:
        """Word id of every leaf node: its path of child indices read in base k."""
        words = np.zeros(1, dtype=np.int64)
        for level in self.levels:
            words = words[level["parent"]] * self.k + level["child_index"]
        return words

    def assign(self, x: np.ndarray, chunk: int = 32768) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Walk the tree: (word ids (n,), paths (n, levels), squared distance per level (n, levels)).

        ``x`` must already be normalised like the training sample.
        """
        n = len(x)
        paths = np.zeros((n, self.depth), dtype=np.int16)
        dists = np.zeros((n, self.depth), dtype=np.float32)
        node_sq = [np.einsum("ij,ij->i", lv["centroids"], lv["centroids"]) for lv in self.levels]
        for a in range(0, n, chunk):
            xc = x[a : a + chunk]
            node = np.zeros(len(xc), dtype=np.int64)  # the virtual root's only "node"
            for l, level in enumerate(self.levels):
                if l == 0:
                    first = np.zeros(1, dtype=np.int64)
                    count = np.array([len(level["centroids"])])
                else:
                    first, count = self.levels[l - 1]["first_child"], self.levels[l - 1]["num_children"]
                # Points are grouped by their current node; each group is one small
                # matrix product against that node's children (<= k of them).
                order = np.argsort(node, kind="stable")
                parents, starts = np.unique(node[order], return_index=True)
                ends = np.append(starts[1:], len(order))
                child = np.empty(len(xc), dtype=np.int64)
                for p, s, e in zip(parents, starts, ends):
                    rows = order[s:e]
                    lo, hi = int(first[p]), int(first[p] + count[p])
                    j, d = nearest(xc[rows], level["centroids"][lo:hi], node_sq[l][lo:hi])
                    child[rows] = lo + j
                    dists[a + rows, l] = d
                node = child
                paths[a : a + len(xc), l] = level["child_index"][node]
        k_pow = self.k ** np.arange(self.depth - 1, -1, -1, dtype=np.int64)
        words = (paths.astype(np.int64) * k_pow).sum(axis=1)
        return words.astype(np.int32), paths, dists


def _children_of(points: np.ndarray, k: int, cfg: QuantizeConfig, seed: int, fallback: np.ndarray) -> np.ndarray:
    """Centroids of one node's children, by the small-cluster rules in the module docstring."""
    if len(points) == 0:
        return fallback[None, :].astype(np.float32)
    if len(points) < k:
        return np.unique(points, axis=0).astype(np.float32)
    return KMEANS[cfg.backend](np.ascontiguousarray(points), k, cfg, seed)


def _fit_level(x, groups, parents_prev, l, cfg, on_level):
    """Children of every node of level l-1; returns the new level's arrays and its inertia."""
    cents, parent, child_index, first, count, new_groups = [], [], [], [], [], []
    total, offset = 0.0, 0
    for p, rows in enumerate(groups):
        # One seed per node, derived from the node's position: the same tree whatever
        # order or backend speed.
        seed = (cfg.seed * 1_000_003 + l * 65_537 + p) % (2**31 - 1)
        pts = x if len(rows) == len(x) else x[rows]  # the root needs no copy of the sample
        c = _children_of(pts, cfg.k, cfg, seed, parents_prev[p])
        first.append(offset)
        count.append(len(c))
        offset += len(c)
        cents.append(c)
        parent += [p] * len(c)
        child_index += list(range(len(c)))
        if len(rows):
            j, d = nearest(pts, c)
            total += float(d.sum())
            new_groups += [rows[j == i] for i in range(len(c))]
        else:
            new_groups += [rows] * len(c)
        if on_level is not None:
            on_level(l, p + 1, len(groups))
    return cents, parent, child_index, first, count, new_groups, total


def fit_codebook(x: np.ndarray, cfg: QuantizeConfig, on_level=None) -> tuple[Codebook, list[float]]:
    """Fit the tree on the (normalised) sample; returns the codebook and the inertia per level.

    ``on_level(level, nodes_done, nodes_total)`` is called for progress.
    """
    from threadpoolctl import threadpool_limits  # ships with scikit-learn

    levels: list[dict[str, np.ndarray]] = []
    groups = [np.arange(len(x))]  # sample rows per node of the previous level (root first)
    parents_prev = [np.zeros(x.shape[1], np.float32)]
    inertia = []
    for l in range(cfg.levels):
        # Below the root, thousands of small k-means (faiss, OpenMP) alternate with small
        # numpy products (OpenBLAS); with both pools spinning on 2 cores they steal each
        # other's cores (measured 3.3x slower). numpy's BLAS gets one thread there.
        with threadpool_limits(1, user_api="blas") if l > 0 else nullcontext():
            level = _fit_level(x, groups, parents_prev, l, cfg, on_level)
        cents, parent, child_index, first, count, new_groups, total = level
        if l > 0:
            levels[l - 1]["first_child"] = np.asarray(first, dtype=np.int64)
            levels[l - 1]["num_children"] = np.asarray(count, dtype=np.int64)
        level_cents = np.concatenate(cents)
        levels.append({
            "centroids": level_cents,
            "parent": np.asarray(parent, dtype=np.int64),
            "child_index": np.asarray(child_index, dtype=np.int64),
        })
        groups, parents_prev = new_groups, list(level_cents)
        inertia.append(total)
    last = levels[-1]
    last["first_child"] = np.zeros(len(last["centroids"]), dtype=np.int64)
    last["num_children"] = np.zeros(len(last["centroids"]), dtype=np.int64)
    return Codebook(cfg.k, levels, cfg.normalize), inertia


def word_stats(counts: np.ndarray, leaves: int) -> dict:
    """Health of a word distribution: used/empty words, entropy and perplexity."""
    total = int(counts.sum())
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log2(p)).sum()) if total else 0.0
    used = int((counts > 0).sum())
    return {
        "clips": total,
        "leaves": int(leaves),
        "words_used": used,
        "empty_leaves": int(leaves - used),
        "entropy_bits": round(entropy, 4),
        "max_entropy_bits": round(float(np.log2(leaves)), 4) if leaves else 0.0,
        "perplexity": round(float(2**entropy), 2),
    }
