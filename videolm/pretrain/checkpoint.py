"""Checkpoints of a pretraining run: written atomically, found again by ``--resume`` and by evaluation.

Layout under the run directory::

    checkpoints/
      step_0000500/
        model.safetensors       model state dict (what evaluation and fine-tuning need)
        objectives.safetensors  the objectives' own heads (mlm, mvm, mfm, fom, vsm), keyed "<stage>:<objective>.*"
        trainer.pt              optimizer, scheduler, loss scaler, step, RNG states
        config.yaml             the full recipe (data, model with resolved sizes, train, stages)
        tokenizer/              WordPiece vocab and tokenizer config (save_pretrained)
        meta.json               step, videolm version, time, features, manifest, world size
        features.json           how the training features were made (features_record.py), when known
      step_0001000/
      latest            name of the newest complete checkpoint directory

A checkpoint is assembled in ``.tmp-step_...`` and renamed into place, then
``latest`` is replaced (write + rename). A crash at any moment leaves the
previous checkpoint and ``latest`` intact; leftover temporaries are removed
by the next save. Directories are deleted (pruning, or replacing a checkpoint of
the same step) by first renaming them to ``.tmp-del-...``, so a kill in the middle
of a deletion never leaves a half-deleted ``step_*`` that could be picked.

Weights are safetensors files (no pickle: loading them cannot run code, and other
tools read them). Tensors that share storage (tied embeddings) are written as
separate copies, since safetensors refuses shared storage; ``load_state_dict`` ties
them again. ``trainer.pt`` is not weights: it is torch-saved and read back with
``torch.load(..., weights_only=True)``, and holds only tensors, numbers, strings and
containers (RNG states included), so a checkpoint from elsewhere cannot run code
when it is resumed. Checkpoints written before safetensors (``model.pt``,
``objectives.pt``) still load, also with ``weights_only=True``, with a deprecation
warning; ``convert_legacy`` rewrites one in place. The fault-injection
tests behind this are described in docs/reliability.md.

Checkpoints written before videolm 0.3 used videolm's own pre-LN layers (before
0.2 they also kept the objectives' heads inside ``model.pt``); they do not load (a
clear error says so). A run written by ``import-checkpoint`` has no ``trainer.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import ConfigError, TrainError
from .features_record import describe_features, read_features_json, write_features_json
from .recipe import PretrainConfig, load_recipe, save_recipe

log = logging.getLogger("videolm.pretrain.checkpoint")

LATEST = "latest"
MODEL_FILE = "model.safetensors"
OBJECTIVES_FILE = "objectives.safetensors"
LEGACY_MODEL_FILE = "model.pt"  # before safetensors; still read
LEGACY_OBJECTIVES_FILE = "objectives.pt"
_warned_legacy: set[Path] = set()


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    """RNG states as tensors, numbers and tuples only (what ``torch.load(weights_only=True)`` accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)),
             "python": random.getstate()}  # (version, tuple of ints, float or None)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, objectives, cfg: PretrainConfig, tokenizer,
                    trainer_state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically. When ``meta["features"]`` names the feature directory trained
    on, how its features were made is written as ``features.json``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    save_weights(model.state_dict(), tmp / MODEL_FILE)
    save_weights(objectives.state_dict(), tmp / OBJECTIVES_FILE)
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
    save_recipe(cfg, tmp / "config.yaml")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "meta.json").write_text(json.dumps({"step": step, "videolm": __version__, "time": time.time(), **meta},
                                              indent=2))
    write_features_json(describe_features(meta["features"]) if meta.get("features") else None, tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = root / name
    if final.exists():  # the same step saved again (e.g. a re-run end checkpoint): replace it
        _remove(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer, root / LATEST)
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        _remove(p)
    return final


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that no kill leaves a half-deleted ``step_*`` behind."""
    doomed = path.with_name(f".tmp-del-{path.name}-{os.getpid()}")
    os.replace(path, doomed)  # atomic: ``step_*`` is either whole or gone
    shutil.rmtree(doomed, ignore_errors=True)


def has_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds model weights (``model.safetensors``, or a legacy ``model.pt``)."""
    return (Path(path) / MODEL_FILE).is_file() or (Path(path) / LEGACY_MODEL_FILE).is_file()


def model_file(ckpt: str | os.PathLike) -> Path:
    """The weights file of a checkpoint: ``model.safetensors``, else a legacy ``model.pt`` (may not exist)."""
    new = Path(ckpt) / MODEL_FILE
    legacy = Path(ckpt) / LEGACY_MODEL_FILE
    return legacy if not new.is_file() and legacy.is_file() else new


def has_objectives(ckpt: str | os.PathLike) -> bool:
    return (Path(ckpt) / OBJECTIVES_FILE).is_file() or (Path(ckpt) / LEGACY_OBJECTIVES_FILE).is_file()


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory, or ``path`` itself when it is a checkpoint."""
    path = Path(path)
    if has_weights(path) and (path / "config.yaml").is_file():
        return path
    root = checkpoint_dir(path)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if has_weights(candidate):
            return candidate
    # `latest` missing or pointing at a deleted directory: fall back to the highest step present
    found = sorted(p for p in root.glob("step_*") if has_weights(p) and (p / "meta.json").is_file())
    return found[-1] if found else None


def load_run_config(ckpt: Path) -> PretrainConfig:
    return load_recipe(ckpt / "config.yaml")


def save_weights(state: dict, path: Path) -> None:
    """A state dict as safetensors. Tensors sharing storage (tied weights) are copied apart first:
    safetensors refuses shared storage, and a strict ``load_state_dict`` re-ties them on load."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        mark = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        shared = mark in seen and tensor.numel() > 0
        seen.add(mark)
        out[key] = tensor.clone().contiguous() if shared or not tensor.is_contiguous() else tensor
    save_file(out, str(path), metadata={"format": "pt", "videolm": __version__})


def _load_legacy(path: Path, map_location) -> dict:
    ckpt = path.parent.resolve()
    if ckpt not in _warned_legacy:
        _warned_legacy.add(ckpt)
        log.warning("%s: %s is a pickle checkpoint written before videolm saved safetensors; it still loads "
                    "(weights_only=True) but support is deprecated. Convert it once with: python -c \"from "
                    "videolm.pretrain.checkpoint import convert_legacy; convert_legacy('%s')\"",
                    ckpt, path.name, ckpt)
    return torch.load(path, map_location=map_location, weights_only=True)


def _load_weights(ckpt: Path, new: str, legacy: str, map_location) -> dict:
    path = Path(ckpt) / new
    if path.is_file():
        return load_file(str(path), device=str(map_location))
    return _load_legacy(Path(ckpt) / legacy, map_location)


def load_model_state(ckpt: Path, map_location="cpu") -> dict:
    path = model_file(ckpt)
    if not path.is_file():
        raise ConfigError(f"{ckpt}: no {MODEL_FILE} (nor a legacy {LEGACY_MODEL_FILE}); not a checkpoint directory")
    return _load_weights(ckpt, MODEL_FILE, LEGACY_MODEL_FILE, map_location)


def load_objective_state(ckpt: Path, map_location="cpu") -> dict:
    if not has_objectives(ckpt):
        raise ConfigError(f"{ckpt}: no {OBJECTIVES_FILE} (nor objectives.pt); checkpoints written before videolm "
                          "0.2 cannot be resumed")
    return _load_weights(ckpt, OBJECTIVES_FILE, LEGACY_OBJECTIVES_FILE, map_location)


def convert_legacy(ckpt: str | os.PathLike) -> list[Path]:
    """Rewrite a checkpoint's ``model.pt``/``objectives.pt`` as safetensors in place; the files written."""
    written = []
    for legacy, new in ((LEGACY_MODEL_FILE, MODEL_FILE), (LEGACY_OBJECTIVES_FILE, OBJECTIVES_FILE)):
        src = Path(ckpt) / legacy
        if not src.is_file():
            continue
        tmp = src.with_name(f".{new}.tmp")
        save_weights(torch.load(src, map_location="cpu", weights_only=True), tmp)
        os.replace(tmp, src.with_name(new))  # the new file is whole before the old one goes
        src.unlink()
        written.append(src.with_name(new))
    return written


def feature_record(path: str | os.PathLike) -> dict | None:
    """How the features a model was trained on were made (``features.json``), from a run directory, a
    checkpoint directory, ``best/`` or a ``save_pretrained`` directory; None when it was not recorded
    (checkpoints written before videolm recorded it, imported checkpoints).

    Keys: encoder, weights, weights_sha256, sampling (fps, frames_per_clip, clip_stride, short_side,
    crop), dim, backend, decode; also feature_dir, manifest_sha256, num_videos, videolm_version."""
    path = Path(path)
    record = read_features_json(path)
    if record is not None:
        return record
    ckpt = latest_checkpoint(path)
    return read_features_json(ckpt) if ckpt is not None else None


def load_into(model, state: dict, ckpt: Path) -> None:
    """``model.load_state_dict(state)`` with an error that names the checkpoint and the mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{ckpt}: the weights do not fit the model its config.yaml describes ({detail}). "
                          f"Checkpoints written before videolm 0.3 (videolm's own pre-LN layers; before 0.2 also "
                          f"heads inside the weights) do not load in "
                          f"videolm {__version__}; retrain, or evaluate with the version that wrote it") from None


def load_trainer_state(ckpt: Path, map_location="cpu") -> dict:
    path = Path(ckpt) / "trainer.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
        detail = f" ({lines[0]})" if lines else ""
        raise TrainError(f"{path}: refusing to load: it holds objects other than tensors, numbers, strings and "
                         f"containers{detail}. It was not written by this videolm version, or it was tampered "
                         "with; resume from another checkpoint or start a new run") from exc


def load_pretrained(path: str | os.PathLike, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from a run directory or one checkpoint directory."""
    from ..model.video_text import build_model
    from ..model.text import load_tokenizer

    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"{path}: no checkpoint found (expected {checkpoint_dir(Path(path))}/step_*/{MODEL_FILE})")
    cfg = load_run_config(ckpt)
    # The text encoder's weights come from the checkpoint, not from text_init, but
    # the architecture is rebuilt from text_init's config; "none" rebuilds it from sizes.
    model = build_model(cfg.model)
    load_into(model, load_model_state(ckpt), ckpt)
    model.to(device).eval()
    return model, load_tokenizer(ckpt / "tokenizer"), cfg


def training_record(ckpt: Path) -> dict:
    """How a checkpoint's model was trained, for reports: pretrained only (zero-shot downstream) or
    fine-tuned from another checkpoint, and on which features, manifest and split."""
    cfg = load_run_config(ckpt)
    meta_path = Path(ckpt) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    # a checkpoint selected on a val split was trained for the task: from --init, or from scratch (--init none)
    task_trained = bool(cfg.train.init_from) or "selected_on" in meta
    kind = "fine-tuned" if cfg.train.init_from else "trained on the task from scratch" if task_trained else "pretrained"
    record = {"kind": kind,
              "zero_shot": not task_trained,  # scored on a task it was not fine-tuned for
              "objectives": cfg.objective_names, "step": meta.get("step"),
              "trained_on": {"features": meta.get("features"), "manifest": meta.get("manifest"),
                             "split": cfg.train.split}}
    if cfg.train.init_from:
        record["init_from"] = cfg.train.init_from
    if "selected_on" in meta:
        record["selected_on"] = meta["selected_on"]
    return record
