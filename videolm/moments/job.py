"""``videolm eval-moments``: HERO's three settings over a split's timed captions.

* **VR** (video retrieval): rank the split's videos for each query by the vsm
  query-video score (the best clip cosine); R@1/5/10/100.
* **SVMR** (single-video moment retrieval): inside the right video, the top spans
  of ``p_start x p_end`` (``spans.decode_spans``); R@K at IoU 0.5 / 0.7 and mean IoU.
* **VCMR** (video-corpus moment retrieval): spans over the whole split, each video's
  weighed by ``exp(alpha * video score)`` (``spans.corpus_spans``); same metrics.

Queries are the split's descriptions (captions of kind ``caption``, ``query`` or
unset), each with its own time span. Left out, and counted in the report: a
caption that covers the whole video (MSR-VTT style, no span to find: IoU >=
``WHOLE_VIDEO_IOU`` with the video's extent), one that overlaps none of its
video's clips, an empty one, and videos without features.

Outputs: the report JSON (metrics with 95% bootstrap intervals over queries, counts,
settings) and a JSONL with each query's true moment, VR rank and top spans.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..features.shards import FeatureStore
from ..manifests.manifest import VideoEntry
from ..retrieval.job import split_entries, write_json, write_rankings
from ..retrieval.metrics import GroundTruth, ranks_from_scores
from ..retrieval.queries import DESCRIPTION_KINDS, EvalError
from .encoding import CONTEXTS, MomentModel
from .metrics import IOU_THRESHOLDS, MOMENT_KS, moment_metrics, query_outcome, video_metrics
from .spans import SpanConfig, corpus_spans, decode_spans, temporal_iou

log = logging.getLogger("videolm.moments.job")
WHOLE_VIDEO_IOU = 0.95
SETTINGS = ("VR", "SVMR", "VCMR")
QUERY_CHUNK = 64  # queries scored against the whole split at once
JSONL_TOP = 10


@dataclass(frozen=True)
class MomentConfig:
    split: str = "test"
    context: str = "subtitles"  # the local level reads the videos' subtitle lines; "video": clips alone
    spans: SpanConfig = SpanConfig()
    batch_size: int = 32
    device: str = "cpu"
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise EvalError(f"context must be one of {', '.join(CONTEXTS)}, got {self.context!r}")


@dataclass
class MomentQueries:
    videos: list[VideoEntry]  # with features, manifest order
    keys: list[str] = field(default_factory=list)  # "<video_id>#<n>", n over the video's captions in time order
    texts: list[str] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # index into videos
    spans: list[tuple[float, float]] = field(default_factory=list)  # seconds
    excluded: dict = field(default_factory=dict)


def build_moment_queries(entries: list[VideoEntry], store: FeatureStore) -> MomentQueries:
    """The split's timed descriptions as queries; whole-video, uncovered and empty ones counted, not scored."""
    videos = [e for e in entries if e.video_id in store]
    missing = [e.video_id for e in entries if e.video_id not in store]
    if not videos:
        raise EvalError(f"none of the {len(entries)} videos of the split have features in {store.directory}")
    qs = MomentQueries(videos, excluded={"missing_features": len(missing), "missing_examples": missing[:10],
                                         "whole_video": 0, "no_clip": 0, "empty": 0})
    for vi, e in enumerate(videos):
        times = store.clip_times(e.video_id)
        extent = np.array([0.0, max(float(times[-1, 1]), e.duration or 0.0)])
        for n, c in enumerate(sorted((c for c in e.captions if c.kind in DESCRIPTION_KINDS + ("query",)),
                                     key=lambda c: (c.start, c.end))):
            reason = _left_out(c, times, extent)
            if reason:
                qs.excluded[reason] += 1
                continue
            qs.keys.append(f"{e.video_id}#{n}")
            qs.texts.append(c.text.strip())
            qs.targets.append(vi)
            qs.spans.append((c.start, c.end))
    if qs.excluded["whole_video"]:
        log.info("%d whole-video caption(s) left out of moment evaluation (no span to localise)",
                 qs.excluded["whole_video"])
    if not qs.texts:
        raise EvalError(f"no timed captions to localise in the {len(videos)} videos of the split "
                        f"(left out: {qs.excluded['whole_video']} whole-video, {qs.excluded['no_clip']} outside "
                        f"the clips, {qs.excluded['empty']} empty); moment retrieval needs captions with their "
                        "own start and end inside the video")
    return qs


