"""``videolm pretrain``: objectives mixed by a recipe, over cached shards, on one process or many.

One optimizer step = ``grad_accum`` micro-batches. For each step the trainer

1. picks the stage that owns the step and its objectives (all of them with
   ``mixing: sum``; one drawn by ``ratio`` with ``mixing: sample``, the same draw
   on every rank because it depends on (seed, step) only);
2. seeds torch (dropout) and the objectives' mask generator from (seed, step,
   rank), so a resumed run repeats an uninterrupted one exactly;
3. sums ``weight * loss`` over the objectives, backpropagates, clips, steps
   AdamW and the warmup + decay schedule, and logs every loss.

A step whose loss or gradient norm is NaN/inf is skipped: no optimizer step,
gradients dropped, the schedule (and data plan) advance as for any step, a
warning names the objectives at fault, and the metrics record carries
``skipped_steps``; ``train.max_bad_steps`` such steps in a row stop the run with
``TrainError``. (fp16's GradScaler skips overflowing steps on its own and lowers
the scale; those are not counted.) No checkpoint is ever written from weights
that are not finite. SIGTERM (a scheduler's time limit) is handled like Ctrl-C:
a checkpoint of the last finished step is written before the process exits.

Batches come from ``PlannedBatches``: batch ``i`` of the run is a fixed slice of
the permutation of epoch ``i // batches_per_epoch``, so resuming at step ``s``
just starts the plan at batch ``s * grad_accum``; no sampler state is saved.

Data parallel: under torchrun the objectives run inside one ``nn.Module``
(``ObjectiveRunner``) wrapped in DistributedDataParallel. Each objective calls
several model entry points, and with ``mixing: sample`` different heads are used
on different steps, hence ``find_unused_parameters=True``.
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
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import latest_checkpoint, load_run_config, load_trainer_state, save_checkpoint, set_rng_state
from .collate import Collator, batch_to
from ..errors import ConfigError, TrainError
from .dataset import VideoTextDataset
from .distributed import all_reduce_mean, barrier, init_distributed, rank_and_world, shutdown_distributed
from ..features.shards import FeatureStore
from ..manifests.manifest import load_manifest
from ..model.video_text import VideoTextModel, resolve_model_config
from .objectives import OBJECTIVES, TextVocab, build_objective
from .recipe import PretrainConfig, recipe_to_dict, save_recipe
from ..model.text import load_tokenizer, resolve_text_dir
from .metrics_log import MetricsLogger

log = logging.getLogger("videolm.pretrain.trainer")

# Settings that may change when a run is resumed (they do not alter what has been learned so far).
RESUMABLE_CHANGES = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "device",
                     "threads", "max_bad_steps"}


class PlannedBatches:
    """Batch sampler: yields ``[(index, epoch), ...]`` for this rank, from batch ``start`` onwards, forever."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        self.n, self.bs, self.world, self.rank, self.seed, self.start = n, batch_size, world, rank, seed, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise TrainError(f"the split has {n} examples, fewer than one global batch "
                             f"({batch_size} x {world} processes); lower batch_size")

    def batch(self, i: int) -> list[tuple[int, int]]:
        epoch, j = divmod(i, self.per_epoch)
        if getattr(self, "_epoch", None) != epoch:  # one shuffle per epoch, not per batch (10M examples: 0.4 s)
            self._epoch, self._perm = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n)
        perm = self._perm
        a = (j * self.world + self.rank) * self.bs
        return [(int(k), epoch) for k in perm[a : a + self.bs]]

    def __iter__(self):
        i = self.start
        while True:
            yield self.batch(i)
            i += 1


class ObjectiveRunner(nn.Module):
    """The model plus the objectives, so one forward call computes a whole micro-batch's losses."""

    def __init__(self, model: VideoTextModel, objectives: dict):
        super().__init__()
        self.model, self.objectives = model, objectives

    def forward(self, batch: dict, tasks: list[str], gen: torch.Generator) -> dict[str, dict]:
        return {task: self.objectives[task](self.model, batch, gen) for task in tasks}


def task_key(stage_index: int, name: str) -> str:
    return f"{stage_index}:{name}"


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: VideoTextModel, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms; the text encoder's lr scaled by ``text_lr_scale``."""
    groups = defaultdict(list)
    text_ids = {id(p) for p in model.text.parameters()}
    for p in model.parameters():
        groups[(id(p) in text_ids, p.ndim >= 2)].append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr": cfg.lr * (cfg.text_lr_scale if is_text else 1.0),
          "weight_decay": cfg.weight_decay if decay else 0.0} for (is_text, decay), ps in groups.items()],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0])


