"""``videolm pretrain``: objectives mixed by a recipe, over cached shards, on one process or many.

One optimizer step (``train_step``) = ``grad_accum`` micro-batches. For each step

1. the stage that owns the step gives its objectives (all of them with
   ``mixing: sum``; one drawn by ``ratio`` with ``mixing: sample``, the same draw
   on every rank because it depends on (seed, step) only);
2. torch (dropout) and the objectives' mask generator are seeded from (seed,
   step, rank), so a resumed run repeats an uninterrupted one exactly;
3. ``weight * loss`` is summed over the objectives and backpropagated; the
   gradient is clipped, AdamW and the warmup + decay schedule step.

A step whose loss or gradient norm is NaN/inf is skipped: no optimizer step,
gradients dropped, the schedule (and data plan) advance as for any step, a
warning names the objectives at fault, and the metrics record carries
``skipped_steps``; ``train.max_bad_steps`` such steps in a row stop the run with
``TrainError``. (fp16's GradScaler skips overflowing steps on its own and lowers
the scale; those are not counted.) No checkpoint is ever written from weights
that are not finite. SIGTERM (a scheduler's time limit) raises ``Terminated``,
handled like Ctrl-C: a checkpoint of the last finished step is written before
the process exits.

Building the run (model, heads, optimiser, data plan, resume state) is ``run.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, Terminated, TrainError
from ..features.shards import FeatureStore
from ..manifests.manifest import load_manifest
from ..model.inputs import batch_to
from .checkpoint import latest_checkpoint, save_checkpoint
from .model_card import write_model_card
from .distributed import all_reduce_mean, barrier, init_distributed, shutdown_distributed
from .metrics_log import MetricsLogger
from .recipe import PretrainConfig, save_recipe
from .run import Run, build_run, task_key

log = logging.getLogger("videolm.pretrain.trainer")


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0])


def choose_objectives(stage, seed: int, step: int) -> list[str]:
    if stage.mixing == "sum":  # weight 0 switches an objective off without editing the recipe
        return [o.name for o in stage.active]
    # drawn over all objectives (ratio 0 is never drawn), so the draws of a recipe do not move
    ratios = np.array([o.ratio for o in stage.objectives], dtype=float)
    pick = np.random.default_rng((seed, step, 7)).choice(len(ratios), p=ratios / ratios.sum())
    return [stage.objectives[pick].name]


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def _step_health(finite: torch.Tensor, grad_norm: torch.Tensor, world: int) -> tuple[bool, float]:
    """(every task's loss finite on every rank, gradient norm): the step's one read from the device.

    Under DDP the finite flag is min-reduced first, so every rank skips the same steps.
    """
    both = torch.stack([finite.float(), grad_norm.float()])
    if world > 1:
        import torch.distributed as dist

        flag = both[:1].clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        both = torch.cat([flag, both[1:]])
    ok, norm = both.tolist()
    return ok == 1.0, norm


@dataclass
class StepResult:
    # losses and measurements of this step (mean over micro-batches), as 0-dim tensors on the device or
    # numbers: read them with ``as_numbers`` (the training loop does, once per log_every steps)
    values: dict
    stage_index: int
    bad: str | None = None  # why the step was skipped (non-finite loss or gradient), None when it updated


def train_step(run: Run, step: int, batches, names: list[str] | None = None) -> StepResult:
    """Optimizer step ``step`` over the next ``grad_accum`` batches of ``batches`` (CPU batches from the loader).

    ``names`` replaces the stage's choice of objectives (the benchmark times each alone).
    """
    tc = run.cfg.train
    stage = run.cfg.stage_at(step)
    si = run.cfg.stages.index(stage)
    tasks = [task_key(si, n) for n in (names or choose_objectives(stage, tc.seed, step))]
    seed = step_seed(tc.seed, step, run.rank)
    torch.manual_seed(seed)  # dropout: same draws when this step is replayed after a resume
    gen = torch.Generator().manual_seed(seed)
    values: dict = {}
    finite: dict[str, torch.Tensor] = {}  # task -> its loss was finite in every micro-batch (on the device)
    for micro in range(tc.grad_accum):  # every micro-batch is drawn, even after a bad one: the data plan
        sync = micro == tc.grad_accum - 1 or run.world == 1
        with (contextlib.nullcontext() if sync else run.runner.no_sync()):
            _forward_backward(run, batch_to(next(batches), run.device), tasks, gen, values, finite)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(run.runner.parameters(), tc.grad_clip or float("inf"))
    all_finite = torch.stack(list(finite.values())).all()
    losses_ok, norm = _step_health(all_finite, grad_norm, run.world)
    if tc.grad_clip:
        values["grad_norm"] = norm
    bad = _why_bad(run, losses_ok, finite, norm)
    _update_or_skip(run, bad, values)
    values["lr"] = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(all_reduce_mean(values, run.device), si, bad)


def _forward_backward(run: Run, batch: dict, tasks: list[str], gen, values: dict, finite: dict) -> None:
    """One micro-batch: weighted loss sum, backward, values accumulated on the device (divided by grad_accum).

    Nothing here reads a value back to the host: a GPU keeps working while the
    next micro-batch is prepared (``_step_health`` reads once per step).
    """
    accum = run.cfg.train.grad_accum
    with autocast(run.device, run.cfg.train.precision):
        per_task = run.runner(batch, tasks, gen)
        total, logged = 0.0, {}
        for task, values_of_task in per_task.items():
            part_sum = sum(v for k, v in values_of_task.items() if k.endswith("_loss"))
            ok = torch.isfinite(torch.as_tensor(part_sum, device=run.device)).all()
            finite[task] = ok if task not in finite else finite[task] & ok
            total = total + run.weights[task] * part_sum
            logged.update(values_of_task)
        loss = total / accum
    # Backward even a non-finite loss: under DDP every rank must join the gradient all-reduce.
    (run.scaler.scale(loss) if run.scaler else loss).backward()
    for k, v in logged.items():
        v = v.detach().float() if torch.is_tensor(v) else float(v)
        values[k] = values.get(k, 0.0) + v / accum
    values["loss"] = values.get("loss", 0.0) + loss.detach().float()


def as_numbers(values: dict) -> dict[str, float]:
    """A step's (or a window's) values as floats, read from the device in one transfer."""
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    read = torch.stack([values[k].float().reshape(()) for k in keys]).tolist() if keys else []
    out = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    out.update(zip(keys, read))
    return out


def _why_bad(run: Run, losses_ok: bool, finite: dict, grad_norm: float) -> str | None:
    if not losses_ok:  # only now are the per-task flags read, to name the culprits
        bad = sorted(t.split(":", 1)[1] for t, ok in finite.items() if not bool(ok))
        return f"loss is not finite in {', '.join(bad) or 'another process'}"
    if not math.isfinite(grad_norm) and run.scaler is None:  # the scaler handles fp16 overflow itself
        return f"gradient norm is {grad_norm} with a finite loss"
    return None


def _update_or_skip(run: Run, bad: str | None, values: dict) -> None:
    """Apply the update, or skip it (the schedule, data plan and step count still advance, so a
    resumed run repeats this one). The scaler's update() ends its iteration either way."""
    if bad is None:
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.bad_streak = 0
        return
    if run.scaler:
        run.scaler.update()  # having seen inf/NaN gradients, it lowers the scale
    run.skipped_total, run.bad_streak = run.skipped_total + 1, run.bad_streak + 1
    values["skipped_steps"] = 1.0


