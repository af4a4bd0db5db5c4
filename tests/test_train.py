"""Trainer: recipes, overrides, resume equality, data-parallel with gloo, and bad-input messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from videolm.cli import main
from videolm.errors import ConfigError
from videolm.pretrain.dataset import DataError
from videolm.features.layout import shard_name
from videolm.features.shards import ShardWriter
from videolm.manifests.manifest import Caption, VideoEntry, write_manifest
from videolm.pretrain.recipe import apply_overrides, load_recipe, recipe_from_dict
from videolm.pretrain.run import PlannedBatches, lr_factor
from videolm.pretrain.trainer import run_pretrain
from videolm.pretrain.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "left", "right", "up", "down", "seven", "two", "moves"]

# A model small enough that a few steps take well under a second on CPU.
TINY_MODEL = {"hidden": 32, "heads": 2, "text_init": "none", "text_layers": 1, "video_layers": 1,
              "cross_layers": 1, "temporal_layers": 1, "decoder_layers": 1, "max_frames": 16,
              "max_text_len": 32, "embed_dim": 16, "dropout": 0.1}
TINY_OVERRIDES = [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "data.max_frames=16", "batch_size=4", "num_workers=0", "log_every=1", "warmup_steps=2", "device=cpu", "threads=1"]


def write_data(root: Path, n_videos=16, dim=8, quantize=True, seed=0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    features = root / "features"
    features.mkdir(parents=True)
    cfg = json.dumps({"encoder": "pixels", "sampling": {}})
    entries = []
    for s in range(2):
        w = ShardWriter(features / shard_name(s), dim, {"encoder": "pixels", "config": cfg})
        for i in range(s * n_videos // 2, (s + 1) * n_videos // 2):
            n = int(rng.integers(6, 14))
            w.add_video(f"v{i:03d}", rng.normal(size=(n, dim)).astype(np.float32),
                        np.arange(n, dtype=float), np.arange(n) + 1.0, float(n))
            cuts = sorted(rng.choice(np.arange(1, n), 2, replace=False))
            bounds = [0, *cuts, n]
            caps = tuple(Caption(float(a), float(b), " ".join(rng.choice(WORDS, 4)))
                         for a, b in zip(bounds[:-1], bounds[1:]))
            entries.append(VideoEntry(f"v{i:03d}", f"v{i:03d}.mp4", "train", float(n), caps))
        w.finish()
    manifest = write_manifest(entries, root / "manifest.jsonl")
    if quantize:
        from videolm.quantize.kmeans import QuantizeConfig
        from videolm.quantize.job import run_quantize

        run_quantize(features, QuantizeConfig(k=4, levels=1, sample=1000), progress=False)
    return features, manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("train_data"))


def tiny(objectives, mixing="sum", extra=(), stages=None, architecture="two_stream"):
    # the architecture goes in before the recipe is read: objectives are checked against it then
    raw = {"data": {"mode": "video"}, "train": {"max_steps": 4, "checkpoint_every": 2},
           "model": {"architecture": architecture}}
    if stages:
        raw["stages"] = stages
    else:
        raw["objectives"], raw["mixing"] = objectives, mixing
    return apply_overrides(recipe_from_dict(raw), TINY_OVERRIDES + list(extra))


def losses(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.endswith("_loss") or k in ("step", "loss", "lr")}
            for r in read_metrics(run / "metrics.jsonl")]


def test_lr_schedules():
    assert lr_factor(0, 4, 20, "linear") == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, "linear") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(19, 4, 20, "constant") == 1.0
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0)


def test_planned_batches_split_ranks_and_restart_anywhere():
    one = PlannedBatches(20, 3, world=2, rank=0, seed=1)
    two = PlannedBatches(20, 3, world=2, rank=1, seed=1)
    assert one.per_epoch == 3
    for i in range(7):
        a, b = one.batch(i), two.batch(i)
        assert not {k for k, _ in a} & {k for k, _ in b}  # ranks never share an example in a step
        assert a[0][1] == i // 3  # epoch
    it = iter(PlannedBatches(20, 3, world=2, rank=0, seed=1, start=4))
    assert next(it) == one.batch(4)
    with pytest.raises(Exception, match="fewer than one global batch"):
        PlannedBatches(5, 3, world=2, rank=0, seed=1)


def test_every_recipe_loads_and_runs_two_steps(data, tmp_path):
    features, manifest = data
    for recipe in sorted((ROOT / "pipelines").glob("*.yaml")):
        if recipe.name.startswith("extract_"):
            continue
        over = [o for o in TINY_OVERRIDES if not o.startswith("data.max_frames")] + [
            "data.max_frames=16", "max_steps=2", "checkpoint_every=1", "model.max_text_len=32"]
        cfg = load_recipe(recipe, over)
        summary = run_pretrain(cfg, features, manifest, tmp_path / recipe.stem, progress=False)
        assert summary["steps"] == 2, recipe.name
        records = read_metrics(tmp_path / recipe.stem / "metrics.jsonl")
        assert all(np.isfinite(r["loss"]) for r in records), recipe.name


def test_run_writes_checkpoints_metrics_and_plots(data, tmp_path):
    features, manifest = data
    cfg = tiny({"joint": {}, "mlm": {}, "fom": {}, "vsm": {}}, extra=["keep_checkpoints=1"], architecture="hierarchical")
    run = tmp_path / "run"
    summary = run_pretrain(cfg, features, manifest, run, progress=False)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_0000004"]  # keep_checkpoints=1 pruned step 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    for name in ("model.safetensors", "objectives.safetensors", "trainer.pt", "features.json", "config.yaml",
                 "meta.json", "tokenizer/tokenizer.json"):
        assert (ckpts[0] / name).exists(), name
    assert [p.name for p in ckpts[0].glob("*.pt")] == ["trainer.pt"]  # weights are safetensors, not pickles
    saved = load_recipe(ckpts[0] / "config.yaml")
    assert saved.model.feature_dim == 8 and saved.model.visual_vocab == 4 + 5  # resolved from shards/codebook
    rec = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    assert {"joint_loss", "mlm_loss", "fom_loss", "vsm_loss", "lr", "examples_per_s"} <= set(rec[0])
    assert "mlm_loss" in (run / "metrics.csv").read_text().splitlines()[0]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss_curves.png").stat().st_size > 1000
    assert json.loads((run / "train_summary.json").read_text())["checkpoint"] == str(ckpts[0])
    assert summary["examples"] == 16


def test_load_pretrained_restores_the_trained_model(data, tmp_path):
    import torch
    from safetensors.torch import load_file

    from videolm.pretrain.checkpoint import load_pretrained

    features, manifest = data
    run = tmp_path / "run"
    run_pretrain(tiny({"joint": {}}, extra=["max_steps=2"]), features, manifest, run, progress=False)
    model, tokenizer, cfg = load_pretrained(run)
    saved = load_file(run / "checkpoints" / "step_0000002" / "model.safetensors")
    assert not model.training and cfg.model.feature_dim == 8 and tokenizer.vocab_size == model.word_embeddings.shape[0]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_resume_after_interrupt_gives_the_same_losses(data, tmp_path, monkeypatch):
    """Stop after the step-3 checkpoint (as Ctrl-C would), resume, and compare with an uninterrupted run."""
    import videolm.pretrain.trainer as train

    features, manifest = data
    # sampled tasks, dropout, masks and shuffles all draw random numbers: all must replay identically
    cfg = tiny({"mlm": {"ratio": 2}, "mfm_nce": {}, "fom": {}, "vsm": {}, "joint": {}}, mixing="sample",
               extra=["max_steps=6", "checkpoint_every=3", "num_workers=1"], architecture="hierarchical")
    full = tmp_path / "full"
    run_pretrain(cfg, features, manifest, full, progress=False)

    real_save = train.save_checkpoint

    def save_then_interrupt(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt
        return path

    part = tmp_path / "part"
    monkeypatch.setattr(train, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, features, manifest, part, progress=False)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert (part / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    with pytest.raises(ConfigError, match="--resume"):
        run_pretrain(cfg, features, manifest, part, progress=False)
    summary = run_pretrain(cfg, features, manifest, part, resume=True, progress=False)
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    a, b = losses(full), losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert len({k for r in a for k in r if k.endswith("_loss")}) >= 3  # several tasks were drawn
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)


def test_resume_refuses_a_changed_recipe_but_allows_more_steps(data, tmp_path):
    features, manifest = data
    cfg = tiny({"joint": {}})
    run = tmp_path / "run"
    run_pretrain(cfg, features, manifest, run, progress=False)
    with pytest.raises(ConfigError, match="train.lr"):
        run_pretrain(apply_overrides(cfg, ["lr=0.5"]), features, manifest, run, resume=True, progress=False)
    summary = run_pretrain(apply_overrides(cfg, ["max_steps=5"]), features, manifest, run, resume=True, progress=False)
    assert summary["resumed_from"] == 4 and summary["steps"] == 5


def test_two_stages_and_grad_accumulation(data, tmp_path):
    features, manifest = data
    stages = [{"name": "s1", "fraction": 0.5, "objectives": {"joint": {}}},
              {"name": "s2", "fraction": 0.5, "objectives": {"joint": {}, "caption": {}, "align": {}}}]
    cfg = tiny(None, stages=stages, extra=["grad_accum=2"])
    run_pretrain(cfg, features, manifest, tmp_path / "run", progress=False)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [("caption_loss" in r) for r in rec] == [False, False, True, True]
    assert [r["stage"] for r in rec] == [0, 0, 1, 1]


def test_stages_keep_their_own_weights_and_options(data, tmp_path):
    features, manifest = data
    stages = [{"fraction": 0.5, "objectives": {"joint": {"weight": 1.0, "loss": "infonce"}}},
              {"fraction": 0.5, "objectives": {"joint": {"weight": 0.25, "loss": "milnce"}}}]
    cfg = tiny(None, stages=stages, extra=["joint.gather=false"])
    assert [s.name for s in cfg.stages] == ["stage1", "stage2"]
    run_pretrain(cfg, features, manifest, tmp_path / "run", progress=False)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["loss"] == pytest.approx(r["joint_loss"], rel=1e-5) for r in rec[:2])  # weight per stage
    assert all(r["loss"] == pytest.approx(0.25 * r["joint_loss"], rel=1e-5) for r in rec[2:])
    assert rec[0]["joint_candidates"] == 4 and rec[2]["joint_candidates"] > 4  # infonce: videos; milnce: clips
    with pytest.raises(ConfigError, match="every objective has weight 0"):
        tiny(None, stages=[{"objectives": {"joint": {"weight": 0.0}}}])
    with pytest.raises(ConfigError, match="stage names must be unique"):
        recipe_from_dict({"stages": [{"name": "a", "fraction": 0.5, "objectives": {"joint": {}}},
                                     {"name": "a", "fraction": 0.5, "objectives": {"joint": {}}}]})


def test_objective_options_given_as_text_become_numbers():
    cfg = tiny({"mlm": {"mask_prob": "1e-1"}}, extra=["mlm.mask_prob=2e-1"])
    assert cfg.stages[0].objectives[0].options == {"mask_prob": 0.2}
    with pytest.raises(ConfigError, match="mask_prob must be a number"):
        tiny({"mlm": {"mask_prob": "lots"}})


def test_resume_on_features_of_another_size_is_refused(data, tmp_path):
    features, manifest = data
    run = tmp_path / "run"
    run_pretrain(tiny({"joint": {}}, extra=["max_steps=1"]), features, manifest, run, progress=False)
    other, other_manifest = write_data(tmp_path / "wide", dim=12, quantize=False)
    with pytest.raises(ConfigError, match="expects 8-d clip features but the shards hold 12-d"):
        run_pretrain(tiny({"joint": {}}, extra=["max_steps=2"]), other, other_manifest, run, resume=True,
                     progress=False)


def test_bf16_autocast_runs_every_objective(data, tmp_path):
    """Autocast hands back bf16 from matmuls; objectives must not mix that with float32-only constants."""
    features, manifest = data
    from videolm.model.video_text import ARCHITECTURES
    from videolm.pretrain.objectives import OBJECTIVES

    for arch in ARCHITECTURES:  # every objective, on every architecture it runs on
        every = {name: {} for name, cls in OBJECTIVES.items() if arch in cls.architectures}
        cfg = tiny(every, extra=["precision=bf16", "max_steps=1"], architecture=arch)
        run_pretrain(cfg, features, manifest, tmp_path / arch, progress=False)
        (record,) = read_metrics(tmp_path / arch / "metrics.jsonl")
        assert all(np.isfinite(record[f"{name}_loss"]) for name in every), (arch, record)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        run_pretrain(apply_overrides(cfg, ["precision=fp16"]), features, manifest, tmp_path / "fp16", progress=False)


def test_bad_inputs_have_clear_messages(data, tmp_path, caplog):
    features, manifest = data
    with pytest.raises(ConfigError, match="expects 16-d clip features but the shards hold 8-d"):
        run_pretrain(tiny({"joint": {}}, extra=["model.feature_dim=16"]), features, manifest, tmp_path / "a",
                     progress=False)
    plain, plain_manifest = write_data(tmp_path / "plain", quantize=False)
    with pytest.raises(ConfigError, match="'mvm' needs visual words.*videolm quantize"):
        run_pretrain(tiny({"mvm": {}}), plain, plain_manifest, tmp_path / "b", progress=False)
    # a manifest naming videos that have no features: skipped with a count, an error only if none match
    extra = [VideoEntry(f"gone{i}", "x.mp4", "train", 5.0, (Caption(0, 2, "red"),)) for i in range(3)]
    from videolm.manifests.manifest import load_manifest

    mixed = write_manifest(load_manifest(manifest) + extra, tmp_path / "mixed.jsonl")
    summary = run_pretrain(tiny({"joint": {}}, extra=["max_steps=1"]), features, mixed, tmp_path / "c",
                           progress=False)
    assert summary["videos_missing_features"] == 3 and "3 of 19 manifest videos have no features" in caplog.text
    with pytest.raises(DataError, match="none of the 3 manifest videos"):
        run_pretrain(tiny({"joint": {}}), features, write_manifest(extra, tmp_path / "gone.jsonl"), tmp_path / "d",
                     progress=False)


def test_cli_overrides_and_errors(data, tmp_path, capsys):
    features, manifest = data
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {mode: video}\nobjectives:\n  joint: {}\n")
    args = ["pretrain", "--config", str(recipe), "--features", str(features), "--manifest", str(manifest),
            "--quiet", "--out", str(tmp_path / "run")]
    assert main(args + ["bogus_key=1"]) == 2
    assert "unknown override key 'bogus_key'" in capsys.readouterr().err
    assert main(args + TINY_OVERRIDES + ["max_steps=2", "lr=3e-4"]) == 0
    assert load_recipe(tmp_path / "run" / "config.yaml").train.lr == pytest.approx(3e-4)
    assert "2 steps" in capsys.readouterr().out
    assert main(args + TINY_OVERRIDES) == 2  # the run exists and --resume was not given
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_gloo(data, tmp_path):
    """Two CPU processes: gradients are averaged by DDP and joint gathers negatives from both ranks."""
    features, manifest = data
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {mode: video}\nmixing: sum\nobjectives:\n  joint: {}\n  mlm: {}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "videolm.cli", "pretrain", "--config", str(recipe), "--features", str(features),
           "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--quiet",
           *TINY_OVERRIDES, "max_steps=3", "checkpoint_every=10"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rec] == [1, 2, 3]
    assert all(r["joint_candidates"] == 8 for r in rec)  # 4 per rank x 2 ranks
    assert all(np.isfinite(r["loss"]) for r in rec)


def _ddp_joint_grads(rank, world, init_file, out_file):
    """One rank of a 2-process gloo group: DDP gradient of the joint loss on this rank's half batch."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, objective, batch = _joint_setup()
        half = _slice_batch(batch, rank * 3, rank * 3 + 3)
        # as in train.py: heads of other objectives get no gradient from joint
        runner = torch.nn.parallel.DistributedDataParallel(_runner(model, objective), find_unused_parameters=True)
        runner(half, ["joint"], torch.Generator().manual_seed(0))["joint"]["joint_loss"].backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_file)
        dist.barrier()  # gloo can abort a rank that tears down while its peer is still mid-collective
    finally:
        dist.destroy_process_group()


