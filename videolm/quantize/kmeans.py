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
import os
from concurrent.futures import ThreadPoolExecutor
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

        ``x`` must already be normalised like the training sample. Rows go ``chunk`` at a time;
        at each level a point takes the child of its node with the smallest ``|c|^2 - 2 x.c``
        (first child on ties). Each level is scored for the whole chunk at once (notes above
        ``_TILES``); close calls are made again exactly as the per-node reference walk over the
        same chunk makes them, so words and paths are that walk's; distances agree to rounding.
        """
        n = len(x)
        tables = self._assign_tables()
        paths = np.zeros((n, self.depth), dtype=np.int16)
        dists = np.zeros((n, self.depth), dtype=np.float32)
        node = np.zeros(n, dtype=np.int64)  # the virtual root's only "node"
        x_sq = np.empty(n, np.float32)  # filled at the root level, slice by slice while in cache
        spans = [slice(a, a + chunk) for a in range(0, n, chunk)]
        workers = _workers()
        with ThreadPoolExecutor(workers) as executor:  # per call: a pool kept across calls would not survive fork()
            pool = (executor, workers)
            for l, level in enumerate(self.levels):
                child, close = np.empty(n, np.int64), np.empty(n, bool)
                for c in spans:
                    child[c], dists[c, l], close[c] = _fast_level(x[c], x_sq[c], node[c], tables[l], l == 0, pool)
                # Close calls after every chunk's fast pass: the reference's BLAS threads, left spinning after
                # its products, then slow down the next level's products once rather than once per chunk.
                for c in spans:
                    _settle(x[c], node[c], tables[l], child[c], dists[c, l], close[c])
                node = child
                paths[:, l] = level["child_index"][node]
        k_pow = self.k ** np.arange(self.depth - 1, -1, -1, dtype=np.int64)
        words = (paths.astype(np.int64) * k_pow).sum(axis=1)
        return words.astype(np.int32), paths, dists

    def _assign_tables(self) -> list[dict[str, np.ndarray]]:
        """Per level, its parents' children as index rows; cached (``levels`` must not change afterwards)."""
        cached = self.__dict__.get("_tables")
        if cached is not None:
            return cached
        tables = []
        for l, level in enumerate(self.levels):
            cents = level["centroids"]
            if l == 0:
                first, count = np.zeros(1, dtype=np.int64), np.array([len(cents)], dtype=np.int64)
            else:
                first, count = self.levels[l - 1]["first_child"], self.levels[l - 1]["num_children"]
            tables.append(_children_table(cents, first, count))
        self.__dict__["_tables"] = tables
        return tables


# --------------------------------------------------------------------------- assignment
#
# The reference walk (kept in tests/test_quantize.py) sorts a chunk's points by node and
# scores each node's points against its children with one product: a Python loop over
# ~1,900 nodes per chunk for the 12^4 tree, and with 2 BLAS threads much of its time goes to
# handing each small product to the second thread. Here a level is scored for the whole
# chunk at once: the points, sorted by node, are cut into tiles of one node's points (sizes
# _TILES, biggest first; a node's last few points in a padded tile), and
# (tiles, children, dim) @ (tiles, dim, rows) runs in C, in batches that stay in cache,
# shared by a few threads with one BLAS thread each. The score is the reference's,
# |c|^2 - 2 x.c in float32, first child on ties. But BLAS rounds a dot product differently
# with the product's shape and thread count, so a score can differ from the reference's in
# its last bits: by up to 2^-26.5 * sqrt(dim) * (|x| + |c|)^2 on the 12^4 tree at 1024-d.
# A choice whose margin (second-best minus best score) is under _CLOSE_CALL times that
# scale (2^-22: 11x the most that rounding was seen to move a margin) is therefore made
# again by the reference's own call on the node's whole group of points, at the caller's
# BLAS threads: exact ties, near-ties and NaN rows get the reference's words, bit for bit.

