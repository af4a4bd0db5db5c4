"""HDF5 feature shards: writing, reading, and the store of a feature directory.

One shard = one HDF5 file ``shard_NNNNN.h5`` holding the clips of up to
``shard_size`` consecutive manifest videos (layout in docs/formats.md):

    attrs      format="videolm-features", format_version, encoder, dim,
               config (JSON of the ExtractConfig), videolm_version,
               shard_index, num_shards, manifest, manifest_sha256, split,
               num_videos, num_clips, num_failed
    features   float16 (total_clips, dim)    all videos' clips, concatenated
    clip_times float32 (total_clips, 2)      start, end in seconds
    index/video_id  str (n_videos,)          in manifest order
    index/offset    int64 (n_videos,)        first row of the video in features
    index/num_clips int32 (n_videos,)
    index/duration  float32 (n_videos,)      seconds, from the stream timestamps
    failures/video_id, failures/error  str   videos that could not be extracted
    attrs checksums  JSON {dataset path: sha256 of its content} (see ``hdf5.dataset_digest``)

A shard is written under a temporary name and renamed when complete, so a file
named ``shard_NNNNN.h5`` is always whole. Reading one video is a lookup in the
small index followed by one contiguous slice: no scan of the file.

The ``features`` package is the only one that touches h5py: the file names are in
layout.py, the shared HDF5 helpers in hdf5.py, token files and the codebook in
visual_words.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .hdf5 import ShardError, checksums_json, dataset_digest, decode_strings, plain_attrs
from .layout import CODEBOOK_NAME, list_shards, partial_name, token_path, writer_tag
from .visual_words import read_codebook_attrs, read_token_attrs, read_token_file

FORMAT = "videolm-features"
FORMAT_VERSION = 1
_STR = h5py.string_dtype(encoding="utf-8")
# 64 rows per chunk: one video's read touches one or two small chunks, while
# appends stay cheap. Measured faster than one dataset per video (see docs/formats.md).
_CHUNK_ROWS = 64

# Every dataset of a shard, in the order of the layout above; a finished shard holds all of them.
SHARD_DATASETS = ("features", "clip_times", "index/video_id", "index/offset", "index/num_clips", "index/duration",
                  "failures/video_id", "failures/error")


class ShardWriter:
    """Append videos in order, then ``finish()`` to atomically publish the shard."""

    def __init__(self, path: str | os.PathLike, dim: int, attrs: dict):
        self.path = Path(path)
        self.dim = dim
        # Host and pid in the temporary name: two machines writing to a shared disk
        # never collide, and a crashed run's leftovers are recognisable.
        self.tmp = partial_name(self.path, writer_tag())
        self._file = h5py.File(self.tmp, "w")
        for key, value in attrs.items():
            self._file.attrs[key] = value
        self._file.attrs["format"] = FORMAT
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["dim"] = dim
        self._features = self._file.create_dataset(
            "features", shape=(0, dim), maxshape=(None, dim), dtype=np.float16, chunks=(_CHUNK_ROWS, dim)
        )
        self._times = self._file.create_dataset(
            "clip_times", shape=(0, 2), maxshape=(None, 2), dtype=np.float32, chunks=(_CHUNK_ROWS * 16, 2)
        )
        self._ids: list[str] = []
        self._offsets: list[int] = []
        self._counts: list[int] = []
        self._durations: list[float] = []
        self._failed: list[tuple[str, str]] = []
        self._rows = 0
        # Content hashes, fed as rows are written (features and clip_times are
        # appended in row order, so this equals the hash of the finished dataset).
        self._feat_hash = hashlib.sha256()
        self._times_hash = hashlib.sha256()

    def add_video(self, video_id: str, features: np.ndarray, starts: np.ndarray, ends: np.ndarray, duration: float):
        n = len(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ShardError(f"{video_id}: features of shape {features.shape}, expected (n, {self.dim})")
        if not (len(starts) == len(ends) == n) or n == 0:
            raise ShardError(f"{video_id}: {n} feature rows but {len(starts)} clip times")
        if not np.isfinite(features).all():
            raise ShardError(f"{video_id}: encoder produced NaN or inf features")
        end = self._rows + n
        feats16 = np.ascontiguousarray(features, dtype=np.float16)
        times = np.ascontiguousarray(np.stack([starts, ends], axis=1), dtype=np.float32)
        self._features.resize((end, self.dim))
        self._features[self._rows : end] = feats16
        self._times.resize((end, 2))
        self._times[self._rows : end] = times
        self._feat_hash.update(feats16.tobytes())
        self._times_hash.update(times.tobytes())
        self._ids.append(video_id)
        self._offsets.append(self._rows)
        self._counts.append(n)
        self._durations.append(float(duration))
        self._rows = end

    def add_failure(self, video_id: str, error: str):
        self._failed.append((video_id, error))

    def finish(self) -> Path:
        f = self._file
        small = {
            "index/video_id": (np.array(self._ids, dtype=object), _STR),
            "index/offset": (np.array(self._offsets, dtype=np.int64), None),
            "index/num_clips": (np.array(self._counts, dtype=np.int32), None),
            "index/duration": (np.array(self._durations, dtype=np.float32), None),
            "failures/video_id": (np.array([v for v, _ in self._failed], dtype=object), _STR),
            "failures/error": (np.array([e for _, e in self._failed], dtype=object), _STR),
        }
        digests = {"features": self._feat_hash.hexdigest(), "clip_times": self._times_hash.hexdigest()}
        for name, (data, dtype) in small.items():
            f.create_dataset(name, data=data, dtype=dtype)
            digests[name] = dataset_digest(data)
        f.attrs["checksums"] = checksums_json(digests)
        f.attrs["num_videos"] = len(self._ids)
        f.attrs["num_clips"] = self._rows
        f.attrs["num_failed"] = len(self._failed)
        f.flush()
        os.fsync(f.id.get_vfd_handle())
        f.close()
        os.replace(self.tmp, self.path)  # the publish step: atomic on POSIX filesystems
        return self.path

    def abort(self):
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


@dataclass
class VideoFeatures:
    video_id: str
    features: np.ndarray  # float32 (n_clips, dim)
    starts: np.ndarray  # float32 (n_clips,)
    ends: np.ndarray
    duration: float
    tokens: np.ndarray | None = None  # int32 (n_clips,) visual words, when the directory is quantised
    token_paths: np.ndarray | None = None  # int16 (n_clips, levels): child index chosen at each tree level


def clip_window(n: int, start: int = 0, stop: int | None = None) -> tuple[int, int]:
    """Rows ``start:stop`` of a video of ``n`` clips as (first, end), clamped like a Python slice."""
    lo, hi, _ = slice(start, stop).indices(n)
    return lo, max(lo, hi)


class ShardReader:
    """Random access to one shard's videos. Opens lazily; the index is read once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            size = self.path.stat().st_size if self.path.exists() else 0
            raise ShardError(f"{self.path}: cannot open shard: truncated or not an HDF5 file (size {size} bytes; "
                             f"{exc}); run `videolm verify --repair`") from None
        f = self._file
        if f.attrs.get("format") != FORMAT:
            f.close()
            raise ShardError(f"{self.path}: not a videolm feature shard (format attribute missing)")
        try:
            self.video_ids = decode_strings(f["index/video_id"][()])
            self._offsets = f["index/offset"][()]
            self._counts = f["index/num_clips"][()]
            self._durations = f["index/duration"][()]
        except KeyError as exc:
            f.close()
            raise ShardError(f"{self.path}: shard index incomplete ({exc})") from None
        self._row = {v: i for i, v in enumerate(self.video_ids)}
        self.attrs = plain_attrs(f.attrs)
        self.config = json.loads(self.attrs["config"])
        self.dim = int(self.attrs["dim"])
        self._datasets: dict = {}

    def _dataset(self, name: str):
        """An h5py dataset of the shard, looked up once: a lookup by name costs as much as reading a few rows."""
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = self._file[name]
        return ds

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._row

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def num_clips(self) -> int:
        return int(self._file["features"].shape[0])

    def iter_blocks(self, block: int = 16384, rows: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, features as stored: float16) for consecutive blocks of rows.

        With ``rows`` (sorted row numbers), only blocks holding one of them are read,
        so sampling a small fraction of a large shard does not read all of it.
        """
        ds = self._file["features"]
        for a in range(0, ds.shape[0], block):
            b = min(a + block, ds.shape[0])
            if rows is not None and np.searchsorted(rows, a) == np.searchsorted(rows, b):
                continue
            yield a, ds[a:b]  # callers cast what they keep; a float32 copy of every block is wasted work

    def video_spans(self) -> list[tuple[str, int, int]]:
        """(video_id, first row, number of clips) for every video, in file order."""
        return [(v, int(o), int(n)) for v, o, n in zip(self.video_ids, self._offsets, self._counts)]

    def rows(self, video_id: str) -> tuple[int, int]:
        """(first row, number of clips) of a video in ``features`` (and in its token file)."""
        i = self._row[video_id]
        return int(self._offsets[i]), int(self._counts[i])

    def clip_times(self, video_id: str) -> np.ndarray:
        """(n_clips, 2) clip start and end times, without reading features."""
        a, n = self.rows(video_id)
        return self._dataset("clip_times")[a : a + n]

    def get(self, video_id: str, start: int = 0, stop: int | None = None) -> VideoFeatures:
        """A video's clips ``start:stop`` (all of them by default), read alone: a training example that
        uses a few clips of a long video reads and converts those only."""
        a, n = self.rows(video_id)
        lo, hi = clip_window(n, start, stop)
        times = self._dataset("clip_times")[a + lo : a + hi]
        return VideoFeatures(
            video_id=video_id,
            features=self._dataset("features")[a + lo : a + hi].astype(np.float32),
            starts=times[:, 0],
            ends=times[:, 1],
            duration=float(self._durations[self._row[video_id]]),
        )

    def failures(self) -> list[tuple[str, str]]:
        g = self._file["failures"]
        return list(zip(decode_strings(g["video_id"][()]), decode_strings(g["error"][()])))

    def __iter__(self) -> Iterator[VideoFeatures]:
        for v in self.video_ids:
            yield self.get(v)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_readonly(path: str | os.PathLike):
    """An HDF5 file of this directory (shard, token file or codebook) opened read-only, for ``videolm verify``.

    Raises OSError, as h5py does, for a truncated or non-HDF5 file; the caller closes it.
    """
    return h5py.File(path, "r")


def read_shard_attrs(path: str | os.PathLike) -> dict:
    """Attributes of a finished shard, or ShardError if it cannot be read."""
    with ShardReader(path) as r:
        return dict(r.attrs)


def config_key(config: dict) -> str:
    """The settings of a shard's ``config`` that make features comparable: encoder, weights and sampling."""
    return json.dumps({k: config.get(k) for k in ("encoder", "weights", "sampling")}, sort_keys=True)


