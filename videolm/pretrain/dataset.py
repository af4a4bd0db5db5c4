"""Training examples over cached shards: clip features (and visual words) plus timed captions.

Captions and clips meet on the time line:

* a caption *covers* every clip it overlaps in time (``caption_spans``).

Example modes (``DataConfig.mode``):

* ``segment`` (UniVL): one caption, or adjacent captions merged until they last
  ``min_segment_seconds``, with the clips it covers (at most ``max_frames``);
* ``video`` (HERO): a whole video, randomly cropped to ``max_frames`` clips when
  longer, with every caption overlapping the crop as a subtitle.

Both modes carry the clips' visual words when the features are quantised; a
model that reads them says so with ``model.video_input: tokens``.

Examples are plain dicts of numpy arrays and strings; tokenising text and padding
into batches belong to the collate step of the trainer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, VideolmError
from ..features.shards import FeatureStore
from ..manifests.manifest import Caption, VideoEntry

log = logging.getLogger("videolm.pretrain.dataset")
MODES = ("segment", "video")


class DataError(VideolmError, ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    mode: str = "segment"
    max_frames: int = 48
    min_segment_seconds: float = 0.0  # UniVL merges short adjacent captions into one segment

    def __post_init__(self):
        if self.mode == "tokens":
            raise ConfigError("data mode 'tokens' was removed: use mode 'segment' with model.video_input: tokens "
                              "(examples carry visual words whenever the features are quantised)")
        if self.mode not in MODES:
            raise ConfigError(f"data mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.min_segment_seconds < 0:
            raise ConfigError("min_segment_seconds must be >= 0")


def caption_spans(starts: np.ndarray, ends: np.ndarray, captions: list[Caption]) -> np.ndarray:
    """(n_captions, 2) first and last clip index each caption overlaps; (-1, -1) when none.

    Overlap is strict (a clip that ends exactly where a caption starts is not
    covered), except that a zero-length caption covers the clip it falls in.
    """
    out = np.full((len(captions), 2), -1, dtype=np.int64)
    for i, c in enumerate(captions):
        if c.end > c.start:
            hit = np.nonzero((starts < c.end) & (ends > c.start))[0]
        else:
            hit = np.nonzero((starts <= c.start) & (ends > c.start))[0]
        if len(hit):
            out[i] = hit[0], hit[-1]
    return out


def merge_segments(captions: list[Caption], min_seconds: float) -> list[tuple[int, int]]:
    """Groups of adjacent captions (in time order) lasting at least ``min_seconds``.

    Returns (first, last) positions into ``sorted_by_time(captions)``. A short tail
    joins the previous group rather than standing alone.
    """
    groups: list[tuple[int, int]] = []
    i = 0
    order = sorted_by_time(captions)
    while i < len(order):
        j = i
        while order[j].end - order[i].start < min_seconds and j + 1 < len(order):
            j += 1
        groups.append((i, j))
        i = j + 1
    if len(groups) > 1 and order[groups[-1][1]].end - order[groups[-1][0]].start < min_seconds:
        (a, _), (_, b) = groups[-2], groups.pop()
        groups[-1] = (a, b)
    return groups


def sorted_by_time(captions) -> list[Caption]:
    return sorted(captions, key=lambda c: (c.start, c.end))


class VideoTextDataset:
    """Random-access examples for one split; an example's clips (not its whole video) are read on demand.

    Items are addressed by ``index`` or ``(index, epoch)``: the random crop of a
    long video depends on (seed, epoch, index) only, so DataLoader workers and a
    resumed run see exactly the same data. Each process opens its own shard
    handles (HDF5 handles must not cross a fork).
    """

    def __init__(self, store: FeatureStore, entries: list[VideoEntry], cfg: DataConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.directory = store.directory
        self._store, self._pid = store, os.getpid()
        present = [e for e in entries if e.video_id in store]
        self.missing = len(entries) - len(present)
        if not present:
            raise DataError(f"none of the {len(entries)} manifest videos are in the shards of {store.directory}")
        if self.missing:
            log.warning("%d of %d manifest videos have no features (failed or not extracted); skipped",
                        self.missing, len(entries))
        self.videos = present
        # One row per example: video, first and last caption of its group in time order (-1, -1: the whole
        # video), first and last clip it may use (the whole video for a crop). Knowing the clips up front,
        # __getitem__ reads only those; a numpy table, not tuples, for millions of examples.
        rows: list[tuple[int, int, int, int, int]] = []
        uncovered: list[str] = []  # captions overlapping no clip of their video
        for vi, e in enumerate(present):
            caps = sorted_by_time(e.captions)
            times = store.clip_times(e.video_id)
            spans = caption_spans(times[:, 0], times[:, 1], caps)
            for c, sp in zip(caps, spans):
                if sp[0] < 0:
                    uncovered.append(f"{e.video_id} [{c.start:.2f}, {c.end:.2f}] s "
                                     f"(clips cover {times[0, 0]:.2f}-{times[-1, 1]:.2f} s)")
            rows.extend(self._video_examples(vi, caps, spans, len(times)))
        self.examples = np.array(rows, dtype=np.int64).reshape(-1, 5)
        self.uncovered = len(uncovered)
        if uncovered:
            log.warning("%d caption(s) overlap no clip of their video and are left out, e.g. %s",
                        len(uncovered), "; ".join(uncovered[:3]))
        if not len(self.examples):
            raise DataError(f"no examples: none of the {len(present)} videos with features has a caption "
                            "overlapping its clips")

    def _video_examples(self, vi: int, caps: list[Caption], spans: np.ndarray, n_clips: int) -> list[tuple]:
        """The example rows of one video (see ``__init__``), from its captions' clip spans."""
        if self.cfg.mode == "video":
            return [(vi, -1, -1, 0, n_clips - 1)] if (spans[:, 0] >= 0).any() else []
        rows = []
        for a, b in merge_segments(caps, self.cfg.min_segment_seconds):
            covered = spans[a : b + 1]
            covered = covered[covered[:, 0] >= 0]
            if len(covered):  # a segment needs at least one caption on its clips
                first = int(covered[:, 0].min())
                rows.append((vi, a, b, first, min(int(covered[:, 1].max()), first + self.cfg.max_frames - 1)))
        return rows

    @property
    def store(self) -> FeatureStore:
        if self._pid != os.getpid():  # a forked DataLoader worker: open our own handles
            self._store, self._pid = FeatureStore(self.directory), os.getpid()
        return self._store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        vi, a, b, first, last = (int(x) for x in self.examples[index])
        entry = self.videos[vi]
        caps = sorted_by_time(entry.captions)
        if a < 0:  # whole video, random crop
            n = last + 1
            rng = np.random.default_rng((self.seed, epoch, index))
            first = int(rng.integers(0, n - self.cfg.max_frames + 1)) if n > self.cfg.max_frames else 0
            last = min(n, first + self.cfg.max_frames) - 1
            texts = caps
        else:
            texts = caps[a : b + 1]
        feats = self.store.get(entry.video_id, first, last + 1)  # the example's clips only
        starts, ends = feats.starts, feats.ends
        spans = caption_spans(starts, ends, texts)
        keep = spans[:, 0] >= 0
        texts = [c for c, k in zip(texts, keep) if k]
        return {
            "video_id": entry.video_id,
            "features": feats.features,
            "tokens": feats.tokens,
            "clip_starts": starts,
            "clip_ends": ends,
            "texts": [c.text for c in texts],
            "text_spans": spans[keep],
            "text_times": np.array([(c.start, c.end) for c in texts], dtype=np.float32).reshape(-1, 2),
        }