_TILES = (64, 16, 4)  # rows per tile of the stacked products: a node's points fill the biggest first
_BATCH_BYTES = 2 << 20  # gathered rows and children of one stacked product: small enough to stay in cache
_ROOT_ROWS, _ROOT_BYTES = 512, 64 << 20  # rows per root-level product; its score matrix (a flat codebook may be large)
_CLOSE_CALL = 2.0**-22
_MAX_WORKERS = 4
_blas = None


def _one_blas_thread():
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController  # ships with scikit-learn

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _workers() -> int:
    """Threads for the stacked products (each on one BLAS thread): the usable cores, at most _MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(_MAX_WORKERS, cores))


def _on_workers(pool: tuple[ThreadPoolExecutor, int], work) -> None:
    """``work(w, n)`` on each worker w of the pool's n (each takes every n-th batch); errors are raised here."""
    executor, n = pool
    list(executor.map(work, range(n), [n] * n))


def _children_table(cents: np.ndarray, first: np.ndarray, count: np.ndarray) -> dict[str, np.ndarray]:
    """Each parent's children as a padded row of centroid indices, with their squared norms (+inf padding)."""
    width = max(int(count.max()), 1)
    j = np.arange(width)
    idx = np.minimum(first[:, None] + np.minimum(j, np.maximum(count, 1)[:, None] - 1), len(cents) - 1)
    sq = np.einsum("ij,ij->i", cents, cents)  # as the reference computes it
    sq_pad = sq.astype(np.float32)[idx]
    sq_pad[j >= count[:, None]] = np.inf
    norm = np.sqrt(np.where(np.isfinite(sq_pad), sq_pad, 0).max(axis=1))
    return {"centroids": cents, "sq": sq, "first": first, "count": count, "c32": np.asarray(cents, np.float32),
            "idx": idx, "sq_pad": sq_pad, "norm": norm}


