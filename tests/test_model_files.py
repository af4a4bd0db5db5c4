"""Model files as other tools expect them: safetensors weights, from_pretrained/save_pretrained, the model card,
and features.json (how the training features were made). Tiny runs, a few seconds each."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train import TINY_OVERRIDES, tiny, write_data
from videolm import VideoTextModel
from videolm.extract.job import file_sha256
from videolm.finetune.job import run_finetune
from videolm.manifests.manifest import load_manifest, write_manifest
from videolm.pretrain.checkpoint import (convert_legacy, feature_record, latest_checkpoint, load_pretrained,
                                         save_weights)
from videolm.pretrain.recipe import apply_overrides, recipe_from_dict
from videolm.pretrain.trainer import run_pretrain

SAMPLING = {"fps": 2.0, "frames_per_clip": 4, "clip_stride": 1.5, "short_side": 112, "crop": 96}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Features with a real-looking extract_config.json (and weights file), a manifest with a val split,
    and a 2-step pretraining run on them."""
    root = tmp_path_factory.mktemp("model_files")
    features, manifest = write_data(root, n_videos=12, dim=8, quantize=False)
    weights = root / "encoder.pt"
    weights.write_bytes(b"encoder weights")
    key = {"encoder": "s3d", "weights": str(weights), "sampling": SAMPLING, "dim": 8, "manifest_sha256": "ab" * 32,
           "split": None, "shard_size": 6, "num_videos": 12, "decode": "sparse"}
    (features / "extract_config.json").write_text(json.dumps({"key": key, "videolm_version": "0.3.0"}))
    entries = load_manifest(manifest)
    split = [dataclasses.replace(e, split="val") if i % 4 == 0 else e for i, e in enumerate(entries)]
    manifest = write_manifest(split, root / "manifest_splits.jsonl")
    run = root / "pre"
    summary = run_pretrain(tiny({"joint": {}, "mlm": {}}, extra=["max_steps=2"]), features, manifest, run,
                           progress=False)
    return {"root": root, "features": features, "manifest": manifest, "run": run, "key": key,
            "weights": weights, "summary": summary}


