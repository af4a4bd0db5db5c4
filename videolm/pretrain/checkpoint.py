"""Checkpoints of a pretraining run: written atomically, found again by ``--resume`` and by evaluation.

Layout under the run directory::

    checkpoints/
      step_0000500/
        model.pt        model state dict (what evaluation and fine-tuning need)
        objectives.pt   the objectives' own heads (mlm, mvm, mfm, fom, vsm), keyed "<stage>:<objective>.*"
        trainer.pt      optimizer, scheduler, loss scaler, step, RNG states
        config.yaml     the full recipe (data, model with resolved sizes, train, stages)
        tokenizer/      WordPiece vocab and tokenizer config (save_pretrained)
        meta.json       step, videolm version, time, features, manifest, world size
      step_0001000/
      latest            name of the newest complete checkpoint directory

A checkpoint is assembled in ``.tmp-step_...`` and renamed into place, then
``latest`` is replaced (write + rename). A crash at any moment leaves the
previous checkpoint and ``latest`` intact; leftover temporaries are removed
by the next save. Directories are deleted (pruning, or replacing a checkpoint of
the same step) by first renaming them to ``.tmp-del-...``, so a kill in the middle
of a deletion never leaves a half-deleted ``step_*`` that could be picked.

Every file is read back with ``torch.load(..., weights_only=True)``: ``trainer.pt``
holds only tensors, numbers, strings and containers (RNG states included), so a
checkpoint from elsewhere cannot run code when it is resumed. The fault-injection
tests behind this are described in docs/reliability.md.

Checkpoints written before videolm 0.3 used videolm's own pre-LN layers (before
0.2 they also kept the objectives' heads inside ``model.pt``); they do not load (a
clear error says so). A run written by ``import-checkpoint`` has no ``trainer.pt``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError, TrainError
from .recipe import PretrainConfig, load_recipe, save_recipe

LATEST = "latest"


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
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(objectives.state_dict(), tmp / "objectives.pt")
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
    save_recipe(cfg, tmp / "config.yaml")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "meta.json").write_text(json.dumps({"step": step, "videolm": __version__, "time": time.time(), **meta},
                                              indent=2))
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


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory, or ``path`` itself when it is a checkpoint."""
    path = Path(path)
    if (path / "model.pt").is_file() and (path / "config.yaml").is_file():
        return path
    root = checkpoint_dir(path)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "model.pt").is_file():
            return candidate
    # `latest` missing or pointing at a deleted directory: fall back to the highest step present
    found = sorted(p for p in root.glob("step_*") if (p / "model.pt").is_file() and (p / "meta.json").is_file())
    return found[-1] if found else None


def load_run_config(ckpt: Path) -> PretrainConfig:
    return load_recipe(ckpt / "config.yaml")


def load_model_state(ckpt: Path, map_location="cpu") -> dict:
    return torch.load(Path(ckpt) / "model.pt", map_location=map_location, weights_only=True)


def load_objective_state(ckpt: Path, map_location="cpu") -> dict:
    path = Path(ckpt) / "objectives.pt"
    if not path.is_file():
        raise ConfigError(f"{ckpt}: no objectives.pt; checkpoints written before videolm 0.2 cannot be resumed")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_into(model, state: dict, ckpt: Path) -> None:
    """``model.load_state_dict(state)`` with an error that names the checkpoint and the mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{ckpt}: the weights do not fit the model its config.yaml describes ({detail}). "
                          f"Checkpoints written before videolm 0.3 (videolm's own pre-LN layers; before 0.2 also "
                          f"heads inside model.pt) do not load in "
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
        raise ConfigError(f"{path}: no checkpoint found (expected {checkpoint_dir(Path(path))}/step_*/model.pt)")
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