def window_record(window: dict, examples_per_step: int, t_window: float, stage: int, now: float | None = None) -> dict:
    now = time.perf_counter() if now is None else now
    # NaN marks a metric an objective could not measure on that step (e.g. fom on one-clip videos)
    record = {k: float(np.mean([x for x in v if x == x])) if any(x == x for x in v) else float("nan")
              for k, v in window.items() if k != "skipped_steps"}
    if window.get("skipped_steps"):
        record["skipped_steps"] = int(round(sum(window["skipped_steps"])))  # steps of this record skipped
    record["examples_per_s"] = examples_per_step * len(window["loss"]) / max(now - t_window, 1e-9)
    record["stage"] = stage
    return record


def save(run: Run, out: Path, step: int, meta: dict) -> Path | None:
    """Checkpoint ``step`` on rank 0 (every rank waits); refuses weights that are not finite."""
    bad = [name for name, t in run.runner.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # every rank holds the same weights, so every rank refuses
        kept = latest_checkpoint(out) if out.exists() else None
        raise TrainError(f"refusing to write the step-{step} checkpoint: {len(bad)} parameter tensor(s) hold "
                         f"NaN/inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                         + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was written")
                         + "; lower lr or use fp32")
    path = None
    if run.rank == 0:
        path = save_checkpoint(out, step, run.model, run.objectives, run.cfg, run.tokenizer, {
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler else None,
            "skipped_steps": run.skipped_total, "bad_streak": run.bad_streak}, meta, run.cfg.train.keep_checkpoints)
    barrier()
    return path


