"""What every HDF5 file of a feature directory shares: strings, attributes, checksums.

Shards (shards.py), token files and the codebook (visual_words.py) decode their
values and record and check their content hashes the same way, and their readers
raise the same ``ShardError``; both modules build on this one, so it imports
neither (nor h5py: these helpers take what h5py returns).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import VideolmError


class ShardError(VideolmError, RuntimeError):
    """A shard, token file or codebook that cannot be read or written as asked."""


def decode_strings(values) -> list[str]:
    """A string dataset as Python str: h5py returns utf-8 bytes, older files may hold str."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def plain_attrs(attrs) -> dict:
    """HDF5 attributes as plain Python values (numpy scalars unwrapped)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()}


CHECKSUM_ALGORITHM = "sha256"


def dataset_digest(values) -> str:
    """sha256 of a dataset's content: the C-order bytes of a numeric array, or the
    JSON list of a string array (utf-8). Written into ``attrs['checksums']`` when a
    file is finished; ``videolm verify`` recomputes it."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OSU":
        return hashlib.sha256(json.dumps(decode_strings(arr.ravel())).encode("utf-8")).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def read_checksums(attrs) -> dict | None:
    """The recorded {dataset path: sha256}, or None for files written before checksums existed."""
    raw = attrs.get("checksums")
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)


def checksums_json(digests: dict[str, str]) -> str:
    """The ``attrs['checksums']`` JSON of a finished file: its algorithm and {dataset path: sha256}."""
    return json.dumps({"algorithm": CHECKSUM_ALGORITHM, "datasets": digests}, sort_keys=True)
