"""Building a pretraining run: resolved config, data plan, model, objectives, optimiser, resume state.

``build_run`` writes no file and starts no loop: ``trainer.train_step`` takes the
``Run`` it returns, and so does ``benchmarks/bench_train.py``, which therefore
times the real step. ``trainer.run_pretrain`` adds the run directory, signals,
logging and checkpoints around it.

Batches come from ``PlannedBatches``: batch ``i`` of the run is a fixed slice of
the permutation of epoch ``i // batches_per_epoch``, so resuming at step ``s``
just starts the plan at batch ``s * grad_accum``; no sampler state is saved.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import to_dict
from ..errors import ConfigError, TrainError
from ..features.shards import FeatureStore
from ..model.text import load_tokenizer, resolve_text_dir
from ..model.video_text import ModelConfig, build_model, parts_with_needs, resolve_model_config
from .checkpoint import (has_objectives, latest_checkpoint, load_into, load_model_state, load_objective_state,
                         load_run_config, load_trainer_state, set_rng_state)
from .collate import Collator
from .dataset import VideoTextDataset
from .objectives import OBJECTIVES, TextVocab, build_objective, model_parts_for
from .passes import SharedPasses
from .recipe import PretrainConfig, recipe_to_dict

log = logging.getLogger("videolm.pretrain.run")

# Settings that may change when a run is resumed (they do not alter what has been learned so far).
RESUMABLE_CHANGES = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "device",
                     "threads", "max_bad_steps", "compile"}


class PlannedBatches:
    """Batch sampler: yields ``[(index, epoch), ...]`` for this rank, from batch ``start`` onwards, forever."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        self.n, self.bs, self.world, self.rank, self.seed, self.start = n, batch_size, world, rank, seed, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise TrainError(f"the split has {n} examples, fewer than one global batch "
                             f"({batch_size} x {world} processes); lower batch_size")
        self._epoch, self._perm = None, None

    def batch(self, i: int) -> list[tuple[int, int]]:
        epoch, j = divmod(i, self.per_epoch)
        if self._epoch != epoch:  # one shuffle per epoch, not per batch (10M examples: 0.4 s)
            self._epoch, self._perm = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n)
        a = (j * self.world + self.rank) * self.bs
        return [(int(k), epoch) for k in self._perm[a : a + self.bs]]

    def __iter__(self):
        i = self.start
        while True:
            yield self.batch(i)
            i += 1


class ObjectiveRunner(nn.Module):
    """The model plus the objectives (and their heads), so one forward call computes a micro-batch's losses."""

    def __init__(self, model: nn.Module, objectives: nn.ModuleDict):
        super().__init__()
        self.model, self.objectives = model, objectives

    def forward(self, batch: dict, tasks: list[str], gen: torch.Generator) -> dict[str, dict]:
        # one clean and one masked encoder pass for the whole micro-batch, shared by the objectives
        passes = SharedPasses(self.model, batch, gen, [self.objectives[t] for t in tasks])
        return {task: self.objectives[task](self.model, batch, gen, passes) for task in tasks}


