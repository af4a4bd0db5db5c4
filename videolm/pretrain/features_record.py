"""``features.json``: how a run's video features were made, so new raw videos can be embedded the same way.

A model trained on features only understands features from the same encoder,
weights and sampling. Every checkpoint directory of a run trained from a feature
directory carries this record (``checkpoint.feature_record`` reads it back)::

    {"encoder": "clip", "weights": "/models/clip-vit-b32", "weights_sha256": "…",
     "sampling": {"fps": 1.0, "frames_per_clip": 1, "clip_stride": 1.0, "short_side": 224, "crop": 224},
     "dim": 512, "backend": "av", "decode": "exact",
     "feature_dir": "/data/feats", "manifest_sha256": "…", "num_videos": 1200, "videolm_version": "0.3.0"}

Most of it is the feature directory's ``extract_config.json`` key; the decoder
backend is only in the shards' ``config`` attribute. ``extract_config.json`` has no
fingerprint of the weights, so one is taken here, when training starts: the sha256
of the weights file, or for a model directory the sha256 over its model files'
names and sha256s. It names the weights as they are at training time.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path

from ..extract.job import file_sha256
from ..features.layout import list_shards, read_extract_config
from ..features.shards import read_shard_attrs

FEATURES_JSON = "features.json"
SAMPLING_FIELDS = ("fps", "frames_per_clip", "clip_stride", "short_side", "crop")
# the files of a model directory that decide its outputs (not READMEs, not tokenizers' caches)
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".h5", ".msgpack")


def weights_sha256(weights: str | None) -> str | None:
    """Fingerprint of an encoder's weights: a file's sha256, or a directory's model files' (None if absent)."""
    if not weights:
        return None
    path = Path(weights)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None  # the path moved or was never local: record the name only
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and (p.suffix in _MODEL_FILE_SUFFIXES or p.name == "config.json"))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _shard_config(directory: Path) -> tuple[dict, dict]:
    """(the first shard's extract config, its attributes); empty when the directory has no readable shard."""
    shards = list_shards(directory)
    if not shards:
        return {}, {}
    try:
        attrs = read_shard_attrs(shards[0])
    except Exception:  # noqa: BLE001 - a damaged shard is reported by training itself, not here
        return {}, {}
    try:
        return json.loads(attrs.get("config") or "{}"), attrs
    except ValueError:
        return {}, attrs


def describe_features(directory: str | os.PathLike) -> dict | None:
    """The ``features.json`` record of a feature directory, or None when nothing says how it was made.

    Computed once per directory and process: every checkpoint of a run carries it, and hashing an
    encoder's weights (hundreds of MB) at each save would slow training down."""
    return copy.deepcopy(_describe(str(Path(directory).resolve())))


@functools.lru_cache(maxsize=16)
def _describe(resolved: str) -> dict | None:
    directory = Path(resolved)
    key = (read_extract_config(directory) or {}).get("key") or {}
    config, attrs = _shard_config(directory)
    if not key and not config:
        return None
    sampling = key.get("sampling") or config.get("sampling") or {}
    weights = key.get("weights", config.get("weights"))
    dim = key.get("dim", attrs.get("dim"))
    return {
        "encoder": str(key.get("encoder") or config.get("encoder") or attrs.get("encoder") or "unknown"),
        "weights": weights,
        "weights_sha256": weights_sha256(weights),
        "sampling": {f: sampling.get(f) for f in SAMPLING_FIELDS},
        "dim": int(dim) if dim is not None else None,
        "backend": str(config.get("backend") or "av"),  # "av" is ExtractConfig's default
        # extract_config.json omits decode when it is "exact" (older directories predate the option)
        "decode": str(key.get("decode") or config.get("decode") or "exact"),
        "feature_dir": str(directory.resolve()),
        "manifest_sha256": key.get("manifest_sha256") or attrs.get("manifest_sha256"),
        "num_videos": key.get("num_videos"),
        "videolm_version": (read_extract_config(directory) or {}).get("videolm_version"),
    }


def write_features_json(record: dict | None, directory: Path) -> None:
    """Write ``record`` as ``features.json`` into ``directory`` (nothing when there is no record)."""
    if record is not None:
        (Path(directory) / FEATURES_JSON).write_text(json.dumps(record, indent=2))


def read_features_json(directory: Path) -> dict | None:
    path = Path(directory) / FEATURES_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
