"""Faiss indexes built once and kept beside the features (``eval-retrieval --index-cache``).

Building an IVF or HNSW index over a large gallery takes seconds to minutes (k-means,
graph construction), and ``eval-retrieval`` used to redo it on every call. Here a built
index is written to ``<features>/indexes/`` and read back by a later evaluation of the
same gallery. Files (docs/formats.md, "Index cache"):

    <slot>-<key>.faiss  faiss.write_index of the built index, before its search-time
                        settings (nprobe, efSearch: ``search.tune_index`` sets them after loading)
    <slot>-<key>.json   sidecar: slot, key, gallery ids, sha256 of the .faiss file, created,
                        videolm and faiss versions

``slot`` and ``key`` are the first 16 hex digits of the sha256 of two dicts. The slot
says *which* index: the model (checkpoint directory, or the architecture and seed of
``--untrained``), split, query mode, gallery side (``videos`` for t2v, ``texts`` for
v2t), search mode and build parameters. The key says *what it was built from*: the
features' fingerprint (``FeatureStore.fingerprint``), the checkpoint's step and its
weights file's (model.safetensors, or a legacy model.pt) size and mtime, the gallery ids
in order, the gallery's shape and the sha256 of its vectors. The vectors' digest alone
makes reuse safe (an index is only reused for bitwise the same gallery); the other
fields tell the user why one was rebuilt.

An index is reused only when its file name matches, its sidecar holds the same slot
and key, and the file's sha256 is the one the sidecar recorded; anything else is a
rebuild, with a warning when a file was damaged. One index is kept per slot (a new
key's index replaces the slot's older ones) and at most ``KEEP`` in the folder, the
least recently used going first. Files are written under a temporary name, fsynced and
renamed, so a name here always holds a whole file, and a .faiss is never read without
its sidecar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import suppress
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ConfigError
from ..extract.job import file_sha256
from ..features.layout import temporary_name, unfinished_files
from .search import build_params, new_index

log = logging.getLogger("videolm.retrieval.index_cache")

CACHE_MODES = ("auto", "off", "rebuild")
# faiss-flat is left out: building it copies the vectors, faster than reading a saved copy
# back (100k x 512 on the 2-CPU dev VM: build 0.22 s, read_index 0.47 s). Exact search has no index.
CACHED_SEARCH_MODES = ("faiss-ivf", "faiss-hnsw")
FORMAT, FORMAT_VERSION = "videolm-index", 1
KEEP = 8  # indexes kept per folder; an evaluation saves two (t2v and v2t galleries)
STALE_TEMP_S = 3600  # a temporary file this old has no live writer


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def vectors_sha256(x: np.ndarray) -> str:
    """sha256 of the float32 C-order bytes, hashed in place (a large gallery is not copied)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32)).hexdigest()


def model_fields(ckpt: Path, step, untrained: bool, seed: int) -> tuple[dict, dict]:
    """(slot part, key part) for a model: which checkpoint, and what shows it was rewritten.

    A checkpoint of the same step can be saved again (docs/formats.md), so the key has
    the weights file's size and mtime besides the step. An untrained model is named by the
    architecture it copies and its init seed; its vectors' digest covers the rest.
    """
    where = str(Path(ckpt).resolve())
    if untrained:
        return {"model": "untrained", "architecture_of": where, "init_seed": seed}, {}
    from ..pretrain.checkpoint import model_file  # torch: only when a checkpoint is scored

    st = model_file(ckpt).stat()
    return ({"model": "checkpoint", "checkpoint": where},
            {"step": step, "weights_bytes": st.st_size, "weights_mtime_ns": st.st_mtime_ns})


class IndexCache:
    """A cache folder, its mode (``CACHE_MODES``), and the slot and key fields every gallery shares."""

    def __init__(self, directory: str | os.PathLike, mode: str = "auto", slot: dict | None = None,
                 key: dict | None = None, keep: int = KEEP):
        if mode not in CACHE_MODES:
            raise ConfigError(f"index cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
        self.directory, self.mode, self.keep = Path(directory), mode, keep
        self.slot, self.key = dict(slot or {}), dict(key or {})
        self.writable = True  # False after a failed write: warned once, not tried again

    def index_for(self, side: str, ids: list[str]):
        """``search(index_for=...)`` for one gallery: ``side`` "videos" or "texts", its rows named by ``ids``."""
        return lambda gallery, cfg: cached_index(self, side, ids, gallery, cfg)


def entry_fields(cache: IndexCache, side: str, ids: list[str], gallery: np.ndarray, cfg) -> tuple[dict, dict]:
    """The (slot, key) of the index over `gallery`; see the module docstring."""
    slot = {**cache.slot, "gallery": side, "mode": cfg.mode, **build_params(cfg, len(gallery))}
    key = {**cache.key, "gallery_ids_sha256": _digest(list(ids)), "shape": list(gallery.shape),
           "vectors_sha256": vectors_sha256(gallery)}
    return slot, key


def entry_path(directory: Path, slot: dict, key: dict) -> Path:
    return directory / f"{_digest(slot)[:16]}-{_digest(key)[:16]}.faiss"


def cached_index(cache: IndexCache, side: str, ids: list[str], gallery: np.ndarray, cfg) -> tuple[object, dict]:
    """(index, record): read from the cache when a valid one is there, else built (and saved)."""
    if cache.mode == "off" or cfg.mode not in CACHED_SEARCH_MODES:
        return _build(gallery, cfg, {"reason": "--index-cache off" if cache.mode == "off"
                                     else f"{cfg.mode} indexes are not cached"})
    t0 = time.perf_counter()
    slot, key = entry_fields(cache, side, ids, gallery, cfg)
    path = entry_path(cache.directory, slot, key)
    record = {"key_s": time.perf_counter() - t0, "file": str(path)}
    why = "--index-cache rebuild"
    if cache.mode == "auto":
        t0 = time.perf_counter()
        index, why = load_index(path, slot, key)
        if index is not None:
            return index, {**record, "status": "reused", "load_s": time.perf_counter() - t0}
    log.info("building %s index over %d %s (%s)", cfg.mode, len(gallery), side, why)
    index, record = _build(gallery, cfg, {**record, "reason": why})
    if cache.writable:
        record["save_s"] = save_index(cache, index, path, _sidecar(slot, key, ids, record))
    record["saved"] = record.get("save_s") is not None
    return index, record


def _build(gallery: np.ndarray, cfg, record: dict) -> tuple[object, dict]:
    t0 = time.perf_counter()
    index = new_index(gallery, cfg)
    return index, {**record, "status": "built", "build_s": time.perf_counter() - t0}


def _sidecar(slot: dict, key: dict, ids: list[str], record: dict) -> dict:
    import faiss

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "slot": slot, "key": key,
            "gallery_ids": list(ids), "build_s": round(record["build_s"], 4),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "videolm": __version__,
            "faiss": getattr(faiss, "__version__", None)}


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))