def outputs(model) -> list[torch.Tensor]:
    """What the model computes on fixed inputs (text and video encoders)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    video = torch.randn(2, 5, model.cfg.feature_dim, generator=g)
    with torch.no_grad():
        return [model.encode_text(ids, mask), model.encode_video(torch.ones(2, 5, dtype=torch.bool), video)]


def assert_same(a, b):
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoints_hold_safetensors_and_no_pickled_weights(trained):
    ckpt = latest_checkpoint(trained["run"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "objectives.safetensors").is_file()
    assert not (ckpt / "model.pt").exists() and not (ckpt / "objectives.pt").exists()
    assert [p.name for p in ckpt.glob("*.pt")] == ["trainer.pt"]
    model, _, _ = load_pretrained(trained["run"])
    saved = load_file(ckpt / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert_same(model, load_pretrained(ckpt)[0])  # a checkpoint loads to the same outputs each time


def test_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight  # shared storage: safetensors refuses it as is

    a, b = Tied(), Tied()
    save_weights(a.state_dict(), tmp_path / "m.safetensors")
    b.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert b.out.weight is b.embed.weight and torch.equal(b.embed.weight, a.embed.weight)


def test_legacy_model_pt_loads_with_a_warning_once_and_converts(trained, tmp_path, caplog):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(trained["run"], run)
    ckpt = latest_checkpoint(run)
    for name in ("model", "objectives"):  # as videolm wrote checkpoints before safetensors
        torch.save(load_file(ckpt / f"{name}.safetensors"), ckpt / f"{name}.pt")
        (ckpt / f"{name}.safetensors").unlink()
    assert latest_checkpoint(run) == ckpt
    with caplog.at_level(logging.WARNING, logger="videolm.pretrain.checkpoint"):
        old = load_pretrained(run)[0]
        load_pretrained(run)
    warned = [r.getMessage() for r in caplog.records if "model.pt" in r.getMessage()]
    assert len(warned) == 1 and "deprecated" in warned[0] and "convert_legacy" in warned[0]
    assert_same(old, load_pretrained(trained["run"])[0])
    assert sorted(p.name for p in convert_legacy(ckpt)) == ["model.safetensors", "objectives.safetensors"]
    assert not (ckpt / "model.pt").exists() and not (ckpt / "objectives.pt").exists()
    assert_same(old, VideoTextModel.from_pretrained(run))


def test_from_pretrained_accepts_run_checkpoint_and_saved_directories(trained, tmp_path):
    run = trained["run"]
    from_run = VideoTextModel.from_pretrained(run)
    assert not from_run.training
    from_ckpt = VideoTextModel.from_pretrained(latest_checkpoint(run))
    assert_same(from_run, from_ckpt)
    out = VideoTextModel.save_pretrained(from_run, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "features.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".pt") for n in names)
    assert json.loads((out / "config.json").read_text())["architecture"] == "two_stream"
    model, tokenizer = VideoTextModel.model_and_tokenizer(out)
    assert not model.training and tokenizer.vocab_size == model.word_embeddings.shape[0]
    assert_same(from_run, model)
    assert feature_record(out) == feature_record(run)
    again = VideoTextModel.save_pretrained(model, out)  # replacing a saved directory in place
    assert_same(from_run, VideoTextModel.from_pretrained(again))


def test_features_json_matches_extract_config(trained):
    key, ckpt = trained["key"], latest_checkpoint(trained["run"])
    record = feature_record(trained["run"])
    assert record == json.loads((ckpt / "features.json").read_text()) == feature_record(ckpt)
    assert record["encoder"] == key["encoder"] and record["weights"] == key["weights"]
    assert record["weights_sha256"] == file_sha256(trained["weights"])
    assert record["sampling"] == key["sampling"] and record["dim"] == key["dim"] == 8
    assert record["decode"] == "sparse" and record["backend"] == "av"
    assert record["manifest_sha256"] == key["manifest_sha256"] and record["num_videos"] == 12


def test_old_checkpoints_have_no_feature_record(trained, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(trained["run"]), ckpt)
    (ckpt / "features.json").unlink()
    assert feature_record(ckpt) is None and feature_record(tmp_path / "nothing") is None


def test_model_cards_of_pretraining_and_finetuning(trained, tmp_path):
    card = (trained["run"] / "README.md").read_text()
    assert "steps trained: 2" in card and "final losses (step 2)" in card and "mlm_loss" in card
    assert file_sha256(trained["manifest"]) in card and "encoder `s3d`" in card and "videos trained on: 9" in card
    assert "joint (weight 1)" in card and "`two_stream`" in card and "hidden 32" in card
    assert f'VideoTextModel.model_and_tokenizer("{trained["run"]}")' in card
    assert f"videolm eval-retrieval --checkpoint {trained['run']}" in card
    cfg = apply_overrides(recipe_from_dict({"objectives": {"joint": {}}, "data": {"mode": "video"}}),
                          TINY_OVERRIDES + ["max_steps=2", "select.every=2", "checkpoint_every=2"])
    out = tmp_path / "ft"
    summary = run_finetune(trained["run"], cfg, trained["features"], trained["manifest"], out, progress=False)
    card = (out / "README.md").read_text()
    best = summary["best"]
    assert "fine-tuning run" in card and "steps trained: 2" in card
    assert f"best retrieval_r1: {best['score']} at step {best['step']}" in card
    assert "initialised from" in card
    assert (latest_checkpoint(out / "best") / "features.json").is_file()
    assert feature_record(out / "best")["weights_sha256"] == file_sha256(trained["weights"])


def test_import_videolm_does_not_import_torch():
    code = "import sys, videolm; assert 'torch' not in sys.modules, 'torch imported'; print(videolm.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError):
        import videolm

        videolm.NoSuchThing