def run_pretrain(cfg: PretrainConfig, features: str | Path, manifest: str | Path, out: str | Path,
                 resume: bool = False, progress: bool = True, after_step=None) -> dict:
    """Train ``cfg`` and return a summary. ``after_step(run, step, last) -> stop?`` runs after every
    optimizer step on every rank (``finetune.selection.Selector``: model selection and early stopping)."""
    out = Path(out)
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, device = init_distributed(device)
    try:
        run = _start(cfg, Path(features), Path(manifest), out, resume, rank, world, device)
        meta = {"features": str(features), "manifest": str(manifest), "world_size": world}
        with _sigterm_raises():
            summary = _train(run, out, meta, progress, after_step)
        if rank == 0:  # a fine-tuning run rewrites it with its best score (finetune/job.py)
            write_model_card(out, run.cfg, summary, "pretraining", features, manifest)
        return summary
    finally:
        shutdown_distributed()


def _start(cfg, features: Path, manifest: Path, out: Path, resume: bool, rank: int, world: int, device: str) -> Run:
    ckpt = latest_checkpoint(out) if out.exists() else None
    if ckpt is not None and not resume:
        raise ConfigError(f"{out} already holds a run (latest checkpoint {ckpt.name}); pass --resume to continue "
                          "it or choose another --out")
    if resume and ckpt is None:
        log.warning("--resume: no checkpoint under %s, starting from step 0", out)
    if cfg.train.threads:
        # Small models on a busy machine: torch's default (one thread per core) spins in
        # every op while DataLoader workers and other jobs hold the cores.
        torch.set_num_threads(cfg.train.threads)
    entries = load_manifest(manifest, cfg.train.split)
    if not entries:
        raise ConfigError(f"{manifest}: no videos in split {cfg.train.split!r}")
    run = build_run(cfg, FeatureStore(features), entries, device, rank, world, ckpt)
    if rank == 0:
        if ckpt is not None:
            log.info("resuming %s from %s (step %d of %d)", out, ckpt, run.start, cfg.train.max_steps)
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(run.cfg, out / "config.yaml")
        d = run.dataset
        log.info("pretraining on %s: %d examples from %d videos (%d missing from the shards), %d process(es), "
                 "%d parameters, objectives %s", device, len(d), len(d.videos), d.missing, world,
                 sum(p.numel() for p in run.runner.parameters()), ", ".join(run.cfg.objective_names))
    return run


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``Terminated`` in the main thread while training, so it checkpoints like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(run: Run, out: Path, meta: dict, progress: bool, after_step=None) -> dict:
    tc, t0 = run.cfg.train, time.perf_counter()
    stopped_early = False
    metrics = MetricsLogger(out, enabled=run.rank == 0, resume_step=run.start if run.checkpoint else None)
    bar = _progress_bar(run, progress)
    log_window = _LogWindow(run, metrics, bar, progress)
    step, last_ckpt, batches = run.start, None, iter(run.make_loader())
    run.runner.train()
    try:
        while step < tc.max_steps:
            result = train_step(run, step, batches)
            step += 1
            log_window.add(step, result)
            if step % tc.checkpoint_every == 0 and step < tc.max_steps:
                t_save = time.perf_counter()
                last_ckpt = save(run, out, step, meta)
                log_window.t_window += time.perf_counter() - t_save  # examples/s measures training, not saving
            if after_step is not None and after_step(run, step, step == tc.max_steps):
                stopped_early = step < tc.max_steps
                if stopped_early:
                    break
    except KeyboardInterrupt as exc:  # Ctrl-C, or Terminated (SIGTERM)
        _checkpoint_on_interrupt(run, out, step, meta, exc)
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    last_ckpt = save(run, out, step, meta) if step > run.start or last_ckpt is None else last_ckpt
    return _summary(run, out, metrics, step, last_ckpt, time.perf_counter() - t0, stopped_early)


def _progress_bar(run: Run, progress: bool):
    if run.rank != 0 or not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=run.cfg.train.max_steps, initial=run.start, desc="pretrain", unit="step", dynamic_ncols=True)