def choose_objectives(stage, seed: int, step: int) -> list[str]:
    if stage.mixing == "sum":  # weight 0 switches an objective off without editing the recipe
        return [o.name for o in stage.objectives if o.weight > 0]
    ratios = np.array([o.ratio for o in stage.objectives], dtype=float)
    pick = np.random.default_rng((seed, step, 7)).choice(len(ratios), p=ratios / ratios.sum())
    return [stage.objectives[pick].name]


def _check_resume_config(saved: PretrainConfig, wanted: PretrainConfig) -> None:
    a, b = recipe_to_dict(saved), recipe_to_dict(wanted)
    b["model"]["feature_dim"], b["model"]["visual_vocab"] = a["model"]["feature_dim"], a["model"]["visual_vocab"]
    diffs = []
    for section in ("data", "model", "train"):
        for k in a[section]:
            if a[section][k] != b[section].get(k) and k not in RESUMABLE_CHANGES:
                diffs.append(f"{section}.{k}: {a[section][k]!r} -> {b[section].get(k)!r}")
    if a["stages"] != b["stages"]:
        diffs.append("stages/objectives differ")
    if diffs:
        raise ConfigError("--resume with a different config would not continue the same run: " + "; ".join(diffs)
                          + f". Only {', '.join(sorted(RESUMABLE_CHANGES))} may change")


