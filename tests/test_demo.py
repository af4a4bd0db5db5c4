import json

from videolm.demo import run_demo
from videolm.features.shards import FeatureStore


def test_demo_runs_end_to_end(tmp_path, capsys):
    small = ("batch_size=3", "max_steps=2", "checkpoint_every=1", "num_workers=0", "threads=1", "model.text_layers=1",
             "select.every=1")
    kw = dict(train_videos=6, val_videos=3, test_videos=4, seed=0, workers=1, train_overrides=small)
    assert run_demo(tmp_path, **kw) == 0
    out = capsys.readouterr().out
    assert "13 synthesized (6 train, 3 val, 4 test), 13 with features, 0 failed" in out and "visual words" in out
    store = FeatureStore(tmp_path / "features")
    v = store.get(store.video_ids[0])
    assert v.tokens is not None and len(v.tokens) == len(v.features) and v.tokens.max() < 64
    assert (tmp_path / "quantize_report" / "word_frequencies.png").exists()
    assert "pretraining       2 steps" in out and (tmp_path / "pretrain" / "checkpoints" / "step_0000002").is_dir()
    assert (tmp_path / "pretrain" / "loss_curves.png").exists()
    # fine-tuning starts from the pretrained run and keeps its best val checkpoint
    ft = json.loads((tmp_path / "finetune" / "finetune.json").read_text())
    assert ft["init"].startswith(str(tmp_path / "pretrain")) and ft["best"]["metric"] == "retrieval_r1"
    assert "fine-tuning       2 steps" in out and "best val retrieval_r1" in out
    assert (tmp_path / "finetune" / "best").is_dir() and (tmp_path / "moments_model" / "checkpoints").is_dir()
    # the retrieval table: four rows on the 4 test videos, reports and rankings on disk
    assert "test split: 4 videos, 4 queries (chance R@1 25.0%)" in out
    for row in ("pretrained", "fine-tuned", "untrained", "TF-IDF ridge"):
        assert f"\n  {row:14}" in out
    e = tmp_path / "eval"
    for name in ("pretrained", "finetuned", "untrained", "tfidf_ridge"):
        rep = json.loads((e / f"{name}.json").read_text())
        assert rep["split"] == "test" and rep["n_videos"] == 4
        assert (e / f"{name}.rankings.jsonl").exists()
    assert json.loads((e / "finetuned.json").read_text())["model"]["training"]["kind"] == "fine-tuned"
    assert json.loads((e / "pretrained.json").read_text())["model"]["training"]["zero_shot"] is True
    # the caption table: the model and the most frequent training caption on every test segment
    caps = [json.loads(line) for line in (e / "captions.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (e / "captions_baseline.jsonl").read_text().splitlines()]
    assert [c["key"] for c in caps] == [b["key"] for b in base] and len({b["hypothesis"] for b in base}) == 1
    assert "captioning, test split:" in out and "most frequent caption" in out and "CIDEr-D" in out
    assert json.loads((e / "caption_report.json").read_text())["n_items"] == len(caps)
    # the moments table: the vsm model's SVMR and VCMR beside the whole-video and prior-span baselines
    moments = json.loads((e / "moments.json").read_text())
    assert moments["split"] == "test" and moments["eval_config"]["context"] == "video"
    baselines = json.loads((e / "moment_baselines.json").read_text())
    assert set(baselines) == {"whole video", "prior span"}
    for row in ("vsm model", "whole video", "prior span", "VCMR (whole corpus)"):
        assert f"\n  {row:28}" in out
    assert (e / "recall.png").exists() and (e / "tables.txt").read_text().count("test split") == 3
    assert "caption speed" in out
    # a second run reuses everything (each run resumes from its last checkpoint and has nothing left to do)
    assert run_demo(tmp_path, **kw) == 0
    assert "reusing 6 train videos" in capsys.readouterr().out