def task_key(stage_index: int, name: str) -> str:
    """One objective instance per (stage, objective): stages may give the same objective other options."""
    return f"{stage_index}:{name}"


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(trainable: nn.Module, text: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over model + heads; no weight decay on biases and norms; ``text``'s lr scaled by ``text_lr_scale``."""
    groups = defaultdict(list)
    text_ids = {id(p) for p in text.parameters()}
    for p in trainable.parameters():
        groups[(id(p) in text_ids, p.ndim >= 2)].append(p)
    # on CUDA the fused kernel updates every tensor in a few launches instead of several per tensor
    fused = all(p.is_cuda for p in trainable.parameters())
    return torch.optim.AdamW(
        [{"params": ps, "lr": cfg.lr * (cfg.text_lr_scale if is_text else 1.0),
          "weight_decay": cfg.weight_decay if decay else 0.0} for (is_text, decay), ps in groups.items()],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)


@dataclass
class Run:
    """Everything one training process needs, built once by ``build_run``."""

    cfg: PretrainConfig
    device: str
    rank: int
    world: int
    dataset: VideoTextDataset
    tokenizer: object
    model: nn.Module
    objectives: nn.ModuleDict  # task_key -> objective (with its heads)
    weights: dict[str, float]  # task_key -> loss weight
    runner: nn.Module  # ObjectiveRunner, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    checkpoint: Path | None = None  # resumed from
    start: int = 0  # first step to run
    skipped_total: int = 0  # non-finite steps skipped so far
    bad_streak: int = 0  # ... of which in a row at the end

    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.cfg.model.max_text_len, min(32, self.cfg.model.max_text_len))

    def make_loader(self, num_workers: int | None = None) -> torch.utils.data.DataLoader:
        """The plan's batches for this rank from ``start``, collated in ``num_workers`` processes."""
        tc = self.cfg.train
        workers = tc.num_workers if num_workers is None else num_workers
        sampler = PlannedBatches(len(self.dataset), tc.batch_size, self.world, self.rank, tc.seed,
                                 self.start * tc.grad_accum)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collator(), num_workers=workers,
            pin_memory=self.device.startswith("cuda"), persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None)


def resolve_run_config(cfg: PretrainConfig, store: FeatureStore, ckpt: Path | None, world: int,
                       rank: int) -> PretrainConfig:
    """Fill sizes and parts from the data and the objectives; on resume, check and take the saved config."""
    codebook = store.codebook_attrs
    for name in cfg.objective_names:
        if getattr(OBJECTIVES[name], "needs_tokens", False) and codebook is None:
            raise ConfigError(f"objective {name!r} needs visual words but {store.directory} has no codebook; "
                              f"run `videolm quantize --features {store.directory}` first")
    if cfg.model.video_input == "tokens" and codebook is None:
        raise ConfigError(f"model.video_input 'tokens' needs visual words: run "
                          f"`videolm quantize --features {store.directory}` first")
    if cfg.data.max_frames > cfg.model.max_frames:
        raise ConfigError(f"data.max_frames={cfg.data.max_frames} exceeds model.max_frames={cfg.model.max_frames}")
    vocab = int(codebook["model_vocab_size"]) if codebook else 0
    mcfg = resolve_model_config(cfg.model, store.dim, vocab)
    # the parts the objectives run, plus any the recipe asks to keep (e.g. a decoder for later fine-tuning)
    mcfg = replace(mcfg, parts=parts_with_needs(set(mcfg.parts or ()) | set(model_parts_for(cfg.objective_names))))
    if ckpt is None and cfg.train.init_from:
        mcfg = init_model_config(mcfg, cfg.train.init_from, rank)
    cfg = replace(cfg, model=mcfg)
    if ckpt is None:
        return cfg
    saved = load_run_config(ckpt)
    resolve_model_config(saved.model, store.dim, vocab)
    if cfg.train.init_from:  # a fine-tuning run's model came from its --init checkpoint, not from the recipe
        cfg = replace(cfg, model=saved.model)
    check_resume_config(saved, cfg)
    before = json.loads((ckpt / "meta.json").read_text()).get("world_size", world)
    if before != world and rank == 0:
        log.warning("resuming a run trained with %d process(es) on %d: the global batch and data order "
                    "change, so losses will not repeat an uninterrupted run", before, world)
    return replace(cfg, data=saved.data, model=saved.model, stages=saved.stages)  # select may change on resume


def init_checkpoint(path: str) -> Path:
    found = latest_checkpoint(path)
    if found is None:
        raise ConfigError(f"train.init_from {path}: no checkpoint there (a run directory or one checkpoint directory)")
    return found


