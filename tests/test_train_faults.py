"""Pretraining under faults: NaN/inf losses and gradients, SIGKILL while checkpoints are written, SIGTERM,
and trainer.pt files that hold more than data. See docs/reliability.md (## Pretraining)."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import videolm.pretrain.run as run_module
from videolm.pretrain.checkpoint import latest_checkpoint, load_pretrained, load_trainer_state
from videolm.errors import TrainError
from videolm.pretrain.recipe import load_recipe
from videolm.pretrain.trainer import run_pretrain
from videolm.pretrain.metrics_log import read_metrics

from test_train import TINY_OVERRIDES, losses, tiny, write_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("fault_data"))


def poison_objectives(monkeypatch, bad_calls, how="nan", seen=None):
    """Make every objective misbehave on the given (0-based) calls; ``seen`` collects the weights at each call."""
    real_build = run_module.build_objective
    calls = [0]

    def build(name, model, vocab, options):
        real = real_build(name, model, vocab, options)

        def objective(model, batch, gen):
            i = calls[0]
            calls[0] += 1
            if seen is not None:
                seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            out = real(model, batch, gen)
            if i in bad_calls:
                if how == "nan":  # the loss itself is NaN (keeps the graph: the gradients are NaN too)
                    out = {k: v * float("nan") if k.endswith("_loss") else v for k, v in out.items()}
                else:  # a finite loss with a NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
                    p = next(model.parameters())
                    out = {k: v + torch.sqrt((p * 0).sum()) if k.endswith("_loss") else v for k, v in out.items()}
            return out

        return Wrapped(real, objective)

    monkeypatch.setattr(run_module, "build_objective", build)


class Wrapped(torch.nn.Module):
    """An objective (its heads stay registered, so checkpoints and the optimiser see them) called through ``fn``."""

    def __init__(self, real, fn):
        super().__init__()
        self.real, self.fn = real, fn

    def forward(self, model, batch, gen, passes=None):  # the real objective runs passes of its own
        return self.fn(model, batch, gen)


def assert_finite_checkpoints(run: Path):
    for d in sorted((run / "checkpoints").glob("step_*")):
        for name, t in load_file(d / "model.safetensors").items():
            assert torch.isfinite(t).all(), (d.name, name)


def test_nan_loss_steps_are_skipped_and_training_goes_on(data, tmp_path, monkeypatch, caplog):
    features, manifest = data
    seen = []
    poison_objectives(monkeypatch, {2, 3}, seen=seen)  # steps 3 and 4
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="videolm.pretrain.trainer"):
        summary = run_pretrain(tiny({"joint": {}}, extra=["max_steps=6", "checkpoint_every=3"]), features, manifest,
                               run, progress=False)
    assert summary["steps"] == 6 and summary["skipped_steps"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3: loss is not finite in joint; step skipped" in w for w in warnings), warnings
    assert any("step 4: loss is not finite in joint" in w and "2 bad step(s) in a row" in w for w in warnings)
    rec = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert [s for s, r in rec.items() if r.get("skipped_steps")] == [3, 4]
    assert rec[3]["skipped_steps"] == 1 and math.isnan(rec[3]["loss"]) and math.isfinite(rec[5]["loss"])
    # seen[i] = weights when step i+1 starts: steps 3 and 4 changed nothing, steps 2 and 5 did
    for k in seen[2]:
        assert torch.equal(seen[2][k], seen[3][k]) and torch.equal(seen[3][k], seen[4][k]), k
    assert any(not torch.equal(seen[1][k], seen[2][k]) for k in seen[1])
    assert any(not torch.equal(seen[4][k], seen[5][k]) for k in seen[4])
    assert_finite_checkpoints(run)


def test_non_finite_gradient_with_finite_loss_is_a_bad_step(data, tmp_path, monkeypatch, caplog):
    features, manifest = data
    poison_objectives(monkeypatch, {1}, how="grad")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="videolm.pretrain.trainer"):
        summary = run_pretrain(tiny({"joint": {}}, extra=["grad_clip=0"]), features, manifest, run, progress=False)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    assert any("step 2: gradient norm is nan with a finite loss" in r.getMessage() for r in caplog.records)
    rec = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert rec[2]["skipped_steps"] == 1 and math.isfinite(rec[2]["loss"])
    assert_finite_checkpoints(run)


def test_consecutive_bad_steps_stop_the_run(data, tmp_path, monkeypatch):
    features, manifest = data
    poison_objectives(monkeypatch, set(range(1, 100)))
    run = tmp_path / "run"
    cfg = tiny({"joint": {}}, extra=["max_steps=10", "max_bad_steps=3"])
    with pytest.raises(TrainError, match=r"steps 2-4: 3 consecutive steps with a non-finite loss.*max_bad_steps=3"):
        run_pretrain(cfg, features, manifest, run, progress=False)
    rec = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rec if r.get("skipped_steps")] == [2, 3, 4]
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_0000002"]  # step 2: skipped, finite
    assert_finite_checkpoints(run)
    with pytest.raises(Exception, match="max_bad_steps must be >= 1"):
        tiny({"joint": {}}, extra=["max_bad_steps=0"])


def corrupt_weights_after(monkeypatch, at_call):
    """The optimizer writes NaN into the weights on its ``at_call``-th step (a diverging run)."""
    real = run_module.build_optimizer

    def build(model, text, cfg):
        opt = real(model, text, cfg)
        calls = [0]

        def poison(optimizer, args, kwargs):
            calls[0] += 1
            if calls[0] == at_call:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

        opt.register_step_post_hook(poison)
        return opt

    monkeypatch.setattr(run_module, "build_optimizer", build)


def test_no_checkpoint_is_written_from_nan_weights(data, tmp_path, monkeypatch, capsys):
    features, manifest = data
    corrupt_weights_after(monkeypatch, 3)
    run = tmp_path / "run"
    with pytest.raises(TrainError, match=r"refusing to write the step-4 checkpoint: \d+ parameter tensor\(s\) hold "
                                         r"NaN/inf .*the last good checkpoint is .*step_0000002"):
        run_pretrain(tiny({"joint": {}}, extra=["max_steps=6"]), features, manifest, run, progress=False)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert_finite_checkpoints(run)

    # the Ctrl-C / SIGTERM path refuses too
    corrupt_weights_after(monkeypatch, 1)
    real_build = run_module.build_objective
    calls = [0]

    def build(name, model, vocab, options):
        real = real_build(name, model, vocab, options)

        def objective(model, batch, gen):
            calls[0] += 1
            if calls[0] == 3:
                raise KeyboardInterrupt
            return real(model, batch, gen)

        return Wrapped(real, objective)

    monkeypatch.setattr(run_module, "build_objective", build)
    run = tmp_path / "run2"
    with pytest.raises(TrainError, match="refusing to write the step-2 checkpoint.*no checkpoint was written"):
        run_pretrain(tiny({"joint": {}}, extra=["max_steps=6", "checkpoint_every=5"]), features, manifest, run,
                     progress=False)
    assert "interrupted at step 2; refusing" in capsys.readouterr().err
    assert not list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else True


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_trainer_state_holding_pickled_objects_is_refused(data, tmp_path):
    features, manifest = data
    run = tmp_path / "run"
    cfg = tiny({"joint": {}}, extra=["max_steps=2"])
    run_pretrain(cfg, features, manifest, run, progress=False)
    ckpt = latest_checkpoint(run)
    state = load_trainer_state(ckpt)  # weights_only=True: RNG states are stored as tensors and tuples
    assert isinstance(state["rng"]["numpy"][1], torch.Tensor) and isinstance(state["rng"]["python"], tuple)
    torch.save({**state, "extra": Payload()}, ckpt / "trainer.pt")
    with pytest.raises(TrainError, match=r"trainer\.pt: refusing to load: it holds objects other than tensors"):
        load_trainer_state(ckpt)
    with pytest.raises(TrainError, match=str(ckpt / "trainer.pt")):
        run_pretrain(tiny({"joint": {}}, extra=["max_steps=4"]), features, manifest, run, resume=True, progress=False)


# ---- processes killed with SIGKILL / SIGTERM ------------------------------------------------------------------

def pretrain_cmd(tmp_path: Path, data, run: Path, max_steps: int, extra=()) -> list[str]:
    features, manifest = data
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {mode: video}\nmodel: {architecture: hierarchical}\nobjectives:\n  mlm: {ratio: 2}\n"
                      "  mfm_nce: {}\n  fom: {}\n  vsm: {}\n  joint: {}\nmixing: sample\n")
    return [sys.executable, "-m", "videolm.cli", "pretrain", "--config", str(recipe), "--features", str(features),
            "--manifest", str(manifest), "--out", str(run), "--quiet", "--resume", *TINY_OVERRIDES,
            f"max_steps={max_steps}", "checkpoint_every=1", "keep_checkpoints=2", *extra]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def wait_for_new_checkpoint(proc, run: Path, timeout=120.0) -> bool:
    """Wait until the process has written a checkpoint (so it is in the train + save loop)."""
    pointer = run / "checkpoints" / "latest"
    before = pointer.read_text() if pointer.exists() else None
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        try:
            if pointer.exists() and pointer.read_text() != before:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError("no checkpoint written in time")


def check_every_pickable_checkpoint(run: Path) -> int:
    """Every step_* that latest_checkpoint returns loads completely; the run's pick is one of them."""
    root = run / "checkpoints"
    picked = latest_checkpoint(run)
    if picked is None:
        assert not list(root.glob("step_*")) if root.exists() else True
        return 0
    assert picked.parent == root and picked.name.startswith("step_"), picked
    for d in sorted(root.glob("step_*")):
        if latest_checkpoint(d) != d:
            continue
        model, tokenizer, cfg = load_pretrained(d)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())
        state = torch.load(d / "trainer.pt", weights_only=True)
        meta = json.loads((d / "meta.json").read_text())
        assert state["step"] == meta["step"] == int(d.name[5:])
        assert load_recipe(d / "config.yaml").train.max_steps == cfg.train.max_steps
    return int(picked.name[5:])


def kill_and_resume(tmp_path, data, kills: int, max_steps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    run = tmp_path / "killed"
    cmd = pretrain_cmd(tmp_path, data, run, max_steps)
    stats = {"kills": 0, "mid_save": 0, "steps_lost": 0}
    last = 0
    for _ in range(kills):
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for_new_checkpoint(proc, run):
            break  # it finished before the kill
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        stats["kills"] += 1
        # a temporary left behind means the kill landed while a checkpoint was being written or deleted
        stats["mid_save"] += bool(list((run / "checkpoints").glob(".tmp-*")))
        logged = max((r["step"] for r in read_metrics(run / "metrics.jsonl")), default=0)
        step = check_every_pickable_checkpoint(run)
        assert step >= last, "the picked checkpoint went back"
        stats["steps_lost"] += logged - step
        last = step
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert check_every_pickable_checkpoint(run) == max_steps
    assert not list((run / "checkpoints").glob(".tmp-*"))

    full = tmp_path / "full"
    cfg = load_recipe(tmp_path / "recipe.yaml", TINY_OVERRIDES + [f"max_steps={max_steps}", "checkpoint_every=1",
                                                                  "keep_checkpoints=2"])
    run_pretrain(cfg, data[0], data[1], full, progress=False)
    a, b = losses(full), losses(run)
    assert [r["step"] for r in b] == list(range(1, max_steps + 1))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), ra["step"]
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    return stats


def test_sigkill_during_checkpoints_then_resume_repeats_the_losses(data, tmp_path):
    stats = kill_and_resume(tmp_path, data, kills=1, max_steps=8, seed=0)
    print(f"seed 0: {stats}")
    assert stats["kills"] == 1, stats


@pytest.mark.faults
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_many_times_then_resume_repeats_the_losses(data, tmp_path, seed):
    stats = kill_and_resume(tmp_path, data, kills=10, max_steps=40, seed=seed)
    print(f"seed {seed}: {stats}")
    assert stats["kills"] >= 8, stats


def test_sigterm_writes_a_checkpoint_and_exits(data, tmp_path):
    run = tmp_path / "run"
    cmd = pretrain_cmd(tmp_path, data, run, 1000, extra=["checkpoint_every=500"])
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (run / "metrics.jsonl").exists() or not read_metrics(run / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() - t0 < 120
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err  # 128 + SIGTERM, what schedulers expect
    assert "signal SIGTERM received at step" in err, err
    step = int(err.split("received at step ")[1].split(";")[0])
    assert check_every_pickable_checkpoint(run) == step > 0
    assert not list((run / "checkpoints").glob(".tmp-*"))