def _left_out(caption, times: np.ndarray, extent: np.ndarray) -> str | None:
    if not caption.text.strip():
        return "empty"
    span = np.array([caption.start, caption.end])
    if temporal_iou(span, extent) >= WHOLE_VIDEO_IOU:
        return "whole_video"
    if not ((times[:, 0] < max(caption.end, caption.start + 1e-9)) & (times[:, 1] > caption.start)).any():
        return "no_clip"
    return None


def _softmax_masked(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.where(mask, logits, -np.inf)
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def score_chunk(queries: tuple, frames: np.ndarray, mask: np.ndarray, unit: np.ndarray):
    """(start probs (Q, V, T), end probs, video scores (Q, V)) of a chunk of queries against every video."""
    q_start, q_end, q_glob = queries
    p_start = _softmax_masked(np.einsum("qh,vth->qvt", q_start, frames), mask[None])
    p_end = _softmax_masked(np.einsum("qh,vth->qvt", q_end, frames), mask[None])
    video = np.where(mask[None], np.einsum("qh,vth->qvt", q_glob, unit), -2.0).max(-1)
    return p_start, p_end, video


def _padded(states: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames (V, T, H), mask (V, T), unit-length frames) of per-video clip states."""
    T, H = max(len(s) for s in states), states[0].shape[1]
    frames = np.zeros((len(states), T, H), np.float32)
    mask = np.zeros((len(states), T), bool)
    for i, s in enumerate(states):
        frames[i, : len(s)], mask[i, : len(s)] = s, True
    unit = frames / np.maximum(np.linalg.norm(frames, axis=-1, keepdims=True), 1e-8)
    return frames, mask, unit


def localise(qs: MomentQueries, queries: tuple, states: list[np.ndarray], times: list[np.ndarray],
             cfg: SpanConfig) -> tuple[dict, list[dict]]:
    """({setting: per-query outcomes or ranks}, JSONL rows) for every query."""
    frames, mask, unit = _padded(states)
    lengths = mask.sum(1)
    targets = np.asarray(qs.targets)
    vr, svmr, vcmr, rows = [], [], [], []
    for a in range(0, len(qs.texts), QUERY_CHUNK):
        sl = slice(a, a + QUERY_CHUNK)
        p_start, p_end, video = score_chunk(tuple(q[sl] for q in queries), frames, mask, unit)
        ranks, _ = ranks_from_scores(video, GroundTruth.single(targets[sl]))
        for i, qi in enumerate(range(a, min(a + QUERY_CHUNK, len(qs.texts)))):
            gt, span = int(targets[qi]), qs.spans[qi]
            n = lengths[gt]
            single = decode_spans(p_start[i, gt, :n], p_end[i, gt, :n], times[gt], cfg)
            corpus = corpus_spans(video[i], lambda v, i=i: (p_start[i, v, : lengths[v]], p_end[i, v, : lengths[v]]),
                                  times, cfg)
            svmr.append(query_outcome(np.full(len(single["scores"]), gt), single["seconds"], gt, span))
            vcmr.append(query_outcome(corpus["videos"], corpus["seconds"], gt, span))
            vr.append(int(ranks[i]))
            rows.append(_row(qs, qi, int(ranks[i]), single, corpus, svmr[-1], vcmr[-1]))
    return {"VR": np.asarray(vr), "SVMR": svmr, "VCMR": vcmr}, rows


def _row(qs: MomentQueries, qi: int, vr_rank: int, single: dict, corpus: dict, s_out: dict, c_out: dict) -> dict:
    def r(x):
        return round(float(x), 3)

    ids = [e.video_id for e in qs.videos]
    return {"key": qs.keys[qi], "video_id": ids[qs.targets[qi]], "text": qs.texts[qi],
            "moment": [r(x) for x in qs.spans[qi]], "vr_rank": vr_rank,
            "svmr": [[r(s), r(e), float(p)] for (s, e), p in zip(single["seconds"][:JSONL_TOP], single["scores"])],
            "vcmr": [[ids[v], r(s), r(e), float(p)] for v, (s, e), p in
                     zip(corpus["videos"][:JSONL_TOP], corpus["seconds"], corpus["scores"])],
            "svmr_iou1": r(s_out["iou1"]), "vcmr_iou1": r(c_out["iou1"]),
            "svmr_hit_rank": {str(t): _rank(v) for t, v in s_out["ranks"].items()},
            "vcmr_hit_rank": {str(t): _rank(v) for t, v in c_out["ranks"].items()}}


def _rank(v: int):
    return v if v <= 10**9 else None  # MISS as null


def run_moments(checkpoint: Path, features: Path, manifest: Path, cfg: MomentConfig, out: Path | None = None,
                predictions: Path | None = None) -> dict:
    """Evaluate a checkpoint's moment retrieval on a split and write the report and per-query JSONL."""
    t0 = time.perf_counter()
    mm = MomentModel(checkpoint, cfg.device, cfg.batch_size)
    store = FeatureStore(features)
    try:
        mm.check_store(store)
        qs = build_moment_queries(split_entries(manifest, cfg.split), store)
        states, times = mm.encode_videos(store, qs.videos, cfg.context)
    finally:
        store.close()
    queries = mm.encode_queries(qs.texts)
    t1 = time.perf_counter()
    results, rows = localise(qs, queries, states, times, cfg.spans)
    report = {
        "videolm": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"checkpoint": str(mm.ckpt), "step": mm.step, "objectives": mm.run_cfg.objective_names},
        "features": str(features), "manifest": str(manifest), "split": cfg.split,
        "n_videos": len(qs.videos), "n_queries": len(qs.texts),
        "videos_with_subtitles": sum(any(c.kind in ("subtitle", "asr") for c in e.captions) for e in qs.videos),
        "excluded": qs.excluded, "iou_thresholds": list(IOU_THRESHOLDS), "recall_ks": list(MOMENT_KS),
        "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "level": 0.95},
        "eval_config": asdict(cfg),
        "VR": video_metrics(results["VR"], n_boot=cfg.bootstrap, seed=cfg.seed),
        "SVMR": moment_metrics(results["SVMR"], n_boot=cfg.bootstrap, seed=cfg.seed),
        "VCMR": moment_metrics(results["VCMR"], n_boot=cfg.bootstrap, seed=cfg.seed),
        "timing": {"encode_s": t1 - t0, "localise_s": time.perf_counter() - t1},
    }
    report["written"] = {}
    if predictions is not None:
        report["written"]["predictions"] = str(write_rankings(rows, predictions))
    if out is not None:
        report["written"]["report"] = str(out)
        write_json(report, out)
    return report


