"""Checkpoints of a pretraining run: written atomically, found again by ``--resume`` and by evaluation.

Layout under the run directory::

    checkpoints/
      step_0000500/
        model.pt        model state dict (what evaluation needs)
        trainer.pt      optimizer, scheduler, loss scaler, step, RNG states
        config.yaml     the full recipe (data, model with resolved sizes, train, stages)
        tokenizer/      WordPiece vocab and tokenizer config (save_pretrained)
        meta.json       step, videolm version, time, features, manifest, world size
      step_0001000/
      latest            name of the newest complete checkpoint directory

A checkpoint is assembled in ``.tmp-step_...`` and renamed into place, then
``latest`` is replaced (write + rename). A crash at any moment leaves the
previous checkpoint and ``latest`` intact; leftover temporaries are removed
by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import ConfigError
from .recipe import PretrainConfig, load_recipe, save_recipe

LATEST = "latest"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, cfg: PretrainConfig, tokenizer, trainer_state: dict,
                    meta: dict, keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    torch.save(model.state_dict(), tmp / "model.pt")
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
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


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


def load_trainer_state(ckpt: Path, map_location="cpu") -> dict:
    return torch.load(ckpt / "trainer.pt", map_location=map_location, weights_only=False)


def load_pretrained(path: str | os.PathLike, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from a run directory or one checkpoint directory."""
    from .model import VideoTextModel
    from .text import load_tokenizer

    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"{path}: no checkpoint found (expected {checkpoint_dir(Path(path))}/step_*/model.pt)")
    cfg = load_run_config(ckpt)
    # The text encoder's weights come from the checkpoint, not from text_init, but
    # the architecture is rebuilt from text_init's config; "none" rebuilds it from sizes.
    model = VideoTextModel(cfg.model)
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, load_tokenizer(ckpt / "tokenizer"), cfg