def init_model_config(mcfg, path: str, rank: int):
    """The model of the checkpoint a run starts from, with the parts this recipe's objectives add.

    Its sizes, architecture and input kind come from that checkpoint (its weights
    only fit them); the recipe's own model section is set aside, with a warning
    where it differs.
    """
    saved = load_run_config(init_checkpoint(path)).model
    if saved.feature_dim != mcfg.feature_dim:
        raise ConfigError(f"train.init_from {path}: its model reads {saved.feature_dim}-d clip features but these "
                          f"shards hold {mcfg.feature_dim}-d ones")
    if saved.video_input == "tokens" and saved.visual_vocab != mcfg.visual_vocab:
        raise ConfigError(f"train.init_from {path}: its model has {saved.visual_vocab} visual-word ids, the codebook "
                          f"gives {mcfg.visual_vocab}")
    parts = parts_with_needs(set(saved.parts or ()) | set(mcfg.parts or ()))
    ours, theirs = to_dict(replace(mcfg, parts=None)), to_dict(replace(saved, parts=None))
    # only what the recipe asked for: a task recipe without a model section holds the defaults
    default = to_dict(replace(ModelConfig(), parts=None))
    differ = [f"{k}: {ours[k]!r} -> {theirs[k]!r}" for k in ours if ours[k] != theirs[k] and ours[k] != default[k]]
    if differ and rank == 0:
        log.warning("train.init_from %s: the model comes from that checkpoint; the recipe's model settings are "
                    "set aside (%s)", path, "; ".join(differ))
    return replace(saved, parts=parts)


def load_init_weights(run: Run, path: str) -> None:
    """Model weights (every key of the checkpoint; parts it lacks start fresh, listed) and each objective's
    head from the checkpoint's objective of the same name, when it has one."""
    ckpt = init_checkpoint(path)
    state = load_model_state(ckpt, run.device)
    own = run.model.state_dict()
    extra = sorted(set(state) - set(own))
    if extra:
        raise ConfigError(f"train.init_from {ckpt}: weights with no place in this model: {', '.join(extra[:10])}")
    fresh = sorted(set(own) - set(state))
    run.model.load_state_dict(state, strict=False)
    heads = load_objective_state(ckpt, run.device) if has_objectives(ckpt) else {}
    by_name: dict[str, dict] = defaultdict(dict)
    for key, value in heads.items():  # "<stage>:<name>.<param>"; a later stage's copy wins
        task, param = key.split(".", 1)
        by_name[task.split(":", 1)[1]][param] = value
    for key, objective in run.objectives.items():
        name = key.split(":", 1)[1]
        wanted = objective.state_dict()
        if wanted and by_name.get(name, {}).keys() == wanted.keys():
            objective.load_state_dict(by_name[name])
        elif wanted:
            fresh.append(f"{key} head")
    if run.rank == 0:
        log.info("started from %s%s", ckpt, f"; fresh (not in it): {', '.join(fresh[:12])}" if fresh else "")


def check_resume_config(saved: PretrainConfig, wanted: PretrainConfig) -> None:
    a, b = recipe_to_dict(saved), recipe_to_dict(wanted)
    for resolved in ("feature_dim", "visual_vocab"):  # parts are resolved the same way on both sides
        b["model"][resolved] = a["model"][resolved]
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


def leaves_parameters_unused(cfg: PretrainConfig) -> bool:
    """Whether some step of this recipe leaves a built parameter without a gradient.

    DDP must then be told (``find_unused_parameters``), at the cost of a graph walk
    per step. A step uses the text and video encoders, the parts and heads of its
    objectives, and the joint space (projections, temperature) only with ``joint``;
    the model is built with the parts of all stages' objectives (switched-off ones
    have no instance), and always with the joint space, so that every checkpoint
    can be scored on retrieval.
    """
    if len(cfg.stages) > 1:  # each stage has its own objective instances: the others' heads rest
        return True
    active = [o.name for o in cfg.stages[0].active]
    if cfg.stages[0].mixing == "sample" and len(active) > 1:
        return True
    return "joint" not in active