def moments_lines(report: dict) -> list[str]:
    """The printed table: one line per setting."""
    lines = []
    vr = report["VR"]
    m, ci = vr["metrics"], vr["ci95"]
    lines.append(f"VR:   R@1 {m['R@1']:.1f} [{ci['R@1'][0]:.1f}, {ci['R@1'][1]:.1f}]  R@5 {m['R@5']:.1f}  "
                 f"R@10 {m['R@10']:.1f}  R@100 {m['R@100']:.1f}")
    for s in ("SVMR", "VCMR"):
        m, ci = report[s]["metrics"], report[s]["ci95"]
        parts = [f"R@1 IoU={t} {m[f'R@1 IoU={t}']:.1f} [{ci[f'R@1 IoU={t}'][0]:.1f}, {ci[f'R@1 IoU={t}'][1]:.1f}]"
                 for t in report["iou_thresholds"]]
        parts.append(f"R@10 IoU=0.5 {m['R@10 IoU=0.5']:.1f}  R@100 IoU=0.5 {m['R@100 IoU=0.5']:.1f}")
        parts.append(f"mIoU {m['mIoU']:.1f} [{ci['mIoU'][0]:.1f}, {ci['mIoU'][1]:.1f}]")
        lines.append(f"{s + ':':<5} " + "  ".join(parts))
    return lines


def print_moments(report: dict, stream=None) -> None:
    for line in moments_lines(report):
        print(line, file=stream or sys.stdout)