class _LogWindow:
    """Per-step values gathered into one metrics record every ``log_every`` steps; the bad-step stop rule."""

    def __init__(self, run: Run, metrics: MetricsLogger, bar, progress: bool):
        self.run, self.metrics, self.bar, self.progress = run, metrics, bar, progress
        self.values: dict[str, list[float]] = defaultdict(list)
        self.t_window = time.perf_counter()
        tc = run.cfg.train
        self.examples_per_step = tc.batch_size * tc.grad_accum * run.world

    def add(self, step: int, result: StepResult) -> None:
        run, tc = self.run, self.run.cfg.train
        for k, v in result.values.items():  # device tensors stay there until the window is written
            self.values[k].append(v)
        if result.bad and run.rank == 0:
            log.warning("step %d: %s; step skipped (no update), %d bad step(s) in a row, %d allowed",
                        step, result.bad, run.bad_streak, tc.max_bad_steps)
        if run.bad_streak >= tc.max_bad_steps:
            self.metrics.log(step, window_record(self._numbers(), self.examples_per_step, self.t_window,
                                                 result.stage_index))  # show the bad steps
            raise TrainError(f"steps {step - run.bad_streak + 1}-{step}: {run.bad_streak} consecutive steps with a "
                             f"non-finite loss or gradient (last: {result.bad}); stopping (train.max_bad_steps="
                             f"{tc.max_bad_steps}). Parameters are those after step {step - run.bad_streak}; "
                             "lower lr, raise warmup_steps or use fp32, then --resume from the last checkpoint")
        if step % tc.log_every == 0 or step == tc.max_steps:
            self._flush(step, result.stage_index)
        if self.bar is not None:
            self.bar.update(1)

    def _numbers(self) -> dict[str, list[float]]:
        """The window's values as floats: one read from the device for all of them."""
        flat = {f"{k}\0{i}": v for k, vs in self.values.items() for i, v in enumerate(vs)}
        read = as_numbers(flat)
        return {k: [read[f"{k}\0{i}"] for i in range(len(vs))] for k, vs in self.values.items()}

    def _flush(self, step: int, stage_index: int) -> None:
        now = time.perf_counter()
        record = window_record(self._numbers(), self.examples_per_step, self.t_window, stage_index, now)
        self.metrics.log(step, record)
        self.values, self.t_window = defaultdict(list), now
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", ex_s=f"{record['examples_per_s']:.0f}")
        elif self.run.rank == 0 and self.progress:
            log.info("step %d/%d loss %.4f %s %.0f ex/s", step, self.run.cfg.train.max_steps, record["loss"],
                     " ".join(f"{k}={v:.3f}" for k, v in sorted(record.items()) if k.endswith("_loss")),
                     record["examples_per_s"])


def _checkpoint_on_interrupt(run: Run, out: Path, step: int, meta: dict, exc: KeyboardInterrupt) -> None:
    why = f"signal {exc.signal_name} received" if isinstance(exc, Terminated) else "interrupted"
    if step <= run.start:
        return
    try:
        path = save(run, out, step, meta)
    except TrainError as refused:
        if run.rank == 0:
            print(f"videolm pretrain: {why} at step {step}; {refused}", file=sys.stderr)
        raise
    if run.rank == 0:
        print(f"videolm pretrain: {why} at step {step}; checkpoint {path}, re-run with --resume to continue",
              file=sys.stderr)


def _summary(run: Run, out: Path, metrics: MetricsLogger, step: int, last_ckpt, seconds: float,
             stopped_early: bool = False) -> dict:
    tc = run.cfg.train
    examples_per_step = tc.batch_size * tc.grad_accum * run.world
    summary = {"steps": step, "resumed_from": run.start, "skipped_steps": run.skipped_total, "seconds": seconds,
               "world_size": run.world, "device": run.device,
               "examples_per_s": examples_per_step * (step - run.start) / max(seconds, 1e-9),
               "checkpoint": str(last_ckpt) if last_ckpt else None, "run_dir": str(out),
               "examples": len(run.dataset), "videos": len(run.dataset.videos),
               "videos_missing_features": run.dataset.missing,
               "captions_without_clips": run.dataset.uncovered, "stopped_early": stopped_early}
    if run.rank == 0:
        summary["loss_plot"] = str(metrics.plot()) if (out / "metrics.jsonl").exists() else None
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