def build_objectives(cfg: PretrainConfig, model: nn.Module, vocab: TextVocab):
    """(task_key -> objective, task_key -> weight) for the objectives that run, over every stage."""
    objectives = nn.ModuleDict({task_key(si, o.name): build_objective(o.name, model, vocab, o.options)
                                for si, s in enumerate(cfg.stages) for o in s.active})
    weights = {task_key(si, o.name): o.weight for si, s in enumerate(cfg.stages) for o in s.active}
    return objectives, weights


def build_run(cfg: PretrainConfig, store: FeatureStore, entries: list, device: str, rank: int = 0,
              world: int = 1, ckpt: Path | None = None) -> Run:
    """A ready-to-step run; with ``ckpt``, every state (weights, optimiser, RNG, counters) restored from it."""
    tc = cfg.train
    if tc.precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    cfg = resolve_run_config(cfg, store, ckpt, world, rank)
    dataset = VideoTextDataset(store, entries, cfg.data, seed=tc.seed)
    if ckpt is not None or tc.init_from:  # the tokenizer the weights were trained with
        tokenizer = load_tokenizer((ckpt or init_checkpoint(tc.init_from)) / "tokenizer")
    else:
        tokenizer = load_tokenizer(resolve_text_dir(cfg.model.text_init))
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model)
    objectives, weights = build_objectives(cfg, model, TextVocab.from_tokenizer(tokenizer))
    model.to(device)
    objectives.to(device)
    runner = ObjectiveRunner(model, objectives)
    optimizer = build_optimizer(runner, model.text, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.schedule))
    scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
    run = Run(cfg, device, rank, world, dataset, tokenizer, model, objectives, weights, runner, optimizer,
              scheduler, scaler, checkpoint=ckpt)
    if ckpt is not None:
        restore(run, ckpt)
    elif tc.init_from:
        load_init_weights(run, tc.init_from)
    if tc.compile:  # before DDP wraps it, as PyTorch advises; in place, so no state-dict key changes
        compile_runner(runner, device)
    if world > 1:
        ddp_kwargs = {"device_ids": [torch.device(device).index]} if device.startswith("cuda") else {}
        run.runner = nn.parallel.DistributedDataParallel(
            runner, find_unused_parameters=leaves_parameters_unused(cfg), **ddp_kwargs)
    return run


def compile_problem(device: str) -> str | None:
    """Why torch.compile's default (inductor) backend cannot run on ``device`` here, or None when it can.

    Inductor builds C++ (CPU) or Triton (CUDA) kernels when a graph first runs; without a
    working compiler a run would otherwise fail at its first step, deep in a long traceback.
    """
    try:
        probe = torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True)
        probe(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - whatever breaks in the toolchain, the run cannot compile
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0] if first else 'no message'}"
    return None


def compile_runner(runner: nn.Module, device: str) -> None:
    """``train.compile``: compile the runner's forward in place (``nn.Module.compile``).

    In place, not ``torch.compile(runner)``: that wrapper would prefix every state-dict key with
    ``_orig_mod.``; here the runner, its model and heads stay the same modules, so checkpoints are
    the same with or without compile and resume either way.
    """
    problem = compile_problem(device)
    if problem:
        raise ConfigError(f"train.compile: torch.compile cannot build kernels for {device} here ({problem}); "
                          "install a C++ compiler (g++ or clang++) for the CPU, or Triton for CUDA, or set "
                          "compile=false")
    runner.compile()


def restore(run: Run, ckpt: Path) -> None:
    if not (ckpt / "trainer.pt").is_file():
        raise ConfigError(f"{ckpt}: no trainer.pt, so there is no optimiser state to resume (an imported "
                          "checkpoint?); start a new run from it with `pretrain --init-from` instead")
    load_into(run.model, load_model_state(ckpt, run.device), ckpt)
    load_into(run.objectives, load_objective_state(ckpt, run.device), ckpt)
    state = load_trainer_state(ckpt, map_location=run.device)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.start = int(state["step"])
    run.skipped_total, run.bad_streak = int(state.get("skipped_steps", 0)), int(state.get("bad_streak", 0))
