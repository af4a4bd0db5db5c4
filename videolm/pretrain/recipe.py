"""Pretraining recipes: frozen configs for data, model, optimisation and objective stages.

A recipe YAML (``pipelines/*.yaml``) has four parts::

    data:   {mode: segment, max_frames: 32, ...}          # data.DataConfig
    model:  {hidden: 384, text_init: default, ...}        # model.ModelConfig
    train:  {batch_size: 32, lr: 1e-4, max_steps: 1000}  # TrainConfig
    select: {every: 100, metric: retrieval_r1, patience: 3}  # SelectConfig (optional)
    stages:                                               # or, for one stage, top-level
      - name: stage1                                      # `mixing:` and `objectives:`
        fraction: 0.5      # share of max_steps
        mixing: sum        # sum: every objective each step, losses weighted
                           # sample: one objective per step, drawn with `ratio`
        objectives:
          joint: {weight: 1.0}
          mlm: {weight: 1.0, ratio: 2, mask_prob: 0.15}   # other keys: the objective's options

Command-line overrides are ``key=value`` (values parsed as YAML): a field name
that exists in exactly one of data/model/train (``lr=1e-4``), a dotted field
(``model.hidden=256``), ``mixing=sample`` (every stage), or ``<objective>.<key>``
(``mlm.weight=2``, ``joint.loss=milnce``) for every stage using that objective.
An unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..config import from_dict
from .dataset import DataConfig
from ..model.video_text import ModelConfig
from .objectives import OBJECTIVES, check_architecture

MIXING = ("sum", "sample")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # per process
    lr: float = 1e-4
    text_lr_scale: float = 1.0  # lr multiplier for the (pretrained) text encoder
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "linear"  # decay after warmup: linear | cosine | constant
    max_steps: int = 1000
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on CUDA, with loss scaling)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    seed: int = 0
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 2  # DataLoader processes reading shards
    threads: int = 0  # torch CPU threads in each training process; 0 keeps torch's default (all cores)
    split: str = "train"
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss or gradient (skipped) before the run stops
    init_from: str = ""  # run or checkpoint directory whose model (and matching heads) a new run starts from
    compile: bool = False  # torch.compile (inductor) the model and objectives; the first steps compile

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "max_steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.num_workers < 0 or self.grad_clip < 0 or self.threads < 0:
            raise ConfigError("lr must be > 0; warmup_steps, num_workers, threads and grad_clip >= 0")


SELECT_METRICS = ("retrieval_r1", "cider", "moment_r1")


@dataclass(frozen=True)
class SelectConfig:
    """Model selection on a held-out split (``videolm finetune``; docs/finetuning.md).

    Every ``every`` steps (0: never) the model is scored on ``val_split`` with
    ``metric``; the best checkpoint so far is kept in ``<run>/best``, and the run
    stops after ``patience`` scorings without a gain (0: never stops early).
    """

    every: int = 0
    metric: str = "retrieval_r1"  # retrieval_r1: text-to-video R@1 | cider | moment_r1 (VCMR R@1, IoU 0.5)
    val_split: str = "val"
    patience: int = 0
    query_mode: str = "caption"  # retrieval_r1: one query per caption, or per video (all captions joined)
    max_videos: int = 0  # score on the first N videos of the split only; 0: all

    def __post_init__(self):
        if self.metric not in SELECT_METRICS:
            raise ConfigError(f"select.metric must be one of {', '.join(SELECT_METRICS)}, got {self.metric!r}")
        if self.every < 0 or self.patience < 0 or self.max_videos < 0:
            raise ConfigError("select.every, select.patience and select.max_videos must be >= 0")
        if self.query_mode not in ("caption", "video"):
            raise ConfigError(f"select.query_mode must be caption or video, got {self.query_mode!r}")


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    weight: float = 1.0  # multiplies the objective's losses (both mixing modes)
    ratio: float = 1.0  # relative chance of being drawn with mixing: sample
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    name: str = "main"
    fraction: float = 1.0
    mixing: str = "sum"
    objectives: tuple[ObjectiveSpec, ...] = ()

    def __post_init__(self):
        if self.mixing not in MIXING:
            raise ConfigError(f"stage {self.name}: mixing must be one of {MIXING}, got {self.mixing!r}")
        if not self.objectives:
            raise ConfigError(f"stage {self.name}: no objectives")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"stage {self.name}: fraction must be in (0, 1]")
        if not self.active:
            knob = "weight" if self.mixing == "sum" else "ratio"
            raise ConfigError(f"stage {self.name}: every objective has {knob} 0; nothing to train")

    @property
    def active(self) -> tuple[ObjectiveSpec, ...]:
        """The objectives that run: weight > 0 (``sum``) or ratio > 0 (``sample``); 0 switches one off."""
        knob = "weight" if self.mixing == "sum" else "ratio"
        return tuple(o for o in self.objectives if getattr(o, knob) > 0)


@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    stages: tuple[StageSpec, ...] = ()
    select: SelectConfig = SelectConfig()

    def __post_init__(self):
        check_architecture(self.objective_names, self.model.architecture)

    def stage_at(self, step: int) -> StageSpec:
        """The stage that owns optimizer step ``step`` (stages split max_steps by fraction)."""
        edge = 0.0
        for stage in self.stages:
            edge += stage.fraction * self.train.max_steps
            if step < round(edge):
                return stage
        return self.stages[-1]

    @property
    def objective_names(self) -> list[str]:
        """Every objective that runs in some stage (switched-off ones left out)."""
        return sorted({o.name for s in self.stages for o in s.active})


def _objective(name: str, spec) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    spec = dict(spec or {})
    weight, ratio = float(spec.pop("weight", 1.0)), float(spec.pop("ratio", 1.0))
    if weight < 0 or ratio < 0:
        raise ConfigError(f"objective {name}: weight and ratio must be >= 0")
    params = inspect.signature(OBJECTIVES[name]).parameters
    accepted = set(params) - {"model", "vocab"}
    unknown = set(spec) - accepted
    if unknown:
        raise ConfigError(f"objective {name}: unknown option(s) {', '.join(sorted(unknown))}; "
                          f"known: weight, ratio, {', '.join(sorted(accepted))}")
    for key, value in spec.items():  # numbers given as text (YAML reads 1e-1 as a string) take the default's type
        default = params[key].default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            try:
                spec[key] = type(default)(float(value))
            except ValueError:
                raise ConfigError(f"objective {name}: option {key} must be a number, got {value!r}") from None
    return ObjectiveSpec(name, weight, ratio, spec)


def _stage(data: dict) -> StageSpec:
    data = dict(data)
    objectives = data.pop("objectives", None)
    if not isinstance(objectives, dict):
        raise ConfigError("a stage needs `objectives:` as a mapping of name -> {weight, ratio, options}")
    unknown = set(data) - {"name", "fraction", "mixing"}
    if unknown:
        raise ConfigError(f"stage: unknown key(s) {', '.join(sorted(unknown))}")
    return StageSpec(objectives=tuple(_objective(n, s) for n, s in objectives.items()), **data)


def recipe_from_dict(raw: dict) -> PretrainConfig:
    raw = dict(raw or {})
    unknown = set(raw) - {"data", "model", "train", "select", "stages", "objectives", "mixing"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(sorted(unknown))}; "
                          "expected data, model, train, select and stages (or objectives + mixing)")
    if "stages" in raw and ("objectives" in raw or "mixing" in raw):
        raise ConfigError("give either `stages:` or top-level `objectives:`/`mixing:`, not both")
    stages_raw = raw.get("stages") or [{"objectives": raw.get("objectives"), "mixing": raw.get("mixing", "sum")}]
    stages = tuple(_stage({"name": f"stage{i + 1}" if len(stages_raw) > 1 else "main", **s})
                   for i, s in enumerate(stages_raw))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, got {names}")
    total = sum(s.fraction for s in stages)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"stage fractions add up to {total:g}, not 1")
    return PretrainConfig(
        data=from_dict(DataConfig, raw.get("data") or {}),
        model=from_dict(ModelConfig, raw.get("model") or {}),
        train=from_dict(TrainConfig, raw.get("train") or {}),
        stages=stages,
        select=from_dict(SelectConfig, raw.get("select") or {}),
    )


def recipe_to_dict(cfg: PretrainConfig) -> dict:
    return {
        "data": dataclasses.asdict(cfg.data),
        "model": dataclasses.asdict(cfg.model),
        "train": dataclasses.asdict(cfg.train),
        "select": dataclasses.asdict(cfg.select),
        "stages": [{"name": s.name, "fraction": s.fraction, "mixing": s.mixing,
                    "objectives": {o.name: {"weight": o.weight, "ratio": o.ratio, **o.options} for o in s.objectives}}
                   for s in cfg.stages],
    }


def load_recipe(path: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    try:
        return apply_overrides(recipe_from_dict(raw), overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_recipe(cfg: PretrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(cfg), sort_keys=False), encoding="utf-8")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "select": SelectConfig}


def apply_overrides(cfg: PretrainConfig, overrides: list[str]) -> PretrainConfig:
    raw = recipe_to_dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        parts = key.split(".")
        if len(parts) == 1 and key == "mixing":
            for s in raw["stages"]:
                s["mixing"] = value
        elif len(parts) == 1:
            owners = [sec for sec, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
            if not owners:
                known = sorted({f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)})
                raise ConfigError(f"unknown override key {key!r}; known: {', '.join(known)}, "
                                  "mixing, <section>.<field>, <objective>.<option>")
            if len(owners) > 1:  # e.g. max_frames: the data crop and the model's position table
                raise ConfigError(f"override {key!r} is ambiguous; write "
                                  + " or ".join(f"{o}.{key}" for o in owners))
            raw[owners[0]][key] = value
        elif len(parts) == 2 and parts[0] in SECTIONS:
            if parts[1] not in {f.name for f in dataclasses.fields(SECTIONS[parts[0]])}:
                raise ConfigError(f"unknown override key {key!r}: {parts[0]} has no field {parts[1]!r}")
            raw[parts[0]][parts[1]] = value
        elif len(parts) == 2 and parts[0] in OBJECTIVES:
            hits = [s["objectives"][parts[0]] for s in raw["stages"] if parts[0] in s["objectives"]]
            if not hits:
                raise ConfigError(f"override {key!r}: no stage of this recipe uses objective {parts[0]!r}")
            for h in hits:
                h[parts[1]] = value
        else:
            raise ConfigError(f"unknown override key {key!r}")
    return recipe_from_dict(raw)