def _best_two(d: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along ``axis``: first index of the minimum, the minimum, and the gap to the second smallest."""
    j = d.argmin(axis=axis)
    if d.shape[axis] < 2:
        return j, d.min(axis=axis), np.full(j.shape, np.inf, d.dtype)
    two = np.partition(d, 1, axis=axis)  # a NaN row's margin is NaN: the caller re-scores it
    lo, hi = np.take(two, 0, axis=axis), np.take(two, 1, axis=axis)
    return j, lo, hi - lo


def _root_scores(xf: np.ndarray, t: dict, x_sq: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best child, its score and the margin for every row against the root's children; fills ``x_sq``."""
    cents, sq = t["c32"], t["sq_pad"][0]
    out = (np.empty(len(xf), np.int64), np.empty(len(xf), np.float32), np.empty(len(xf), np.float32))
    step = max(1, min(_ROOT_ROWS, _ROOT_BYTES // (4 * len(cents))))

    def work(w, n):
        s = np.empty((min(step, len(xf)), len(cents)), np.float32)
        for a in range(w * step, len(xf), n * step):
            xs = xf[a : a + step]
            x_sq[a : a + step] = np.einsum("ij,ij->i", xs, xs)
            sv = s[: len(xs)]
            np.matmul(xs, cents.T, out=sv)
            for o, v in zip(out, _best_two(_scores(sv, sq[None, :]))):
                o[a : a + step] = v

    _on_workers(pool, work)
    return out


def _scores(s: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    """The reference's ``c_sq - 2.0 * s``, in place (the same float32 result: -2s is exact)."""
    np.multiply(s, -2.0, out=s)
    s += c_sq
    return s


def _tiles(order: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray, size: int):
    """Cut each parent's segment of the sorted rows into tiles of ``size`` rows: (parent, rows, valid) per tile;
    a short last tile repeats its last row."""
    nt = -(-seg_len // size)
    tp = np.repeat(np.arange(len(nt)), nt)
    nth = np.arange(len(tp)) - np.repeat(np.cumsum(nt) - nt, nt)
    end = (seg_start + seg_len)[tp, None]
    pos = (seg_start[tp] + nth * size)[:, None] + np.arange(size)
    valid = pos < end
    return tp, order[np.minimum(pos, end - 1)], valid


def _tiled_scores(xf: np.ndarray, node: np.ndarray, t: dict, pool):
    """Best child, its score and the margin for every row, each row scored against its own node's children."""
    order = np.argsort(node, kind="stable")
    size = np.bincount(node, minlength=len(t["idx"]))  # points per parent
    start = np.cumsum(size) - size
    out = (np.empty(len(xf), np.int64), np.empty(len(xf), np.float32), np.empty(len(xf), np.float32))
    classes, done = [], np.zeros_like(size)
    for n, rows_per_tile in enumerate(_TILES):  # big tiles first; the last size takes the rest, padded
        take = size - done if n == len(_TILES) - 1 else (size - done) // rows_per_tile * rows_per_tile
        classes.append((rows_per_tile, *_tiles(order, start + done, take, rows_per_tile)))
        done = done + take
    _on_workers(pool, lambda w, n: _score_tiles(xf, t, classes, out, w, n))
    return out


def _score_tiles(xf: np.ndarray, t: dict, classes: list, out: tuple, w: int, n: int) -> None:
    """Worker ``w`` of ``n``: every n-th batch of tiles of each size, scored into ``out``."""
    dim, width = xf.shape[1], t["idx"].shape[1]
    for rows_per_tile, tp, rows, valid in classes:
        per = max(1, min(len(tp), _BATCH_BYTES // (4 * dim * (rows_per_tile + width))))
        # Reused buffers: a fresh array per product costs page faults that take as long as the copy.
        xb, cb = np.empty((per, rows_per_tile, dim), np.float32), np.empty((per, width, dim), np.float32)
        sb = np.empty((per, width, rows_per_tile), np.float32)
        for b in range(w * per, len(tp), n * per):
            p, r, v = tp[b : b + per], rows[b : b + per], valid[b : b + per]
            xv, cv, sv = xb[: len(p)], cb[: len(p)], sb[: len(p)]
            np.take(xf, r, axis=0, out=xv, mode="clip")  # "clip": an unbuffered copy (indices are valid)
            np.take(t["c32"], t["idx"][p], axis=0, out=cv, mode="clip")
            np.matmul(cv, xv.transpose(0, 2, 1), out=sv)  # (tiles, children, rows): faster than rows-first
            got = _best_two(_scores(sv, t["sq_pad"][p][:, :, None]), axis=1)
            keep = r[v]
            for o, g in zip(out, got):
                o[keep] = g[v]


def _fast_level(xc: np.ndarray, x_sq: np.ndarray, node: np.ndarray, t: dict, root: bool, pool):
    """One level's choices for a chunk from the stacked products: (child, distance, is it a close call)."""
    xf = np.ascontiguousarray(xc, dtype=np.float32)
    with _one_blas_thread():
        j, best, margin = _root_scores(xf, t, x_sq, pool) if root else _tiled_scores(xf, node, t, pool)
    tau = _CLOSE_CALL * np.sqrt(xf.shape[1]) * (np.sqrt(x_sq) + t["norm"][node]) ** 2
    return t["first"][node] + j, np.maximum(best + x_sq, 0.0), ~(margin > tau)  # NaN margins: close


def _settle(xc: np.ndarray, node: np.ndarray, t: dict, child: np.ndarray, dist: np.ndarray, close: np.ndarray):
    """Close calls made again, in place, by the reference's own call on their node's whole group in the chunk."""
    for p in np.unique(node[close]):
        rows = np.flatnonzero(node == p)  # ascending, as the reference's stable sort orders them
        lo, hi = int(t["first"][p]), int(t["first"][p] + t["count"][p])
        j, d = nearest(xc[rows], t["centroids"][lo:hi], t["sq"][lo:hi])
        child[rows], dist[rows] = lo + j, d


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
