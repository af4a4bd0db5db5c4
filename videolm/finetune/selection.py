"""Model selection during training: score on a held-out split, keep the best checkpoint, stop early.

The trainer stays ignorant of downstream metrics: ``run_pretrain`` takes an
``after_step`` hook, and ``Selector`` is that hook. Every ``select.every`` steps it
scores the model on ``select.val_split`` (with the evaluators downstream use, so
the number is the one ``eval-retrieval`` would print), appends the score to
``<run>/selection.jsonl``, keeps the best checkpoint so far in ``<run>/best`` and
asks the trainer to stop after ``select.patience`` scorings without a gain.

Resuming reads ``selection.jsonl`` back, so a killed run keeps its best score and
its patience count.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..pretrain.checkpoint import save_checkpoint
from ..pretrain.recipe import SelectConfig

log = logging.getLogger(__name__)

SELECTION_LOG = "selection.jsonl"
BEST_DIR = "best"


def retrieval_r1(run, entries: list, store, cfg: SelectConfig) -> float:
    """Text-to-video R@1 (%) on the held-out videos, exact search, as eval-retrieval computes it."""
    from ..retrieval.evaluate import EvalConfig
    from ..retrieval.job import evaluate_model
    from ..retrieval.queries import build_queries

    qs = build_queries(entries, store, cfg.query_mode)
    ecfg = EvalConfig(split=cfg.val_split, query_mode=cfg.query_mode, bootstrap=1, device=run.device,
                      index_cache="off")
    part, _, _ = evaluate_model(run.model, run.tokenizer, store, qs, ecfg)
    return float(part["t2v"]["metrics"]["R@1"])


def caption_cider(run, entries: list, store, cfg: SelectConfig) -> float:
    """CIDEr-D of greedy captions on the held-out items (per timed segment, or per video when the recipe
    trains on whole videos), pycocoevalcap's scorer; tokenised by the Python fallback (no Java per scoring)."""
    from ..captioning.generate import Captioner, GenerateConfig
    from ..captioning.job import CaptionConfig, build_items, generate_rows
    from ..captioning.metrics import evaluate_captions

    unit = "video" if run.cfg.data.mode == "video" else "segment"
    ccfg = CaptionConfig(split=cfg.val_split, unit=unit, device=run.device)
    items, _ = build_items(entries, store, unit)
    rows = generate_rows(Captioner(run.model, run.tokenizer, GenerateConfig()), store, items, run.tokenizer, ccfg)
    return float(evaluate_captions(rows, n_boot=1, use_java=False)["metrics"]["CIDEr-D"])


def moment_r1(run, manifest: Path, store, cfg: SelectConfig, scratch: Path) -> float:
    """VCMR R@1 at IoU 0.5 (%) as ``videolm eval-moments`` computes it over ``manifest``'s val split, on a
    scratch checkpoint of the current weights (the moment evaluator loads the vsm query layer from one)."""
    from ..moments.job import MomentConfig, run_moments

    ckpt = save_checkpoint(scratch, 0, run.model, run.objectives, run.cfg, run.tokenizer, {}, {}, keep=1)
    report = run_moments(ckpt, store.directory, manifest, MomentConfig(split=cfg.val_split, device=run.device,
                                                                        bootstrap=1))
    return float(report["VCMR"]["metrics"]["R@1 IoU=0.5"])


def read_selection(out: Path) -> list[dict]:
    path = out / SELECTION_LOG
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything before it stands
    return rows


class Selector:
    """The trainer's ``after_step(run, step, last) -> stop?`` hook (see the module docstring)."""

    def __init__(self, out: Path, cfg: SelectConfig, score: Callable[[object], float], meta: dict):
        self.out, self.cfg, self.score, self.meta = Path(out), cfg, score, meta
        self.history = read_selection(self.out)
        self.best = max(self.history, key=lambda r: r["score"], default=None)

    @property
    def since_best(self) -> int:
        """Scorings after the best one (the patience count)."""
        if self.best is None:
            return 0
        return sum(r["step"] > self.best["step"] for r in self.history)

    def __call__(self, run, step: int, last: bool) -> bool:
        if not self.cfg.every or (step % self.cfg.every and not last):
            return False
        if any(r["step"] == step for r in self.history):
            return False  # scored before a resume: nothing new to learn
        stop = False
        if run.rank == 0:
            stop = self._score_and_keep(run, step)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = [stop]
            torch.distributed.broadcast_object_list(flag, src=0)
            stop = bool(flag[0])
        return stop

    def _score_and_keep(self, run, step: int) -> bool:
        t0 = time.perf_counter()
        was_training = run.runner.training
        run.model.eval()
        try:
            with torch.no_grad():
                value = self.score(run)
        finally:
            run.runner.train(was_training)
        row = {"step": step, "metric": self.cfg.metric, "split": self.cfg.val_split, "score": float(value),
               "seconds": round(time.perf_counter() - t0, 2)}
        better = self.best is None or value > self.best["score"]
        if better:
            self._save_best(run, step)
            self.best = row
        row["best_step"] = self.best["step"]
        self.history.append(row)
        self._append(row)
        log.info("step %d: val %s %.2f (best %.2f at step %d)", step, self.cfg.metric, value, self.best["score"],
                 self.best["step"])
        stop = bool(self.cfg.patience) and self.since_best >= self.cfg.patience
        if stop:
            log.info("no gain on val %s in %d scorings: stopping early at step %d", self.cfg.metric,
                     self.cfg.patience, step)
        return stop

    def _save_best(self, run, step: int) -> None:
        save_checkpoint(self.out / BEST_DIR, step, run.model, run.objectives, run.cfg, run.tokenizer,
                        {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()},
                        {**self.meta, "selected_on": {"metric": self.cfg.metric, "split": self.cfg.val_split}},
                        keep=1)

    def _append(self, row: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / SELECTION_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