def _any_rank(flag: bool, device: str, world: int) -> bool:
    """True when ``flag`` is true on any process (so every rank skips the same steps)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _window_record(window: dict, examples_per_step: int, t_window: float, stage: int, now: float | None = None) -> dict:
    now = time.perf_counter() if now is None else now
    # NaN marks a metric an objective could not measure on that step (e.g. fom on one-clip videos)
    record = {k: float(np.mean([x for x in v if x == x])) if any(x == x for x in v) else float("nan")
              for k, v in window.items() if k != "skipped_steps"}
    if window.get("skipped_steps"):
        record["skipped_steps"] = int(round(sum(window["skipped_steps"])))  # steps of this record skipped
    record["examples_per_s"] = examples_per_step * len(window["loss"]) / max(now - t_window, 1e-9)
    record["stage"] = stage
    return record


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def run_pretrain(cfg: PretrainConfig, features: str | Path, manifest: str | Path, out: str | Path,
                 resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, device = init_distributed(device)
    try:
        return _train(cfg, Path(features), Path(manifest), out, resume, progress, rank, world, device)
    finally:
        shutdown_distributed()


def _train(cfg, features, manifest, out, resume, progress, rank, world, device) -> dict:
    tc = cfg.train
    if tc.precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    ckpt = latest_checkpoint(out) if out.exists() else None
    if ckpt is not None and not resume:
        raise ConfigError(f"{out} already holds a run (latest checkpoint {ckpt.name}); pass --resume to continue "
                          "it or choose another --out")
    if resume and ckpt is None:
        log.warning("--resume: no checkpoint under %s, starting from step 0", out)

    if tc.threads:
        # Small models on a busy machine: torch's default (one thread per core) spins in
        # every op while DataLoader workers and other jobs hold the cores.
        torch.set_num_threads(tc.threads)
    store = FeatureStore(features)
    entries = load_manifest(manifest, tc.split)
    if not entries:
        raise ConfigError(f"{manifest}: no videos in split {tc.split!r}")
    codebook = store.codebook_attrs
    for name in cfg.objective_names:
        if getattr(OBJECTIVES[name], "needs_tokens", False) and codebook is None:
            raise ConfigError(f"objective {name!r} needs visual words but {features} has no codebook; "
                              f"run `videolm quantize --features {features}` first")
    if cfg.data.max_frames > cfg.model.max_frames:
        raise ConfigError(f"data.max_frames={cfg.data.max_frames} exceeds model.max_frames={cfg.model.max_frames}")
    mcfg = resolve_model_config(cfg.model, store.dim, int(codebook["model_vocab_size"]) if codebook else 0)
    cfg = PretrainConfig(cfg.data, mcfg, tc, cfg.stages)
    if ckpt is not None:
        saved = load_run_config(ckpt)
        resolve_model_config(saved.model, store.dim, int(codebook["model_vocab_size"]) if codebook else 0)
        _check_resume_config(saved, cfg)
        cfg = PretrainConfig(saved.data, saved.model, tc, saved.stages)
        before = json.loads((ckpt / "meta.json").read_text()).get("world_size", world)
        if before != world and rank == 0:
            log.warning("resuming a run trained with %d process(es) on %d: the global batch and data order "
                        "change, so losses will not repeat an uninterrupted run", before, world)

    dataset = VideoTextDataset(store, entries, cfg.data, seed=tc.seed)
    text_dir = resolve_text_dir(cfg.model.text_init)
    tokenizer = load_tokenizer(ckpt / "tokenizer" if ckpt else text_dir)
    vocab = TextVocab.from_tokenizer(tokenizer)
    # one instance per (stage, objective): stages may give the same objective other options
    objectives = {task_key(si, o.name): build_objective(o.name, vocab, o.options)
                  for si, s in enumerate(cfg.stages) for o in s.objectives}
    weights = {task_key(si, o.name): o.weight for si, s in enumerate(cfg.stages) for o in s.objectives}

    torch.manual_seed(tc.seed)
    model = VideoTextModel(cfg.model).to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.schedule))
    scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
    start, skipped_total, bad_streak = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(torch.load(ckpt / "model.pt", map_location=device, weights_only=True))
        state = load_trainer_state(ckpt, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        skipped_total, bad_streak = int(state.get("skipped_steps", 0)), int(state.get("bad_streak", 0))
        if rank == 0:
            log.info("resuming %s from %s (step %d of %d)", out, ckpt, start, tc.max_steps)
    runner = ObjectiveRunner(model, objectives)
    if world > 1:
        ddp_kwargs = {"device_ids": [torch.device(device).index]} if device.startswith("cuda") else {}
        runner = nn.parallel.DistributedDataParallel(runner, find_unused_parameters=True, **ddp_kwargs)

    sampler = PlannedBatches(len(dataset), tc.batch_size, world, rank, tc.seed, start * tc.grad_accum)
    collate = Collator(tokenizer, cfg.model.max_text_len, min(32, cfg.model.max_text_len))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=tc.num_workers,
        pin_memory=device.startswith("cuda"), persistent_workers=tc.num_workers > 0,
        prefetch_factor=4 if tc.num_workers else None)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(cfg, out / "config.yaml")
        log.info("pretraining on %s: %d examples from %d videos (%d missing from the shards), %d process(es), "
                 "%d parameters, objectives %s", device, len(dataset), len(dataset.videos), dataset.missing, world,
                 sum(p.numel() for p in model.parameters()), ", ".join(cfg.objective_names))
    metrics = MetricsLogger(out, enabled=rank == 0, resume_step=start if ckpt is not None else None)
    meta = {"features": str(features), "manifest": str(manifest), "world_size": world}

    def checkpoint(step: int) -> Path | None:
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # every rank holds the same weights, so every rank refuses
            kept = latest_checkpoint(out) if out.exists() else None
            raise TrainError(f"refusing to write the step-{step} checkpoint: {len(bad)} parameter tensor(s) hold "
                             f"NaN/inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                             + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was written")
                             + "; lower lr or use fp32")
        path = None
        if rank == 0:
            path = save_checkpoint(out, step, model, cfg, tokenizer, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "skipped_steps": skipped_total, "bad_streak": bad_streak}, meta, tc.keep_checkpoints)
        barrier()
        return path

    bar = None
    if rank == 0 and progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
    window: dict[str, list[float]] = defaultdict(list)
    step, last_ckpt, examples_per_step = start, None, tc.batch_size * tc.grad_accum * world
    t_window, t0 = time.perf_counter(), time.perf_counter()
    batches = iter(loader)
    runner.train()
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        def on_sigterm(signum, frame):
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

        previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while step < tc.max_steps:
            stage = cfg.stage_at(step)
            si = cfg.stages.index(stage)
            names = choose_objectives(stage, tc.seed, step)
            tasks = [task_key(si, n) for n in names]
            seed = step_seed(tc.seed, step, rank)
            torch.manual_seed(seed)  # dropout: same draws when this step is replayed after a resume
            gen = torch.Generator().manual_seed(seed)
            values: dict[str, float] = {}
            bad_tasks: set[str] = set()
            for micro in range(tc.grad_accum):  # every micro-batch is drawn, even after a bad one: the data plan
                batch = batch_to(next(batches), device)
                sync = micro == tc.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else runner.no_sync()), _autocast(device, tc.precision):
                    per_task = runner(batch, tasks, gen)
                    total, out_losses = 0.0, {}
                    for task, values_of_task in per_task.items():
                        parts = [v for k, v in values_of_task.items() if k.endswith("_loss")]
                        part_sum = sum(parts)
                        if not bool(torch.isfinite(torch.as_tensor(part_sum)).all()):
                            bad_tasks.add(task.split(":", 1)[1])
                        total = total + weights[task] * part_sum
                        out_losses.update(values_of_task)
                    loss = total / tc.grad_accum
                # Backward even a non-finite loss: under DDP every rank must join the gradient all-reduce.
                (scaler.scale(loss) if scaler else loss).backward()
                for k, v in out_losses.items():
                    values[k] = values.get(k, 0.0) + (v.item() if torch.is_tensor(v) else float(v)) / tc.grad_accum
                values["loss"] = values.get("loss", 0.0) + loss.item()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf")))
            if tc.grad_clip:
                values["grad_norm"] = grad_norm
            bad_loss = _any_rank(bool(bad_tasks), device, world)
            bad_grad = not math.isfinite(grad_norm) and scaler is None  # the scaler handles fp16 overflow itself
            if bad_loss or bad_grad:
                # Skip the update; the schedule, data plan and step count advance as for any step, so
                # a resumed run repeats this one. The scaler's update() ends its iteration (and, having
                # seen inf/NaN gradients, lowers the scale).
                if scaler:
                    scaler.update()
                skipped_total, bad_streak = skipped_total + 1, bad_streak + 1
                values["skipped_steps"] = 1.0
                what = (f"loss is not finite in {', '.join(sorted(bad_tasks)) or 'another process'}" if bad_loss
                        else f"gradient norm is {grad_norm} with a finite loss")
                if rank == 0:
                    log.warning("step %d: %s; step skipped (no update), %d bad step(s) in a row, %d allowed",
                                step + 1, what, bad_streak, tc.max_bad_steps)
            else:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                bad_streak = 0
            values["lr"] = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for k, v in all_reduce_mean(values, device).items():
                window[k].append(v)
            if bad_streak >= tc.max_bad_steps:
                metrics.log(step, _window_record(window, examples_per_step, t_window, si))  # show the bad steps
                raise TrainError(f"steps {step - bad_streak + 1}-{step}: {bad_streak} consecutive steps with a "
                                 f"non-finite loss or gradient (last: {what}); stopping (train.max_bad_steps="
                                 f"{tc.max_bad_steps}). Parameters are those after step {step - bad_streak}; "
                                 "lower lr, raise warmup_steps or use fp32, then --resume from the last checkpoint")
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.perf_counter()
                record = _window_record(window, examples_per_step, t_window, si, now)
                metrics.log(step, record)
                window, t_window = defaultdict(list), now
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ex_s=f"{record['examples_per_s']:.0f}")
                elif rank == 0 and progress:
                    log.info("step %d/%d loss %.4f %s %.0f ex/s", step, tc.max_steps, record["loss"],
                             " ".join(f"{k}={v:.3f}" for k, v in sorted(record.items()) if k.endswith("_loss")),
                             record["examples_per_s"])
            if bar is not None:
                bar.update(1)
            if step % tc.checkpoint_every == 0 and step < tc.max_steps:
                t_save = time.perf_counter()
                last_ckpt = checkpoint(step)
                t_window += time.perf_counter() - t_save  # examples/s measures training, not saving
    except KeyboardInterrupt as exc:
        why = f"{exc.args[0]} received" if exc.args else "interrupted"
        if step > start:
            try:
                path = checkpoint(step)
            except TrainError as refused:
                if rank == 0:
                    print(f"videolm pretrain: {why} at step {step}; {refused}", file=sys.stderr)
                raise
            if rank == 0:
                print(f"videolm pretrain: {why} at step {step}; checkpoint {path}, "
                      "re-run with --resume to continue", file=sys.stderr)
        raise
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if bar is not None:
            bar.close()
        metrics.close()
    last_ckpt = checkpoint(step) if step > start or last_ckpt is None else last_ckpt
    seconds = time.perf_counter() - t0
    summary = {"steps": step, "resumed_from": start, "skipped_steps": skipped_total, "seconds": seconds, "world_size": world, "device": device,
               "examples_per_s": examples_per_step * (step - start) / max(seconds, 1e-9),
               "checkpoint": str(last_ckpt) if last_ckpt else None, "run_dir": str(out),
               "examples": len(dataset), "videos_missing_features": dataset.missing,
               "captions_without_clips": dataset.uncovered}
    if rank == 0:
        summary["loss_plot"] = str(metrics.plot()) if (out / "metrics.jsonl").exists() else None
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
