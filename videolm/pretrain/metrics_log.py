"""Per-step training metrics: ``metrics.jsonl``, ``metrics.csv`` and TensorBoard, plus loss plots.

``MetricsLogger(run_dir)`` writes under ``run_dir``:

* ``metrics.jsonl``: one ``{"step": ..., **values}`` object per line, flushed after
  every line. It is the source of truth; everything else can be rebuilt from it.
* ``metrics.csv``: the same records as a table. Keys vary between steps (one
  objective is sampled per step), so the header is the union of all keys seen, in
  first-seen order, with an empty cell where a step lacks a key. Rows are appended
  while a record's keys fit the current header; a record bringing a new key makes
  the logger rebuild the whole CSV from the jsonl (atomically). New keys stop
  appearing after the first few steps, so rebuilds are rare and the CSV is always
  complete on disk, even after a crash.
* ``tensorboard/``: event files from ``torch.utils.tensorboard.SummaryWriter``
  (skipped with a warning when the ``tensorboard`` package is missing).

A new run (no ``resume_step``) starts these files afresh; ``resume_step=N`` keeps the
records with ``step <= N`` and drops the later ones, which the resumed run is about
to log again. ``enabled=False`` (non-zero ranks) turns every method into a no-op.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("videolm.pretrain.trainer")

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
TB_DIR = "tensorboard"
PLOT_NAME = "loss_curves.png"


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # Only the last line can be torn by a crash; garbage earlier is real corruption.
            if i == len(lines) - 1:
                log.warning("%s: skipping torn last line %d", path, i + 1)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file + os.replace, so a crash leaves either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        write(f)
    os.replace(tmp, path)


def _columns(records: list[dict]) -> list[str]:
    columns = {"step": None}  # a dict keeps first-seen order
    for r in records:
        columns.update(dict.fromkeys(r))
    return list(columns)


def _loss_keys(records: list[dict]) -> list[str]:
    keys = [k for k in _columns(records) if k == "loss" or k.endswith("_loss")]
    return sorted(keys, key=lambda k: k != "loss")  # total loss first, objectives after


def plot_losses(records: list[dict], path) -> Path:
    """One subplot per ``*_loss`` key and the total ``loss``: raw values faintly, moving average on top."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    keys = _loss_keys(records)
    if not keys:
        raise ValueError("no 'loss' or '*_loss' values in the records")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.5 * nrows), squeeze=False)
    try:
        for ax, key in zip(axes.flat, keys):
            # Sampled objectives appear on a subset of steps; a NaN/inf loss would poison the average.
            pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            steps = np.array([s for s, _ in pts], dtype=float)
            vals = np.array([v for _, v in pts], dtype=float)
            ax.plot(steps, vals, lw=0.6, alpha=0.35, label="raw")
            window = max(1, min(100, len(vals) // 20))
            if len(vals) >= window > 1:
                avg = np.convolve(vals, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1 :], avg, lw=1.6, label=f"avg over {window}")
                ax.legend(loc="upper right", fontsize="small")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)  # figures otherwise pile up in pyplot's global state
    return path


class MetricsLogger:
    """Per-step training metrics to metrics.jsonl, metrics.csv and TensorBoard event files under a run dir."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl = self._csv = self._csv_writer = self._tb = None
        self._columns: list[str] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self.csv_path = self.run_dir / CSV_NAME

        kept = []
        if resume_step is not None and self.jsonl_path.exists():
            records = read_metrics(self.jsonl_path)
            kept = [r for r in records if r["step"] <= resume_step]
            if len(kept) < len(records):
                log.info("resuming at step %d: dropping %d logged records after it", resume_step, len(records) - len(kept))
        # Rewriting even when nothing was dropped also removes a torn last line, so appends start clean.
        _atomic_write(self.jsonl_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._rebuild_csv(kept)

        if tensorboard:
            self._open_tensorboard(resume_step)

    def _open_tensorboard(self, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            log.warning("TensorBoard logging disabled (%s); metrics still go to %s", e, self.jsonl_path.name)
            return
        tb_dir = self.run_dir / TB_DIR
        if resume_step is None:
            # A new run replaces metrics.jsonl, so its old curves must not linger in TensorBoard either.
            for old in tb_dir.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step hides events the crashed run logged after the checkpoint we resume from.
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge)

    def _rebuild_csv(self, records: list[dict]) -> None:
        if self._csv is not None:
            self._csv.close()
        self._columns = _columns(records)

        def write(f):
            w = csv.DictWriter(f, fieldnames=self._columns, restval="")
            w.writeheader()
            w.writerows(records)

        _atomic_write(self.csv_path, write)
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")
        self._csv_writer = csv.DictWriter(self._csv, fieldnames=self._columns, restval="")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            raise RuntimeError("MetricsLogger.log() after close()")
        if "step" in values:
            raise ValueError("'step' is reserved for the step number")
        step = int(step)
        values = {k: float(v) for k, v in values.items()}  # also unwraps 0-d tensors / numpy scalars
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

        if set(record) <= set(self._columns):
            self._csv_writer.writerow(record)
            self._csv.flush()
        else:
            self._rebuild_csv(read_metrics(self.jsonl_path))  # the jsonl already holds this record

        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        for f in (self._jsonl, self._csv):
            if f is not None:
                f.close()
        self._jsonl = self._csv = self._csv_writer = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def plot(self, path: str | os.PathLike | None = None) -> Path | None:
        if not self.enabled:
            return None
        records = read_metrics(self.jsonl_path)
        if not _loss_keys(records):
            return None  # nothing logged yet (or no losses): no figure rather than an empty one
        return plot_losses(records, self.run_dir / PLOT_NAME if path is None else path)