def _joint_setup():
    import torch

    from videolm.pretrain.collate import Collator
    from videolm.model.video_text import ModelConfig, build_model
    from videolm.pretrain.objectives import JointContrastive, TextVocab
    from videolm.model.text import load_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = load_tokenizer(None)
    cfg = ModelConfig(**{**TINY_MODEL, "dropout": 0.0, "feature_dim": 8})
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    examples = [{"video_id": f"v{i % 5}", "features": rng.normal(size=(4 + i, 8)).astype(np.float32), "tokens": None,
                 "texts": [" ".join(rng.choice(WORDS, 3))], "text_spans": np.array([[0, 3]])}
                for i in range(6)]  # v0 twice: a blocked pair across ranks
    return model, JointContrastive(model, TextVocab.from_tokenizer(tok)), Collator(tok)(examples)


def _slice_batch(batch, a, b):
    import torch

    out = {k: (v[a:b] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    T = int(out["video_mask"].sum(1).max())  # each rank pads to its own longest video, as collate would
    for k in ("video", "video_mask"):
        out[k] = out[k][:, :T]
    return out


def _runner(model, objective):
    import torch.nn as nn

    from videolm.pretrain.run import ObjectiveRunner

    return ObjectiveRunner(model, nn.ModuleDict({"joint": objective}))


@pytest.mark.slow
def test_gathered_negatives_give_the_full_batch_gradient(tmp_path):
    """joint over 2 ranks x 3 examples with gathered negatives == joint over 6 examples in one process."""
    import torch
    import torch.multiprocessing as mp

    out_file = tmp_path / "grads.pt"
    mp.spawn(_ddp_joint_grads, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    ddp = torch.load(out_file)
    model, objective, batch = _joint_setup()
    _runner(model, objective)(batch, ["joint"], torch.Generator().manual_seed(0))["joint"]["joint_loss"].backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ddp.keys() == single.keys() and "joint.logit_scale" in single
    for name in single:
        # float32 sums in another order: |diff| stays ~1e-7 of the largest gradient (a missing gather is O(1))
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=2e-5, msg=name)


def test_weight_zero_switches_an_objective_off(data, tmp_path):
    features, manifest = data
    cfg = tiny({"joint": {"weight": 1.0}, "mlm": {"weight": 1.0}}, extra=["mlm.weight=0", "max_steps=2"])
    run_pretrain(cfg, features, manifest, tmp_path / "run", progress=False)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("joint_loss" in r and "mlm_loss" not in r for r in rec)


# ---------------------------------------------------------------------------------------------- what is built


def _unused_after_each_stage(run) -> list[set[str]]:
    """Parameter names without a gradient after one step of each stage (every draw, with mixing: sample)."""
    import torch

    from videolm.model.inputs import batch_to
    from videolm.pretrain.run import task_key

    batch = batch_to(next(iter(run.make_loader(0))), "cpu")
    unused = []
    for si, stage in enumerate(run.cfg.stages):
        draws = [[o.name] for o in stage.active] if stage.mixing == "sample" else [[o.name for o in stage.active]]
        for names in draws:
            run.runner.zero_grad(set_to_none=True)
            out = run.runner(batch, [task_key(si, n) for n in names], torch.Generator().manual_seed(0))
            sum(v for d in out.values() for k, v in d.items() if k.endswith("_loss")).backward()
            unused.append({n for n, p in run.runner.named_parameters() if p.grad is None})
    return unused


RECIPES_BY_NEED = [  # (objectives, mixing, stages, architecture): each is built, stepped and checked
    ({"joint": {}}, "sum", None, "two_stream"),
    ({"joint": {}, "mlm": {}, "mfm_nce": {}, "align": {}, "caption": {}}, "sum", None, "two_stream"),
    ({"joint": {}, "mfm_reg": {}, "mvm": {}}, "sum", None, "two_stream"),
    ({"mlm": {}, "align": {}}, "sum", None, "two_stream"),
    ({"joint": {}, "mlm": {"weight": 0}}, "sum", None, "two_stream"),
    ({"joint": {}, "mlm": {}}, "sample", None, "two_stream"),
    (None, None, [{"fraction": 0.5, "objectives": {"joint": {}}},
                  {"fraction": 0.5, "objectives": {"joint": {}, "caption": {}}}], "two_stream"),
    ({"joint": {}, "fom": {}, "vsm": {}, "mfm_reg": {}, "mvm": {}}, "sum", None, "hierarchical"),
    ({"joint": {}, "mlm": {}}, "sum", None, "hierarchical"),
    ({"joint": {}}, "sum", None, "hierarchical"),
    ({"mlm": {}, "mfm_nce": {}, "fom": {}, "vsm": {}}, "sample", None, "hierarchical"),
    ({"mlm": {}, "mvm": {}, "align": {}}, "sum", None, "single_stream"),
    ({"joint": {}, "mlm": {}}, "sum", None, "single_stream"),
    ({"joint": {}}, "sum", None, "single_stream"),
]


@pytest.mark.parametrize("objectives,mixing,stages,architecture", RECIPES_BY_NEED)
def test_only_what_the_objectives_use_is_built_and_ddp_is_told_when_something_rests(data, objectives, mixing,
                                                                                   stages, architecture):
    from videolm.features.shards import FeatureStore
    from videolm.manifests.manifest import load_manifest
    from videolm.pretrain.run import build_run, leaves_parameters_unused

    features, manifest = data
    cfg = tiny(objectives, mixing or "sum", stages=stages, architecture=architecture)
    run = build_run(cfg, FeatureStore(features), load_manifest(manifest, "train"), "cpu")
    unused = _unused_after_each_stage(run)
    # A parameter no step of the recipe ever trains must not exist at all, except the joint
    # space (kept so that any checkpoint can be scored on retrieval).
    joint_space = {"model.joint.text_proj.weight", "model.joint.text_proj.bias", "model.joint.video_proj.weight",
                   "model.joint.video_proj.bias", "model.joint.logit_scale"}
    never_used = set.intersection(*unused)
    assert never_used == (set() if "joint" in run.cfg.objective_names else joint_space), never_used
    # DDP's find_unused_parameters exactly when some step leaves something without a gradient.
    assert leaves_parameters_unused(run.cfg) == any(unused), unused
    names = set(run.cfg.objective_names)  # switched-off objectives (weight 0) are not built
    with_heads = {n.split(".")[0].split(":")[1] for n, _ in run.objectives.named_parameters()}  # "0:mlm.bias"
    assert with_heads == names & {"mlm", "mvm", "mfm_nce", "mfm_reg", "fom", "vsm"}
    if architecture == "two_stream":
        assert ("cross" in run.model.parts) == bool(names - {"joint"})


def test_checkpoints_of_the_old_layout_fail_with_a_clear_error(data, tmp_path):
    """Before 0.2 the heads sat in the model's weights and there were no separate objective heads: say so."""
    import torch
    from safetensors.torch import load_file, save_file

    from videolm.pretrain.checkpoint import load_pretrained

    features, manifest = data
    cfg = tiny({"joint": {}, "mlm": {}}, extra=["max_steps=2"])
    run_pretrain(cfg, features, manifest, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    heads = load_file(ckpt / "objectives.safetensors")
    assert {k.split(".")[0] for k in heads} == {"0:mlm"}  # joint has no parameters of its own
    state = load_file(ckpt / "model.safetensors")
    assert not any(k.startswith(("mlm", "mvm", "mfm", "fom", "vsm")) for k in state)
    save_file({**state, "mlm_transform.0.weight": torch.zeros(32, 32)}, ckpt / "model.safetensors")  # as 0.1 had it
    with pytest.raises(ConfigError, match="do not fit the model.*before videolm 0.3"):
        load_pretrained(tmp_path / "run")
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model.parts: \('cross',\) -> \('cross', 'decoder'\)"):
        run_pretrain(apply_overrides(cfg, ["max_steps=3", "model.parts=[decoder]"]), features, manifest,
                     tmp_path / "run", resume=True, progress=False)
    (ckpt / "objectives.safetensors").unlink()
    with pytest.raises(ConfigError, match="no objectives.safetensors"):
        run_pretrain(apply_overrides(cfg, ["max_steps=3"]), features, manifest, tmp_path / "run", resume=True,
                     progress=False)


def test_init_from_starts_a_new_run_from_another_runs_weights(data, tmp_path, caplog):
    import torch

    from videolm.features.shards import FeatureStore
    from videolm.manifests.manifest import load_manifest
    from videolm.pretrain.checkpoint import latest_checkpoint, load_model_state
    from videolm.pretrain.run import build_run

    features, manifest = data
    run_pretrain(tiny({"joint": {}, "mlm": {}}, extra=["max_steps=2"]), features, manifest, tmp_path / "a",
                 progress=False)
    first = load_model_state(latest_checkpoint(tmp_path / "a"))
    # a recipe that also needs the decoder, and asks for other model sizes (set aside, with a warning)
    cfg = tiny({"joint": {}, "mlm": {}, "caption": {}},
               extra=[f"train.init_from={tmp_path / 'a'}", "model.video_layers=3"])
    with caplog.at_level("INFO", logger="videolm.pretrain.run"):
        run = build_run(cfg, FeatureStore(features), load_manifest(manifest, "train"), "cpu")
    assert run.start == 0 and run.cfg.model.video_layers == 1  # the checkpoint's model, from step 0
    own = run.model.state_dict()
    for k, v in first.items():
        assert torch.equal(own[k], v), k
    assert "recipe's model settings are set aside" in caplog.text and "video_layers: 3 -> 1" in caplog.text
    assert "fresh (not in it): caption_bias" in caplog.text  # the decoder the first run never had
    assert not run.optimizer.state  # a fresh optimiser
    with pytest.raises(ConfigError, match="no checkpoint there"):
        build_run(tiny({"joint": {}}, extra=[f"train.init_from={tmp_path / 'nothing'}"]), FeatureStore(features),
                  load_manifest(manifest, "train"), "cpu")


def test_a_step_reads_the_device_once_and_a_log_window_once(data, monkeypatch):
    """Logged values stay on the device: one read per step (loss finite? gradient norm) in the trainer,
    none per logged value in the objectives, one for a whole window of records."""
    import traceback

    import torch

    from videolm.features.shards import FeatureStore
    from videolm.manifests.manifest import load_manifest
    from videolm.pretrain import trainer
    from videolm.pretrain.run import build_run

    features, manifest = data
    objectives = {"joint": {}, "mlm": {}, "mfm_nce": {}, "align": {}, "caption": {}}
    run = build_run(tiny(objectives, extra=["grad_accum=2"]), FeatureStore(features),
                    load_manifest(manifest, "train"), "cpu")
    batches = iter(run.make_loader(0))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            reads.append((_name, Path(caller.filename).name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    results = [trainer.train_step(run, step, batches) for step in range(3)]
    ours = [r for r in reads if r[1] in ("trainer.py", "objectives.py", "distributed.py")]
    assert ours == [("tolist", "trainer.py")] * 3, ours  # 3 steps x 2 micro-batches x 5 objectives: 3 reads
    logged = {k for k, v in results[0].values.items() if torch.is_tensor(v)}
    assert {"loss", "mlm_loss", "mlm_acc", "joint_temperature", "align_acc"} <= logged
    reads.clear()
    window = trainer._LogWindow(run, trainer.MetricsLogger(Path("unused"), enabled=False), None, False)
    for step, r in enumerate(results, 1):
        window.values.update({k: window.values[k] + [v] for k, v in r.values.items()})
    numbers = window._numbers()
    assert [r for r in reads if r[1] == "trainer.py"] == [("tolist", "trainer.py")]
    assert len(numbers["loss"]) == 3 and all(isinstance(x, float) for x in numbers["mlm_acc"])


def write_even_data(root: Path, n_videos=8, clips=8, dim=8) -> tuple[Path, Path]:
    """Videos of one length with two 4-word captions each: every batch has the same shapes, so a compiled
    step compiles once (a new shape would compile again, with dynamic sizes: twice the test's time)."""
    rng = np.random.default_rng(0)
    features = root / "features"
    features.mkdir(parents=True)
    w = ShardWriter(features / shard_name(0), dim, {"encoder": "pixels",
                                                    "config": json.dumps({"encoder": "pixels", "sampling": {}})})
    entries = []
    for i in range(n_videos):
        w.add_video(f"v{i}", rng.normal(size=(clips, dim)).astype(np.float32), np.arange(clips, dtype=float),
                    np.arange(clips) + 1.0, float(clips))
        caps = tuple(Caption(float(a), a + clips / 2, " ".join(rng.choice(WORDS, 4))) for a in (0, clips / 2))
        entries.append(VideoEntry(f"v{i}", f"v{i}.mp4", "train", float(clips), caps))
    w.finish()
    return features, write_manifest(entries, root / "manifest.jsonl")


@pytest.mark.slow
def test_compile_gives_the_same_losses_and_checkpoints(tmp_path):
    """train.compile: same losses as eager to 1e-4 (dropout off: inductor draws its own dropout masks), the same
    checkpoint keys, and a compiled run resumes uncompiled. About 30-50 s: inductor builds its kernels."""
    import torch
    from safetensors.torch import load_file

    from videolm.pretrain.run import compile_problem

    problem = compile_problem("cpu")
    if problem:
        pytest.skip(f"torch.compile (inductor) cannot build CPU kernels here: {problem}")
    features, manifest = write_even_data(tmp_path / "data")
    cfg = tiny({"joint": {}}, extra=["data.mode=video", "model.dropout=0", "max_steps=3",
                                                "checkpoint_every=3"])
    runs = {flag: tmp_path / f"compile_{flag}" for flag in ("false", "true")}
    for flag, out in runs.items():
        run_pretrain(apply_overrides(cfg, [f"compile={flag}"]), features, manifest, out, progress=False)
    eager, compiled = losses(runs["false"]), losses(runs["true"])
    assert [r["step"] for r in compiled] == [1, 2, 3] and "joint_loss" in compiled[0]
    for a, b in zip(eager, compiled):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    ckpts = {flag: out / "checkpoints" / "step_0000003" for flag, out in runs.items()}
    assert load_recipe(ckpts["true"] / "config.yaml").train.compile
    for name in ("model.safetensors", "objectives.safetensors"):
        keys = [sorted(load_file(c / name)) for c in ckpts.values()]
        assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1]), name
    for flag, out in runs.items():  # one more step each, uncompiled: the weights agree, so do the losses
        run_pretrain(apply_overrides(cfg, ["compile=false", "max_steps=4"]), features, manifest, out, resume=True,
                     progress=False)
    last = [losses(out)[-1] for out in runs.values()]
    assert last[0]["step"] == last[1]["step"] == 4
    assert last[1]["loss"] == pytest.approx(last[0]["loss"], rel=1e-4)


def test_compile_without_a_working_compiler_stops_with_a_clear_message(tmp_path):
    """No C++ compiler for inductor: `videolm pretrain compile=true` exits 2 with one line, not a traceback."""
    features, manifest = write_even_data(tmp_path / "data", n_videos=4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {mode: video}\nobjectives:\n  joint: {}\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "videolm", "pretrain", "--config", str(recipe), "--features",
                           str(features), "--manifest", str(manifest), "--quiet", "--out", str(tmp_path / "run"),
                           *TINY_OVERRIDES, "compile=true"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.compile: torch.compile cannot build kernels for cpu here" in done.stderr
    assert "no-such-g++" in done.stderr and "Traceback" not in done.stderr
