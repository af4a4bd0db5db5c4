"""``videolm finetune``: a task recipe trained from a pretrained (or imported) checkpoint.

Fine-tuning is pretraining's loop with three differences: the model's weights
(and the heads of objectives of the same name) come from ``--init``, the
optimiser and schedule start fresh, and ``select:`` scores the model on a held-out
split to keep the best checkpoint and stop early (``selection.Selector``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ..errors import ConfigError
from ..features.shards import FeatureStore
from ..manifests.manifest import load_manifest, write_manifest
from ..pretrain.checkpoint import latest_checkpoint, load_run_config
from ..pretrain.model_card import write_model_card
from ..pretrain.objectives import check_architecture
from ..pretrain.recipe import PretrainConfig
from ..pretrain.trainer import run_pretrain
from .selection import Selector, caption_cider, moment_r1, retrieval_r1

log = logging.getLogger(__name__)

FINETUNE_RECORD = "finetune.json"


def init_checkpoint_for(init: str | Path, cfg: PretrainConfig) -> Path:
    """The checkpoint ``--init`` names, refused when the recipe's objectives cannot run on its model."""
    ckpt = latest_checkpoint(init)
    if ckpt is None:
        raise ConfigError(f"--init {init}: no checkpoint there (a run directory, its best/, or one checkpoint "
                          "directory, e.g. from videolm import-checkpoint)")
    saved = load_run_config(ckpt).model
    try:
        check_architecture(cfg.objective_names, saved.architecture)
    except ConfigError as exc:
        raise ConfigError(f"--init {ckpt}: its model is {saved.architecture}; {exc}") from None
    return ckpt


def scorer(cfg: PretrainConfig, features: Path, manifest: Path, out: Path):
    """The ``select.metric`` function over the held-out split, or None when selection is off."""
    sel = cfg.select
    if not sel.every:
        return None
    entries = load_manifest(manifest, sel.val_split)
    if not entries:
        raise ConfigError(f"select: {manifest} has no videos in split {sel.val_split!r} to select the model on "
                          "(set select.val_split, or select.every=0 to keep only the last checkpoint)")
    if sel.max_videos:
        entries = entries[: sel.max_videos]
    store = FeatureStore(features)
    if sel.metric == "moment_r1":  # the evaluator reads a manifest: the user's, or its first N val videos once
        scratch = Path(out) / ".selecting"
        val = manifest if not sel.max_videos else write_manifest(entries, scratch / "val.jsonl")
        return lambda run: moment_r1(run, val, store, sel, scratch)
    score = {"retrieval_r1": retrieval_r1, "cider": caption_cider}[sel.metric]
    return lambda run: score(run, entries, store, sel)


def run_finetune(init: str | Path | None, cfg: PretrainConfig, features: str | Path, manifest: str | Path,
                 out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune from ``init``; ``init=None`` trains the recipe's own model from its initialisation
    (the no-pretraining baseline: same recipe, budget and selection, no video-text weights)."""
    out, features, manifest = Path(out), Path(features), Path(manifest)
    if init is None:
        ckpt = None
    elif resume and cfg.train.init_from:
        ckpt = Path(cfg.train.init_from)  # the run's own config: keep what it started from
    else:
        ckpt = init_checkpoint_for(init, cfg)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(ckpt.resolve())))
    score = scorer(cfg, features, manifest, out)
    meta = {"features": str(features), "manifest": str(manifest), "init": str(ckpt) if ckpt else None}
    selector = Selector(out, cfg.select, score, meta) if score is not None else None
    summary = run_pretrain(cfg, features, manifest, out, resume=resume, progress=progress, after_step=selector)
    if selector is not None and selector.best is not None:
        summary["best"] = {**selector.best, "checkpoint": str(latest_checkpoint(out / "best"))}
        summary["selection"] = selector.history
    if out.exists():
        (out / FINETUNE_RECORD).write_text(json.dumps({"init": meta["init"], **summary}, indent=2))
        trained = load_run_config(Path(summary["checkpoint"])) if summary.get("checkpoint") else cfg  # sizes resolved
        write_model_card(out, trained, summary, "fine-tuning", features, manifest, best=summary.get("best"))
    return summary
