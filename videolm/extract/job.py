"""The feature-extraction batch job: manifest -> decode -> encode -> HDF5 shards.

Sharding is a pure function of the manifest: shard ``s`` holds manifest videos
``[s * shard_size, (s + 1) * shard_size)`` and node ``r`` of ``N`` owns the shards
with ``s % N == r``. Any number of machines can therefore run the same command
with their own ``--node-rank`` (a Slurm array, a Kubernetes indexed job) and no
coordinator. A finished shard is never redone, so re-running a killed job
resumes it.

Within a node, decoder processes (``workers.py``) decode videos ahead of the
encoder. Videos are encoded and written strictly in manifest order, with encoder
batches cut at fixed points (every ``batch_size`` clips, and at each shard's
end), so a resumed run writes exactly the bytes an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from .config import ExtractConfig, SamplingSpec
from ..config import to_dict
from ..manifests.manifest import VideoEntry, load_manifest
from ..features.hdf5 import ShardError
from ..features.layout import (
    EXTRACT_CONFIG_NAME, list_shards, remove_partials, set_aside_name, shard_count, shard_name, temporary_name,
)
from ..features.shards import ShardReader, ShardWriter, read_shard_attrs
from .workers import DecoderPool, decode_video
from ..errors import VideolmError

if TYPE_CHECKING:
    from .encoders import Encoder

log = logging.getLogger("videolm.extract")


class ExtractError(VideolmError, RuntimeError):
    """The run itself cannot proceed (bad config, mismatched directory): exit non-zero."""


@dataclass
class ExtractSummary:
    out_dir: str
    num_shards: int
    node_shards: int
    shards_written: int
    shards_skipped: int
    videos_ok: int = 0
    videos_failed: int = 0
    clips: int = 0
    seconds: float = 0.0
    failures_file: str = ""
    failures_total: int = 0

    def line(self) -> str:
        rate = self.clips / self.seconds if self.seconds else 0.0
        return (
            f"extract: {self.shards_written} shard(s) written, {self.shards_skipped} already done "
            f"(node owns {self.node_shards} of {self.num_shards}); {self.videos_ok} videos ok, "
            f"{self.videos_failed} failed, {self.clips} clips in {self.seconds:.1f} s ({rate:.1f} clips/s)"
        )


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Video:
    entry: VideoEntry
    shard: int
    last_of_shard: bool
    pending: list[np.ndarray] = field(default_factory=list)  # decoded clip frames not yet encoded
    starts: list[np.ndarray] = field(default_factory=list)
    ends: list[np.ndarray] = field(default_factory=list)
    encoded: list[np.ndarray] = field(default_factory=list)
    n_arrived: int = 0
    n_taken: int = 0  # clips handed to the encoder so far
    done: bool = False
    duration: float = 0.0
    error: str | None = None

    @property
    def drained(self) -> bool:
        """Nothing more will come from this video for the encoder."""
        return self.error is not None or (self.done and self.n_taken == self.n_arrived)

    @property
    def complete(self) -> bool:
        return self.error is not None or (self.drained and sum(len(e) for e in self.encoded) == self.n_arrived)


class _Progress:
    """tqdm on a terminal; a plain log line every few seconds otherwise (batch logs)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.videos, self.clips, self.failed = total, 0, 0, 0
        self.t0 = self._last = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="video", desc="extract", dynamic_ncols=True)
        self.plain = enabled and self.bar is None

    def update(self, clips: int, failed: bool):
        self.videos += 1
        self.clips += clips
        self.failed += failed
        rate = self.clips / max(1e-9, time.monotonic() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(clips=self.clips, clips_s=f"{rate:.0f}", failed=self.failed, refresh=False)
        elif self.plain and (time.monotonic() - self._last > 10 or self.videos == self.total):
            self._last = time.monotonic()
            print(f"[extract] {self.videos}/{self.total} videos, {self.clips} clips ({rate:.0f} clips/s), "
                  f"{self.failed} failed", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _check_directory(out: Path, key: dict) -> None:
    """Refuse to mix runs with different features or manifests in one directory."""
    path = out / EXTRACT_CONFIG_NAME
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") != key:
            diffs = [k for k in key if old.get("key", {}).get(k) != key[k]]
            raise ExtractError(
                f"{out} already holds features from a different run (differs in: {', '.join(diffs)}); "
                "use a new --out directory, or delete the old shards"
            )
        return
    tmp = temporary_name(path)
    tmp.write_text(json.dumps({"key": key, "videolm_version": __version__}, indent=2))
    os.replace(tmp, path)


def _shard_is_finished(path: Path, manifest_sha: str) -> bool:
    if not path.exists():
        return False
    try:
        attrs = read_shard_attrs(path)
    except ShardError as exc:
        # Only a whole file is ever renamed into place, so this is damage after the
        # fact (disk, copy): keep the evidence, redo the shard.
        aside = set_aside_name(path)
        os.replace(path, aside)
        log.warning("%s; moved to %s and re-extracting", exc, aside.name)
        return False
    if attrs.get("manifest_sha256") != manifest_sha:
        raise ExtractError(f"{path} was written from a different manifest; use a new --out directory")
    return True


def run_extract(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ExtractConfig,
    num_nodes: int = 1,
    node_rank: int = 0,
    split: str | None = None,
    progress: bool = True,
) -> ExtractSummary:
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ExtractError(f"--node-rank must be in [0, {num_nodes}), got {node_rank}")
    entries = load_manifest(manifest, split=split)
    if not entries:
        raise ExtractError(f"{manifest}: no videos" + (f" in split {split!r}" if split else ""))
    out = Path(out_dir)
    num_shards = shard_count(len(entries), cfg.shard_size)
    mine = [s for s in range(num_shards) if s % num_nodes == node_rank]
    # Decoder processes take a moment to start; launch them before the encoder
    # imports torch (over a second) so the two overlap.
    unwritten = sum(len(_shard_entries(entries, s, cfg.shard_size)) for s in mine if not (out / shard_name(s)).exists())
    pool = _start_decoders(cfg, unwritten)
    try:
        from .encoders import build_encoder

        encoder = build_encoder(cfg.encoder, cfg.weights, cfg.device)
        sampling = cfg.resolve_sampling(encoder.default_sampling)
        out.mkdir(parents=True, exist_ok=True)
        manifest_sha = file_sha256(manifest)
        _check_directory(out, _directory_key(cfg, encoder.dim, sampling, manifest_sha, split, len(entries)))
        pending = _pending_shards(out, mine, manifest_sha)
        summary = ExtractSummary(str(out), num_shards, len(mine), len(pending), len(mine) - len(pending))
        attrs = _shard_attrs(cfg, sampling, num_shards, manifest, manifest_sha, split)
        queue = [v for s in pending for v in _shard_videos(entries, s, cfg.shard_size)]
        t0 = time.monotonic()
        if queue:
            if pool is None:  # a damaged shard was set aside after the count above
                pool = _start_decoders(cfg, len(queue))
            _Pipeline(queue, out, encoder, sampling, cfg, attrs, _Progress(len(queue), progress), summary,
                      pool).run()
    finally:
        if pool is not None:
            pool.close()
    summary.seconds = time.monotonic() - t0
    summary.failures_file, summary.failures_total = _write_failures(out, entries)
    return summary


def _start_decoders(cfg: ExtractConfig, videos: int) -> DecoderPool | None:
    """Decoder processes for ``videos`` videos, or None to decode in this process (--workers 0, or nothing to do)."""
    if not cfg.workers or not videos:
        return None
    return DecoderPool(min(cfg.workers, videos), cfg.backend, cfg.threads, cfg.timeout, mode=cfg.decode)


def _shard_entries(entries: list[VideoEntry], shard: int, shard_size: int) -> list[VideoEntry]:
    return entries[shard * shard_size : (shard + 1) * shard_size]


def _shard_videos(entries: list[VideoEntry], shard: int, shard_size: int) -> list[_Video]:
    chunk = _shard_entries(entries, shard, shard_size)
    return [_Video(e, shard, i == len(chunk) - 1) for i, e in enumerate(chunk)]


def _directory_key(cfg: ExtractConfig, dim: int, sampling: SamplingSpec, manifest_sha: str, split: str | None,
                   num_videos: int) -> dict:
    """What every shard of the directory must share; recorded in extract_config.json."""
    key = {
        "encoder": cfg.encoder,
        "weights": cfg.weights,
        "sampling": dataclasses.asdict(sampling),
        "dim": dim,
        "manifest_sha256": manifest_sha,
        "split": split,
        "shard_size": cfg.shard_size,
        "num_videos": num_videos,
    }
    if cfg.decode != "exact":  # absent for exact, so directories made before the option still resume
        key["decode"] = cfg.decode
    return key


def _shard_attrs(cfg: ExtractConfig, sampling: SamplingSpec, num_shards: int, manifest: str | os.PathLike,
                 manifest_sha: str, split: str | None) -> dict:
    """The attributes every shard of this run carries (ShardWriter adds the per-shard ones)."""
    return {
        "encoder": cfg.encoder,
        "config": json.dumps({**to_dict(cfg), "sampling": dataclasses.asdict(sampling)}, sort_keys=True),
        "videolm_version": __version__,
        "num_shards": num_shards,
        "manifest_sha256": manifest_sha,
        "manifest": str(Path(manifest).resolve()),
        "split": split or "",
    }


def _pending_shards(out: Path, mine: list[int], manifest_sha: str) -> list[int]:
    """This node's shards that are not finished yet, after removing leftovers of killed writers."""
    pending = []
    for s in mine:
        remove_partials(out, s)
        if not _shard_is_finished(out / shard_name(s), manifest_sha):
            pending.append(s)
    return pending


def _write_failures(out: Path, entries: list[VideoEntry]) -> tuple[str, int]:
    """failures.jsonl lists every failed video of every finished shard in the directory."""
    paths = {e.video_id: e.path for e in entries}
    rows = []
    for p in list_shards(out):
        try:
            with ShardReader(p) as r:
                rows += [{"video_id": v, "path": paths.get(v), "shard": p.name, "error": e} for v, e in r.failures()]
        except ShardError as exc:
            log.warning("%s", exc)
    target = out / "failures.jsonl"
    tmp = temporary_name(target)
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    return str(target), len(rows)


class _Pipeline:
    """Feeds decoded clips to the encoder in manifest order and writes shards."""

    def __init__(self, queue, out, encoder: Encoder, sampling: SamplingSpec, cfg: ExtractConfig, attrs, progress,
                 summary, pool: DecoderPool | None):
        self.queue, self.out, self.encoder, self.sampling, self.cfg = queue, out, encoder, sampling, cfg
        self.attrs, self.progress, self.summary, self.pool = attrs, progress, summary, pool
        self.by_id = {}
        self.head = 0  # first video not yet written
        self.cursor = 0  # first video with clips not yet handed to the encoder
        self.writer: ShardWriter | None = None
        self.buffered = 0  # decoded clips waiting for the encoder

    def run(self):
        try:
            if self.pool is None:
                self._run_inline()
            else:
                self._run_pool()
        except BaseException:
            if self.writer is not None:
                self.writer.abort()
            raise
        finally:
            self.progress.close()

    def _run_inline(self):
        sink = _CallbackConn(self._on_message)
        for i, v in enumerate(self.queue):
            self.by_id[v.entry.video_id] = i
            decode_video(sink, v.entry.video_id, v.entry.path, self.sampling, self.cfg.backend, self.cfg.threads,
                         self.cfg.decode)

    def _on_message(self, msg):
        self._receive(msg)
        self._encode_ready()

    def _run_pool(self):
        pool, nxt = self.pool, 0
        lookahead = 2 * self.cfg.workers + 2  # bounds memory held by videos decoded ahead
        while self.head < len(self.queue):
            # Decode ahead by a few videos, and further while the buffered clips cannot
            # fill the next batch: otherwise a run of short videos would wait forever.
            while pool.idle and nxt < len(self.queue) and (
                nxt < self.head + lookahead or self.buffered < self.cfg.batch_size
            ):
                v = self.queue[nxt]
                self.by_id[v.entry.video_id] = nxt
                pool.submit(v.entry.video_id, v.entry.path, self.sampling)
                nxt += 1
            messages = pool.poll(0.05)
            for msg in messages:
                self._receive(msg)
            head = self.head
            self._encode_ready()
            if not messages and pool.busy == 0 and self.head == head:
                # Nothing running, nothing arrived, nothing written: a bug, not a slow video.
                raise RuntimeError(f"extraction pipeline stalled at video {head} of {len(self.queue)}")

    def _receive(self, msg):
        kind, video_id, payload = msg
        v = self.queue[self.by_id[video_id]]
        if kind == "clips":
            v.pending.append(payload.frames)
            v.starts.append(payload.starts)
            v.ends.append(payload.ends)
            v.n_arrived += len(payload.starts)
            self.buffered += len(payload.starts)
        elif kind == "done" and v.n_arrived == 0:
            v.error = "decoder produced no clips"
        elif kind == "done":
            v.done, v.duration = True, payload
        else:
            v.error = payload
        if v.error is not None:
            self.buffered -= sum(len(f) for f in v.pending)
            v.pending, v.encoded = [], []

    def _encode_ready(self):
        """Encode every batch that is ready, in order, and write the videos it completes."""
        while True:
            taken = self._take_batch()
            if not taken:
                break
            # Without a crop, videos of different sizes give clips of different shapes;
            # each shape is one forward pass (still a fixed function of the batch).
            groups: dict[tuple, list[int]] = {}
            for i, (_, frames) in enumerate(taken):
                groups.setdefault(frames.shape[1:], []).append(i)
            out: list[np.ndarray | None] = [None] * len(taken)
            for members in groups.values():
                feats = self.encoder.encode(np.concatenate([taken[i][1] for i in members]))
                row = 0
                for i in members:
                    n = len(taken[i][1])
                    out[i], row = feats[row : row + n], row + n
            for (v, _), f in zip(taken, out):
                if v.error is None:
                    v.encoded.append(f)
            self._write_complete()
        self._write_complete()

    def _batch_size_ready(self) -> int:
        """Clips in the next batch, or 0 while it is not yet determined.

        A batch is cut after ``batch_size`` clips or at a shard's last video, and
        nowhere else, so its contents never depend on how fast workers decode.
        """
        size, got = self.cfg.batch_size, 0
        for i in range(self.cursor, len(self.queue)):
            v = self.queue[i]
            if v.error is None:
                got += v.n_arrived - v.n_taken
                if got >= size:
                    return size
                if not v.done:
                    return 0  # more clips of this video are still coming
            if v.last_of_shard:
                return got
        return 0

    def _take_batch(self) -> list[tuple[_Video, np.ndarray]]:
        want = self._batch_size_ready()
        taken = []
        while want > 0:
            v = self.queue[self.cursor]
            if v.pending and v.error is None:
                frames = v.pending[0]
                k = min(want, len(frames))
                taken.append((v, frames[:k]))
                if k == len(frames):
                    v.pending.pop(0)
                else:
                    v.pending[0] = frames[k:]
                v.n_taken += k
                self.buffered -= k
                want -= k
            if v.drained:
                self.cursor += 1
        while self.cursor < len(self.queue) and self.queue[self.cursor].drained:
            self.cursor += 1
        return taken

    def _write_complete(self):
        while self.head < len(self.queue) and self.queue[self.head].complete:
            v = self.queue[self.head]
            if self.writer is None:
                self.writer = ShardWriter(self.out / shard_name(v.shard), self.encoder.dim,
                                          {**self.attrs, "shard_index": v.shard})
            if v.error is not None:
                self.writer.add_failure(v.entry.video_id, v.error)
                log.debug("%s failed: %s", v.entry.video_id, v.error)
                self.summary.videos_failed += 1
                self.progress.update(0, True)
            else:
                feats = np.concatenate(v.encoded)
                self.writer.add_video(v.entry.video_id, feats, np.concatenate(v.starts), np.concatenate(v.ends),
                                      v.duration)
                self.summary.videos_ok += 1
                self.summary.clips += len(feats)
                self.progress.update(len(feats), False)
            v.encoded, v.pending = [], []  # free memory of written videos
            self.head += 1
            if v.last_of_shard:
                self.writer.finish()
                self.writer = None


class _CallbackConn:
    """Stands in for a worker's pipe when decoding runs in the main process (--workers 0)."""

    def __init__(self, callback):
        self.send = callback