def _why_missing(path: Path, key: dict) -> str:
    """Why no index is cached for this key: the same slot's index under another key says what changed."""
    slot_tag = path.stem.split("-")[0]
    for side_path in sorted(path.parent.glob(f"{slot_tag}-*.json")):
        if side_path == path.with_suffix(".json"):  # this key's sidecar, its index gone
            continue
        with suppress(OSError, ValueError, AttributeError):
            old = json.loads(side_path.read_text()).get("key", {})
            return f"{', '.join(_changed(old, key))} differ from {side_path.name}'s"
    return "no cached index"


def load_index(path: Path, slot: dict, key: dict) -> tuple[object | None, str]:
    """The index saved at `path` if its sidecar vouches for it; else (None, why)."""
    import faiss

    side_path = path.with_suffix(".json")
    if not path.is_file() or not side_path.is_file():
        return None, _why_missing(path, key)
    try:
        side = json.loads(side_path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("index cache: sidecar %s unreadable (%s); rebuilding the index", side_path, exc)
        return None, "sidecar unreadable"
    if not isinstance(side, dict) or side.get("format_version") != FORMAT_VERSION:
        return None, f"{side_path.name} is not a version {FORMAT_VERSION} index sidecar"
    changed = _changed(side.get("key", {}), key) + (["slot"] if side.get("slot") != slot else [])
    if changed:  # only a hash collision or a hand-renamed file gets here
        return None, f"{', '.join(changed)} differ from {side_path.name}'s"
    if file_sha256(path) != side.get("index_sha256"):
        log.warning("index cache: %s does not match the sha256 its sidecar recorded (damaged or replaced); "
                    "rebuilding it", path)
        return None, "cached index damaged"
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        log.warning("index cache: cannot read %s (%s); rebuilding it", path, str(exc).splitlines()[0][:160])
        return None, "cached index unreadable"
    with suppress(OSError):  # last use, for pruning; a read-only folder just keeps its order
        os.utime(path)
    log.info("reusing index %s (built %s in %.1f s)", path, side.get("created"), side.get("build_s", 0.0))
    return index, ""


def _publish(tmp: Path, final: Path) -> None:
    """fsync `tmp` and rename it to `final`: a name in the cache always holds a whole file."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_index(cache: IndexCache, index, path: Path, sidecar: dict) -> float | None:
    """Write the index, then its sidecar; seconds taken, or None when the folder cannot be written (warned once)."""
    import faiss

    t0 = time.perf_counter()
    side_path = path.with_suffix(".json")
    tmp, side_tmp = temporary_name(path), temporary_name(side_path)
    published = False
    try:
        cache.directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(tmp))
        sidecar["index_sha256"] = file_sha256(tmp)
        _publish(tmp, path)
        published = True
        side_tmp.write_text(json.dumps(sidecar) + "\n")
        _publish(side_tmp, side_path)
    except (OSError, RuntimeError) as exc:  # faiss reports a failed write as RuntimeError
        if published:  # without its new sidecar it would never be read
            with suppress(OSError):
                path.unlink()
        log.warning("index cache: cannot write in %s (%s); indexes are built but not cached",
                    cache.directory, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
        cache.writable = False
        return None
    finally:  # after a failure or Ctrl-C; a published file no longer has its temporary name
        for p in (tmp, side_tmp):
            with suppress(OSError):
                p.unlink()
    with suppress(OSError):  # pruning is housekeeping: a file another run removed first is fine
        prune(cache.directory, path, cache.keep)
    return time.perf_counter() - t0


def prune(directory: Path, kept: Path, keep: int) -> None:
    """Drop the slot's other keys, indexes beyond `keep` (least recently used first) and stale temporary files."""
    slot_tag = kept.stem.split("-")[0]
    entries = sorted(directory.glob("*.faiss"), key=lambda p: p.stat().st_mtime, reverse=True)
    for i, p in enumerate(entries):
        if p != kept and (p.stem.startswith(slot_tag + "-") or i >= keep):
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
    now = time.time()
    for p in unfinished_files(directory):
        if now - p.stat().st_mtime > STALE_TEMP_S:
            p.unlink(missing_ok=True)
