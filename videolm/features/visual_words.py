"""Visual words on disk: the token files beside the shards and the codebook.

Tokens live in their own file beside each shard (``shard_NNNNN.tokens.h5``) so that
quantising never opens a feature shard for writing: a crash cannot damage
features, and a new codebook simply replaces the token files. This module owns
their HDF5 layout (docs/formats.md, "Visual words"); the quantize job decides
what goes in them.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from .hdf5 import ShardError, checksums_json, dataset_digest, plain_attrs
from .layout import temporary_name

TOKENS_FORMAT = "videolm-tokens"
CODEBOOK_FORMAT = "videolm-codebook"
TOKEN_DATASETS = ("tokens", "paths")  # int32 word and int16 tree path of every clip, rows as in the shard


def _publish(tmp: Path, final: Path, f: h5py.File) -> None:
    f.flush()
    os.fsync(f.id.get_vfd_handle())
    f.close()
    os.replace(tmp, final)


def write_token_file(path: Path, tokens: np.ndarray, paths: np.ndarray, attrs: dict) -> Path:
    """Write a complete token file under ``path`` (callers choose temporary or final names)."""
    tmp = temporary_name(path)
    f = h5py.File(tmp, "w")
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["format"] = TOKENS_FORMAT
    tokens, paths = tokens.astype(np.int32), paths.astype(np.int16)
    f.create_dataset("tokens", data=tokens)
    f.create_dataset("paths", data=paths)
    f.attrs["checksums"] = checksums_json({"tokens": dataset_digest(tokens), "paths": dataset_digest(paths)})
    _publish(tmp, path, f)
    return path


def read_token_attrs(path: str | os.PathLike) -> dict | None:
    """Attributes of a readable token file, or None when it is missing or damaged."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != TOKENS_FORMAT or "tokens" not in f:
                return None
            return plain_attrs(f.attrs)
    except (OSError, KeyError):
        return None


def read_token_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            return f["tokens"][()], f["paths"][()]
    except (OSError, KeyError) as exc:
        raise ShardError(f"{path}: cannot read token file: {exc}") from None


def write_codebook(path: Path, levels: list[dict[str, np.ndarray]], attrs: dict) -> Path:
    """One HDF5 file: level_<l>/{centroids, parent, child_index, first_child, num_children} + JSON attrs."""
    tmp = temporary_name(path)
    f = h5py.File(tmp, "w")
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["format"] = CODEBOOK_FORMAT
    for i, level in enumerate(levels):
        g = f.create_group(_level_group(i))
        for name, arr in level.items():
            g.create_dataset(name, data=arr)
    digests = {key: dataset_digest(arr) for key, arr in codebook_datasets(levels).items()}
    f.attrs["checksums"] = checksums_json(digests)
    _publish(tmp, path, f)
    return path


def read_codebook_attrs(path: str | os.PathLike) -> dict | None:
    """A codebook's attributes (config, fingerprint, vocabulary), or None if there is none."""
    if not Path(path).exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != CODEBOOK_FORMAT:
                raise ShardError(f"{path}: not a videolm codebook")
            return plain_attrs(f.attrs)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read codebook: {exc}") from None


def read_codebook(path: str | os.PathLike) -> tuple[list[dict[str, np.ndarray]], dict]:
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != CODEBOOK_FORMAT:
                raise ShardError(f"{path}: not a videolm codebook")
            attrs = plain_attrs(f.attrs)
            return read_codebook_levels(f, int(attrs["levels"])), attrs
    except (OSError, KeyError) as exc:
        raise ShardError(f"{path}: cannot read codebook: {exc}") from None


def _level_group(level: int) -> str:
    return f"level_{level}"


def read_codebook_levels(f, levels: int) -> list[dict[str, np.ndarray]]:
    """The tree in an open codebook file, top level first: each level's datasets by name."""
    tree = []
    for i in range(levels):
        g = f[_level_group(i)]
        tree.append({name: g[name][()] for name in g})
    return tree


def codebook_datasets(levels: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A tree's datasets keyed by their path in the codebook file (``level_<l>/<name>``), as its checksums are."""
    return {f"{_level_group(i)}/{name}": arr for i, level in enumerate(levels) for name, arr in level.items()}
