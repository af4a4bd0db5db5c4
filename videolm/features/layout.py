"""Every name in a feature directory (docs/formats.md, "Feature directory").

Shard and token file names, the codebook and extract config, and the marks of
files that are not published (partial, temporary, set aside) are made and parsed
here only, so that the extract and quantize jobs and ``videolm verify`` cannot
disagree on them. Names only: nothing here opens an HDF5 file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

_SHARD_PREFIX = "shard_"
_SHARD_DIGITS = 5
_SHARD_GLOB = _SHARD_PREFIX + "[0-9]" * _SHARD_DIGITS
_TOKENS_SUFFIX = ".tokens.h5"
CODEBOOK_NAME = "codebook.h5"
EXTRACT_CONFIG_NAME = "extract_config.json"  # what the shards hold; written once by the extract job
# Saved faiss indexes of eval-retrieval (retrieval/index_cache.py owns the files inside); not
# features, so verify and the jobs that write shards leave this folder alone.
INDEX_CACHE_DIR = "indexes"
# Marks in the name of a file that is not published. A partial is resumable (its
# tag ties it to its inputs), a temporary file is thrown away, and a set-aside file
# is a damaged shard the extract job moved out of the way before redoing it.
_PARTIAL_MARK = ".partial-"
_TEMP_MARK = ".tmp-"
_SET_ASIDE_MARK = ".corrupt-"


def shard_name(index: int) -> str:
    return f"{_SHARD_PREFIX}{index:0{_SHARD_DIGITS}d}.h5"


def shard_index(path: str | os.PathLike) -> int:
    """The index in a shard's (or its token file's) name: ``shard_00012.h5`` -> 12."""
    name = Path(path).name
    return int(name[len(_SHARD_PREFIX) : len(_SHARD_PREFIX) + _SHARD_DIGITS])


def list_shards(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob(_SHARD_GLOB + ".h5"))


def token_path(shard: str | os.PathLike) -> Path:
    """The token file beside a shard: ``shard_00012.h5`` -> ``shard_00012.tokens.h5``."""
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(".h5")] + _TOKENS_SUFFIX)


def list_token_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob(_SHARD_GLOB + _TOKENS_SUFFIX))


def shard_count(num_videos: int, shard_size: int) -> int:
    """Shards that ``num_videos`` manifest videos fill, ``shard_size`` to a shard (the last may be short)."""
    return -(-num_videos // shard_size)


def read_extract_config(directory: str | os.PathLike) -> dict | None:
    """The directory's ``extract_config.json`` ({"key": ..., "videolm_version"}), or None if missing or unreadable."""
    try:
        return json.loads((Path(directory) / EXTRACT_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None


def planned_shard_count(key: dict) -> int | None:
    """Shards of the extraction ``extract_config.json['key']`` records, or None when it does not say."""
    if not key.get("num_videos") or not key.get("shard_size"):
        return None
    return shard_count(int(key["num_videos"]), int(key["shard_size"]))


def writer_tag() -> str:
    """Host and process of this writer, for temporary names on a shared disk (in Kubernetes every pod is PID 1)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def partial_name(final: Path, tag: str) -> Path:
    """Where a file is written before it is published; ``tag`` ties it to its inputs."""
    return final.with_name(f"{final.name}{_PARTIAL_MARK}{tag}")


def temporary_name(final: Path) -> Path:
    """Where this process writes ``final`` before renaming it into place."""
    return final.with_name(f"{final.name}{_TEMP_MARK}{writer_tag()}")


def set_aside_name(path: Path) -> Path:
    """Where a damaged file is moved (kept as evidence) so that it can be written again."""
    return path.with_name(f"{path.name}{_SET_ASIDE_MARK}{int(time.time())}")


def unfinished_files(directory: str | os.PathLike) -> list[Path]:
    """Partial and temporary files: leftovers of interrupted writers, or files being written now."""
    d = Path(directory)
    return sorted(d.glob(f"*{_PARTIAL_MARK}*")) + sorted(d.glob(f"*{_TEMP_MARK}*"))


def set_aside_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob(f"*{_SET_ASIDE_MARK}*"))


def unfinished_quantize_files(directory: str | os.PathLike) -> list[Path]:
    """Partial and temporary copies of token files and of the codebook."""
    d = Path(directory)
    found = [*d.glob(f"{_SHARD_PREFIX}*{_TOKENS_SUFFIX}.*"), *d.glob(f"{CODEBOOK_NAME}.*")]
    return [p for p in found if _TEMP_MARK in p.name or _PARTIAL_MARK in p.name]


def remove_partials(directory: str | os.PathLike, index: int) -> int:
    """Delete leftovers of crashed writers of shard ``index``; returns how many."""
    removed = 0
    for p in Path(directory).glob(f"{shard_name(index)}{_PARTIAL_MARK}*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed
