"""Fine-tuning: start from a checkpoint, select on val, keep the best, stop early, refuse misfits."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from test_train import TINY_OVERRIDES, write_data
from videolm.cli import main
from videolm.errors import ConfigError
from videolm.finetune.job import run_finetune
from videolm.finetune.selection import Selector, read_selection
from videolm.manifests.manifest import load_manifest, write_manifest
from videolm.pretrain.checkpoint import latest_checkpoint, load_model_state, training_record
from videolm.pretrain.recipe import SelectConfig, apply_overrides, load_recipe, recipe_from_dict
from videolm.pretrain.trainer import run_pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Tiny features, a manifest with train and val splits, and a pretrained joint run."""
    root = tmp_path_factory.mktemp("ft")
    features, manifest = write_data(root, n_videos=16, dim=8, quantize=False)
    entries = load_manifest(manifest)
    split = [dataclasses.replace(e, split="val") if i % 4 == 0 else e for i, e in enumerate(entries)]
    manifest = write_manifest(split, root / "manifest_splits.jsonl")
    cfg = apply_overrides(recipe_from_dict({"objectives": {"joint": {}}}), TINY_OVERRIDES + ["max_steps=4"])
    run_pretrain(cfg, features, manifest, root / "pre", progress=False)
    return {"root": root, "features": features, "manifest": manifest, "pre": root / "pre"}


def _ft_cfg(path="ft_retrieval_joint.yaml", extra=()):
    return load_recipe(ROOT / "pipelines" / path, TINY_OVERRIDES + ["data.mode=video", "batch_size=4", *extra])


def test_finetune_selects_on_val_and_keeps_the_best(task, tmp_path):
    out = tmp_path / "ft"
    cfg = _ft_cfg(extra=["max_steps=6", "select.every=2", "patience=0", "checkpoint_every=2"])
    summary = run_finetune(task["pre"], cfg, task["features"], task["manifest"], out, progress=False)
    rows = read_selection(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    best = max(rows, key=lambda r: r["score"])
    assert summary["best"]["step"] == best["step"] and rows[-1]["best_step"] == best["step"]
    kept = latest_checkpoint(out / "best")
    assert kept.name == f"step_{best['step']:07d}"
    # the weights started from the pretrained run: the first step moved them only a little
    record = training_record(kept)
    assert record["kind"] == "fine-tuned" and record["init_from"] == str(latest_checkpoint(task["pre"]).resolve())
    assert record["selected_on"] == {"metric": "retrieval_r1", "split": "val"}
    assert training_record(latest_checkpoint(task["pre"]))["zero_shot"] is True


def test_init_weights_come_from_the_checkpoint(task, tmp_path):
    cfg = _ft_cfg(extra=["max_steps=1", "lr=1e-12", "warmup_steps=0", "select.every=0"])
    run_finetune(task["pre"], cfg, task["features"], task["manifest"], tmp_path / "ft", progress=False)
    a = load_model_state(latest_checkpoint(task["pre"]))
    b = load_model_state(latest_checkpoint(tmp_path / "ft"))
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6


class _Run:
    """What Selector touches of a training run, with a scripted score."""
    rank = 0

    def __init__(self):
        import torch
        self.runner = torch.nn.Linear(1, 1)
        self.model = self.runner


def test_selector_stops_after_patience_and_resumes_its_count(tmp_path, monkeypatch):
    scores = iter([1.0, 3.0, 2.0, 2.5, 9.0])
    saved = []
    monkeypatch.setattr(Selector, "_save_best", lambda self, run, step: saved.append(step))
    sel = Selector(tmp_path, SelectConfig(every=10, patience=2), lambda run: next(scores), {})
    run = _Run()
    assert [sel(run, s, False) for s in (5, 10, 20, 30)] == [False, False, False, False]
    # a new process (resume) reads selection.jsonl back: best at step 20, one scoring since
    sel = Selector(tmp_path, SelectConfig(every=10, patience=2), lambda run: next(scores), {})
    assert sel.best["step"] == 20 and sel.since_best == 1
    assert sel(run, 30, False) is False  # already scored before the resume
    assert sel(run, 40, False) is True  # 2.5 at step 40: the second scoring without a gain
    assert saved == [10, 20]
    assert [r["score"] for r in read_selection(tmp_path)] == [1.0, 3.0, 2.0, 2.5]


def test_early_stop_ends_the_run_and_says_so(task, tmp_path, monkeypatch):
    import videolm.finetune.job as job

    monkeypatch.setattr(job, "retrieval_r1", lambda run, entries, store, cfg: 1.0)  # never improves
    cfg = _ft_cfg(extra=["max_steps=10", "select.every=1", "patience=2"])
    summary = run_finetune(task["pre"], cfg, task["features"], task["manifest"], tmp_path / "ft", progress=False)
    assert summary["stopped_early"] and summary["steps"] == 3
    assert [r["step"] for r in read_selection(tmp_path / "ft")] == [1, 2, 3]


def test_misfit_checkpoints_are_refused_naming_the_mismatch(task, tmp_path):
    moments = _ft_cfg("ft_moments.yaml", ["max_steps=1"])
    with pytest.raises(ConfigError, match=r"its model is two_stream.*vsm runs on hierarchical"):
        run_finetune(task["pre"], moments, task["features"], task["manifest"], tmp_path / "a", progress=False)
    other, manifest6 = write_data(tmp_path / "d6", n_videos=8, dim=6, quantize=False)
    with pytest.raises(ConfigError, match="reads 8-d clip features but these shards hold 6-d"):
        run_finetune(task["pre"], _ft_cfg(extra=["max_steps=1", "select.every=0"]), other, manifest6,
                     tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="no checkpoint there"):
        run_finetune(tmp_path / "nothing", _ft_cfg(), task["features"], task["manifest"], tmp_path / "c")
    with pytest.raises(ConfigError, match="no videos in split 'test'"):
        run_finetune(task["pre"], _ft_cfg(extra=["val_split=test"]), task["features"], task["manifest"],
                     tmp_path / "d", progress=False)


def test_cli_finetune_and_resume(task, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--init", str(task["pre"]), "--config", str(ROOT / "pipelines/ft_retrieval_joint.yaml"),
            "--features", str(task["features"]), "--manifest", str(task["manifest"]), "--out", str(out), "--quiet",
            *TINY_OVERRIDES, "data.mode=video", "max_steps=2", "select.every=1", "patience=0"]
    assert main(args) == 0
    assert "best val retrieval_r1" in capsys.readouterr().out
    assert main(["finetune", "--init", str(task["pre"]), "--features", str(task["features"]), "--manifest",
                 str(task["manifest"]), "--out", str(out), "--quiet", "--resume", "max_steps=4"]) == 0
    assert [r["step"] for r in read_selection(out)] == [1, 2, 3, 4]
    record = json.loads((out / "finetune.json").read_text())
    assert record["steps"] == 4 and record["best"]["step"] in (1, 2, 3, 4)
    # resuming with the recipe given again (as `videolm demo` does): its model section was set aside for the
    # --init checkpoint's on the first run, so it is not a config change now
    assert main(args[:-3] + ["max_steps=5", "select.every=1", "patience=0", "--resume"]) == 0
    assert json.loads((out / "finetune.json").read_text())["steps"] == 5


def test_caption_and_moment_metrics_select_too(task, tmp_path):
    caption = _ft_cfg("ft_caption.yaml", ["max_steps=2", "select.every=1", "patience=0", "data.mode=segment"])
    run_finetune(task["pre"], caption, task["features"], task["manifest"], tmp_path / "cap", progress=False)
    rows = read_selection(tmp_path / "cap")
    assert [r["metric"] for r in rows] == ["cider", "cider"] and all(r["score"] >= 0 for r in rows)
    assert latest_checkpoint(tmp_path / "cap" / "best") is not None

    hero = apply_overrides(recipe_from_dict({"model": {"architecture": "hierarchical"}, "data": {"mode": "video"},
                                             "objectives": {"vsm": {}}}), TINY_OVERRIDES + ["max_steps=2"])
    run_pretrain(hero, task["features"], task["manifest"], tmp_path / "hero", progress=False)
    moments = _ft_cfg("ft_moments.yaml", ["max_steps=2", "select.every=2", "grad_accum=1", "warmup_steps=0"])
    run_finetune(tmp_path / "hero", moments, task["features"], task["manifest"], tmp_path / "mom", progress=False)
    rows = read_selection(tmp_path / "mom")
    assert [r["metric"] for r in rows] == ["moment_r1"] and 0 <= rows[0]["score"] <= 100


def test_init_none_trains_the_recipes_own_model_from_scratch(task, tmp_path):
    out = tmp_path / "scratch"
    args = ["finetune", "--init", "none", "--config", str(ROOT / "pipelines/ft_retrieval_joint.yaml"),
            "--features", str(task["features"]), "--manifest", str(task["manifest"]), "--out", str(out), "--quiet",
            *TINY_OVERRIDES, "data.mode=video", "max_steps=2", "select.every=1", "patience=0", "lr=1e-12",
            "warmup_steps=0", "seed=5"]
    assert main(args) == 0
    assert json.loads((out / "finetune.json").read_text())["init"] is None
    record = training_record(latest_checkpoint(out / "best"))
    assert record["kind"] == "trained on the task from scratch" and record["zero_shot"] is False
    assert "init_from" not in record
    # the model is the recipe's at its own (seed 5) initialisation: far from the pretrained run's weights,
    # which a tiny lr would have kept (seed 0's initialisation moved by 4 small steps)
    fresh, pre = load_model_state(latest_checkpoint(out)), load_model_state(latest_checkpoint(task["pre"]))
    video = [k for k in fresh if k in pre and not k.startswith("text.") and fresh[k].dtype.is_floating_point]
    assert video and max(float((fresh[k] - pre[k]).abs().max()) for k in video) > 1e-2


def test_a_task_recipe_without_a_model_section_sets_nothing_aside(task, tmp_path, caplog):
    """The model comes from --init; only model settings a recipe asks for are worth a warning."""
    cfg = _ft_cfg(extra=["max_steps=1", "select.every=0"])
    with caplog.at_level("WARNING", logger="videolm.pretrain.run"):
        run_finetune(task["pre"], cfg, task["features"], task["manifest"], tmp_path / "ft", progress=False)
    assert "set aside" not in caplog.text
    asked = _ft_cfg(extra=["max_steps=1", "select.every=0", "model.video_layers=5"])
    with caplog.at_level("WARNING", logger="videolm.pretrain.run"):
        run_finetune(task["pre"], asked, task["features"], task["manifest"], tmp_path / "ft2", progress=False)
    assert "set aside (video_layers: 5 ->" in caplog.text