def check_same_config(shards: list[ShardReader], directory) -> None:
    groups: dict[str, list[str]] = {}
    for s in shards:
        groups.setdefault(config_key(s.config), []).append(s.path.name)
    if len(groups) > 1:
        parts = []
        for key, names in groups.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"[{shown}] with {key}")
        raise ShardError(
            f"{directory}: shards were written with different encoders/configs: " + "; ".join(parts)
            + ". Keep one extraction config per directory."
        )


class FeatureStore:
    """All shards of a feature directory, addressed by video id.

    When the directory has a codebook, ``get`` also returns the video's visual
    words from the token file beside its shard (only token files written with the
    current codebook are used).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        paths = list_shards(self.directory)
        if not paths:
            raise ShardError(f"{self.directory}: no feature shards (shard_*.h5) found")
        self.shards = [ShardReader(p) for p in paths]
        check_same_config(self.shards, self.directory)
        self.dim = self.shards[0].dim
        self._where = {}
        for s in self.shards:
            for v in s.video_ids:
                self._where[v] = s
        self.codebook_attrs = read_codebook_attrs(self.directory / CODEBOOK_NAME)
        self._tokens: dict[Path, tuple[np.ndarray, np.ndarray] | None] = {}

    @property
    def video_ids(self) -> list[str]:
        return list(self._where)

    def fingerprint(self) -> str:
        """sha256 naming the directory's content, from what its files record (no feature is read).

        Per shard: name, size and the sha256 checksums written with it (its mtime for a
        shard written before checksums existed); and the codebook's fingerprint, which
        names the visual words. Copying the directory keeps it; re-extracting changes it.
        """
        shards = []
        for s in self.shards:
            st = s.path.stat()
            shards.append([s.path.name, st.st_size, str(s.attrs.get("checksums") or st.st_mtime_ns)])
        book = None if self.codebook_attrs is None else self.codebook_attrs.get("fingerprint")
        return hashlib.sha256(json.dumps({"shards": shards, "codebook": book}).encode("utf-8")).hexdigest()

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _shard_tokens(self, shard: ShardReader):
        if shard.path not in self._tokens:
            found = None
            if self.codebook_attrs is not None:
                tp = token_path(shard.path)
                attrs = read_token_attrs(tp)
                if attrs is not None and attrs.get("codebook_fingerprint") == self.codebook_attrs["fingerprint"]:
                    found = read_token_file(tp)
            self._tokens[shard.path] = found
        return self._tokens[shard.path]

    def get(self, video_id: str, start: int = 0, stop: int | None = None) -> VideoFeatures:
        """A video's clips ``start:stop`` (default: all), with their visual words when quantised."""
        try:
            shard = self._where[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in the shards of {self.directory}") from None
        out = shard.get(video_id, start, stop)
        tok = self._shard_tokens(shard)
        if tok is not None:
            a, n = shard.rows(video_id)
            lo, hi = clip_window(n, start, stop)
            out.tokens, out.token_paths = tok[0][a + lo : a + hi], tok[1][a + lo : a + hi]
        return out

    def clip_times(self, video_id: str) -> np.ndarray:
        return self._where[video_id].clip_times(video_id)

    def failures(self) -> list[tuple[str, str]]:
        return [f for s in self.shards for f in s.failures()]

    def close(self):
        for s in self.shards:
            s.close()
