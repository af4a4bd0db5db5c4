"""What retrieval is evaluated on: the gallery of a manifest split and its query texts.

Queries (``query_mode``):

* ``video`` (default): one per video, the caption of kind ``query`` when the
  manifest marks one (e.g. MSR-VTT 1k-A's sentence), else its captions
  (kind ``caption`` or unset) joined in time order, as in training; captions
  that all share one time span are alternatives, and the first one is used;
* ``caption``: every caption is its own query (MSR-VTT "full" protocol);
* ``paragraph``: one per video, all its descriptions (kinds ``query``, ``caption``
  or unset) joined in time order, alternatives and marks ignored
  (paragraph-to-video retrieval: ActivityNet Captions, DiDeMo).

Subtitles and ASR lines are not descriptions and never become queries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import VideolmError
from ..features.shards import FeatureStore
from ..manifests.manifest import VideoEntry
from .metrics import GroundTruth

log = logging.getLogger("videolm.retrieval.queries")
QUERY_MODES = ("video", "caption", "paragraph")
DESCRIPTION_KINDS = (None, "caption")


class EvalError(VideolmError, ValueError):
    """Evaluation cannot run on this input; the message says why."""


@dataclass
class QuerySet:
    video_ids: list[str]  # the gallery, in manifest order
    texts: list[str]  # one per query
    keys: list[str]  # "<video_id>" (video, paragraph modes) or "<video_id>#<n>" (caption mode)
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
        pool = _video_queries(e, mode)
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


def _video_queries(entry: VideoEntry, mode: str) -> list[tuple[str, str]]:
    """(key, text) of each query of one video, blank texts included (the caller counts them)."""
    caps = sorted(entry.captions, key=lambda c: (c.start, c.end))
    marked = [c for c in caps if c.kind == "query"]
    described = [c for c in caps if c.kind in DESCRIPTION_KINDS]
    if mode == "caption":
        return [(f"{entry.video_id}#{n}", c.text) for n, c in enumerate(marked + described)]
    if mode == "paragraph":
        texts = [c.text.strip() for c in caps if c.kind == "query" or c.kind in DESCRIPTION_KINDS]
        return [(entry.video_id, " ".join(t for t in texts if t))] if texts else []
    if len({(c.start, c.end) for c in described}) == 1:
        # Captions sharing one time span (MSR-VTT's 20 sentences) are alternative
        # descriptions, not a sequence: the first one (manifest order) is the query.
        described = described[:1]
    chosen = marked[:1] or described
    return [(entry.video_id, " ".join(c.text.strip() for c in chosen))] if chosen else []
