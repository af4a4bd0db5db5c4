import json

from videolm.demo import run_demo
from videolm.features.shards import FeatureStore


def test_demo_runs_end_to_end(tmp_path, capsys):
    small = ("batch_size=3", "max_steps=2", "checkpoint_every=1", "num_workers=0", "threads=1", "model.text_layers=1")
    assert run_demo(tmp_path, train_videos=6, test_videos=4, seed=0, workers=1, train_overrides=small) == 0
    out = capsys.readouterr().out
    assert "10 synthesized (6 train, 4 test), 10 with features, 0 failed" in out and "visual words" in out
    store = FeatureStore(tmp_path / "features")
    v = store.get(store.video_ids[0])
    assert v.tokens is not None and len(v.tokens) == len(v.features) and v.tokens.max() < 64
    assert (tmp_path / "quantize_report" / "word_frequencies.png").exists()
    assert "pretraining       2 steps" in out and (tmp_path / "pretrain" / "checkpoints" / "step_0000002").is_dir()
    assert (tmp_path / "pretrain" / "loss_curves.png").exists()
    # the retrieval table: three rows on the 4 test videos, reports and rankings on disk
    assert "test split: 4 videos, 4 queries (chance R@1 25.0%)" in out
    for row in ("pretrained", "untrained", "TF-IDF ridge"):
        assert f"\n  {row:14}" in out
    for name in ("pretrained", "untrained", "tfidf_ridge"):
        rep = json.loads((tmp_path / "eval" / f"{name}.json").read_text())
        assert rep["split"] == "test" and rep["n_videos"] == 4
        assert (tmp_path / "eval" / f"{name}.rankings.jsonl").exists()
    assert (tmp_path / "eval" / "recall.png").exists() and (tmp_path / "eval" / "table.txt").exists()
    # a second run reuses everything (pretraining resumes from its last checkpoint and has nothing left to do)
    assert run_demo(tmp_path, train_videos=6, test_videos=4, seed=0, workers=1, train_overrides=small) == 0
    assert "reusing 6 train videos" in capsys.readouterr().out
