"""Moment retrieval: IoU and R@K-at-IoU against brute force, span decoding, and a tiny overfit run."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from videolm.moments.metrics import MISS, moment_metrics, query_outcome
from videolm.moments.spans import SpanConfig, corpus_spans, decode_spans, length_mask, nms, temporal_iou


def iou_by_hand(a, b) -> float:
    """Intersection over union of two closed intervals, written out case by case."""
    (s1, e1), (s2, e2) = a, b
    inter = 0.0
    if min(e1, e2) > max(s1, s2):
        inter = min(e1, e2) - max(s1, s2)
    union = (e1 - s1) + (e2 - s2) - inter
    return inter / union if union > 0 else 0.0


def test_temporal_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = np.round(rng.uniform(0, 10, size=(300, 4)), 1)  # rounded: many shared and touching endpoints
    a = np.sort(pts[:, :2], 1)
    b = np.sort(pts[:, 2:], 1)
    got = temporal_iou(a, b)
    want = np.array([iou_by_hand(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert temporal_iou(np.array([[2.0, 4.0]]), np.array([2.0, 4.0]))[0] == 1.0
    assert temporal_iou(np.array([[0.0, 1.0]]), np.array([1.0, 2.0]))[0] == 0.0  # touching
    assert temporal_iou(np.array([[3.0, 3.0]]), np.array([3.0, 3.0]))[0] == 0.0  # empty union
    assert temporal_iou(np.array([[0.0, 4.0]]), np.array([1.0, 3.0]))[0] == pytest.approx(0.5)


def recall_by_hand(preds, gts, k, t) -> float:
    """TVR's rule, looped: a query is a hit when one of its first k predictions has its video and IoU >= t."""
    hits = 0
    for (videos, spans), (gv, gs) in zip(preds, gts):
        hits += any(v == gv and iou_by_hand(s, gs) >= t for v, s in list(zip(videos, spans))[:k])
    return 100.0 * hits / len(gts)


def test_recall_at_iou_matches_brute_force():
    rng = np.random.default_rng(1)
    preds, gts, outcomes = [], [], []
    for _ in range(120):
        n = int(rng.integers(0, 30))
        videos = rng.integers(0, 3, size=n)
        starts = np.round(rng.uniform(0, 8, n), 1)
        spans = np.stack([starts, starts + np.round(rng.uniform(0.1, 4, n), 1)], 1)
        gv, gs = int(rng.integers(0, 3)), (2.0, 5.0)
        preds.append((videos, spans))
        gts.append((gv, gs))
        outcomes.append(query_outcome(videos, spans, gv, gs))
    report = moment_metrics(outcomes, n_boot=200)
    for k, t in itertools.product((1, 5, 10, 100), (0.5, 0.7)):
        assert report["metrics"][f"R@{k} IoU={t}"] == pytest.approx(recall_by_hand(preds, gts, k, t))
        lo, hi = report["ci95"][f"R@{k} IoU={t}"]
        assert lo <= report["metrics"][f"R@{k} IoU={t}"] <= hi
    top1 = [iou_by_hand(s[0], g[1]) if len(v) and v[0] == g[0] else 0.0 for (v, s), g in zip(preds, gts)]
    assert report["metrics"]["mIoU"] == pytest.approx(100 * np.mean(top1))
    assert query_outcome(np.zeros(0), np.zeros((0, 2)), 0, (0, 1))["ranks"][0.5] == MISS


def test_length_mask_keeps_ordered_spans_within_limits():
    m = length_mask(6, 2, 3)
    for s, e in itertools.product(range(6), range(6)):
        assert m[s, e] == (s <= e and 2 <= e - s + 1 <= 3)


def test_span_decoder_on_hand_made_scores():
    times = np.stack([np.arange(8.0), np.arange(8.0) + 1], 1)  # 1 s clips
    p_start = np.array([0.05, 0.6, 0.05, 0.05, 0.05, 0.1, 0.05, 0.05])
    p_end = np.array([0.3, 0.02, 0.02, 0.5, 0.02, 0.02, 0.1, 0.02])  # end 0 is likelier than 3 only before start 1
    out = decode_spans(p_start, p_end, times, SpanConfig(min_len=1, max_len=16, nms_iou=None, top_n=5))
    # best: start 1 x end 3 (0.30); start 0 x end 3 would be 0.025, start 1 x end 0 is not allowed (end < start)
    assert out["clips"][0].tolist() == [1, 3]
    assert out["seconds"][0].tolist() == [1.0, 4.0]
    assert out["scores"][0] == pytest.approx(0.6 * 0.5)
    assert out["clips"][1].tolist() == [1, 6]  # 0.06
    assert all(s <= e for s, e in out["clips"])
    want = sorted(((p_start[s] * p_end[e], s, e) for s in range(8) for e in range(s, 8)), key=lambda x: (-x[0], x[1]))
    np.testing.assert_allclose(out["scores"], [w[0] for w in want[:5]])
    # length limits: at most 2 clips long, the 3-clip best span is gone
    short = decode_spans(p_start, p_end, times, SpanConfig(min_len=1, max_len=2, nms_iou=None))
    # (2, 3) and (3, 3) tie at 0.025: the lower flat index (earlier start) first
    assert short["clips"][:2].tolist() == [[2, 3], [3, 3]] and all(e - s + 1 <= 2 for s, e in short["clips"])
    # suppression: nothing left overlaps a better span by IoU > 0.5
    kept = decode_spans(p_start, p_end, times, SpanConfig(nms_iou=0.5, top_n=10))
    for i, j in itertools.combinations(range(len(kept["seconds"])), 2):
        assert temporal_iou(kept["seconds"][j : j + 1], kept["seconds"][i])[0] <= 0.5


def test_nms_keeps_the_best_of_overlapping_spans():
    spans = np.array([[0.0, 4.0], [0.0, 3.5], [5.0, 6.0], [0.5, 4.0]])
    assert nms(spans, np.array([4, 3, 2, 1.0]), 0.5, 10).tolist() == [0, 2]
    assert nms(spans, np.array([4, 3, 2, 1.0]), None, 2).tolist() == [0, 1]


def test_corpus_spans_weigh_videos_as_hero():
    times = [np.stack([np.arange(4.0), np.arange(4.0) + 1], 1)] * 2
    sharp = (np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0]))
    flat = (np.full(4, 0.25), np.full(4, 0.25))
    cfg = SpanConfig(nms_iou=None, top_n=3)
    # video 1 scores a little lower but its span is certain: exp(20 * -0.05) * 1 > 1 * 0.0625
    out = corpus_spans(np.array([0.50, 0.45]), [flat, sharp].__getitem__, times, cfg)
    assert out["videos"][0] == 1 and out["clips"][0].tolist() == [1, 2]
    assert out["scores"][0] == pytest.approx(np.exp(20 * -0.05))
    # a large gap in video score wins over span certainty
    out = corpus_spans(np.array([0.50, 0.2]), [flat, sharp].__getitem__, times, cfg)
    assert out["videos"][0] == 0
    one = corpus_spans(np.array([0.50, 0.45]), [flat, sharp].__getitem__, times, SpanConfig(top_videos=1, nms_iou=None))
    assert set(one["videos"].tolist()) == {0}


# --------------------------------------------------------------------------- a tiny run that localises its captions

COLOURS, DIGITS, DIRS = ("red", "blue", "green", "yellow"), ("one", "two", "seven", "nine"), ("left", "right", "up")


def write_moment_data(root, n_videos=8, dim=16, seed=0):
    """Videos of 10-14 one-second clips with 1-3 timed captions each; a caption's clips carry a vector
    fixed by its text (plus noise), so a model can find the span from the clips alone. One whole-video
    caption, which must be counted and left out."""
    import zlib

    from videolm.features.layout import shard_name
    from videolm.features.shards import ShardWriter
    from videolm.manifests.manifest import Caption, VideoEntry, write_manifest

    rng = np.random.default_rng(seed)
    features = root / "features"
    features.mkdir(parents=True)
    w = ShardWriter(features / shard_name(0), dim, {"encoder": "pixels", "config": json.dumps({"encoder": "pixels"})})
    entries = []
    for i in range(n_videos):
        n = int(rng.integers(10, 15))
        x = rng.normal(scale=0.3, size=(n, dim)).astype(np.float32)
        caps, t = [], int(rng.integers(0, 2))
        while t < n - 2 and len(caps) < 3:
            a, b = t, min(n, t + int(rng.integers(2, 5)))
            text = f"a {rng.choice(COLOURS)} {rng.choice(DIGITS)} moves {rng.choice(DIRS)}"
            x[a:b] += np.random.default_rng(zlib.crc32(text.encode())).normal(size=dim).astype(np.float32)
            caps.append(Caption(float(a), float(b), text, "caption"))
            t = b + int(rng.integers(1, 3))
        if i == 0:
            caps.append(Caption(0.0, float(n), "a video of moving digits", "caption"))
        w.add_video(f"v{i:03d}", x, np.arange(n, dtype=float), np.arange(n) + 1.0, float(n))
        entries.append(VideoEntry(f"v{i:03d}", f"v{i:03d}.mp4", "train", float(n), tuple(caps)))
    w.finish()
    return features, write_manifest(entries, root / "manifest.jsonl")


TINY_HERO = {"hidden": 32, "heads": 2, "text_init": "none", "text_layers": 1, "temporal_layers": 1, "max_frames": 16,
             "max_text_len": 32, "embed_dim": 16, "dropout": 0.0}


def tiny_hero(steps: int, objectives=("vsm",), architecture="hierarchical"):
    from videolm.pretrain.recipe import recipe_from_dict

    model = {**TINY_HERO, "architecture": architecture}
    if architecture != "hierarchical":
        model.update(video_layers=1, cross_layers=1)
    return recipe_from_dict({
        "data": {"mode": "video", "max_frames": 16}, "model": model, "mixing": "sum",
        "train": {"max_steps": steps, "checkpoint_every": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 10,
                  "num_workers": 0, "log_every": 50, "device": "cpu", "threads": 2, "schedule": "constant"},
        "objectives": {o: {} for o in objectives}})


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    from videolm.pretrain.trainer import run_pretrain

    root = tmp_path_factory.mktemp("moments")
    features, manifest = write_moment_data(root)
    run_pretrain(tiny_hero(300), features, manifest, root / "run", progress=False)
    return root, features, manifest


def test_tiny_overfit_run_localises_its_training_captions(overfit_run, capsys):
    from videolm.cli import main

    root, features, manifest = overfit_run
    out = root / "captions.json"
    assert main(["eval-moments", "--checkpoint", str(root / "run"), "--features", str(features), "--manifest",
                 str(manifest), "--split", "train", "--context", "captions", "--bootstrap", "200",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 whole-video" in printed and "SVMR:" in printed and "VCMR:" in printed
    rep = json.loads(out.read_text())
    assert rep["excluded"]["whole_video"] == 1 and rep["n_queries"] == 21
    # the training condition (the query's line among the local level's inputs): learnt
    assert rep["SVMR"]["metrics"]["R@1 IoU=0.5"] >= 80 and rep["SVMR"]["metrics"]["R@1 IoU=0.7"] >= 70
    assert rep["VCMR"]["metrics"]["R@1 IoU=0.5"] >= 60 and rep["VR"]["metrics"]["R@1"] >= 70
    rows = [json.loads(line) for line in (root / "captions.spans.jsonl").read_text().splitlines()]
    assert len(rows) == 21 and all(len(r["svmr"]) <= 10 and r["svmr"][0][0] <= r["svmr"][0][1] for r in rows)
    assert sum(r["svmr_iou1"] >= 0.5 for r in rows) == round(rep["SVMR"]["metrics"]["R@1 IoU=0.5"] * 21 / 100)

    # the clips alone (no caption in the input): weaker, still well above chance
    from videolm.moments.job import MomentConfig, run_moments

    alone = run_moments(root / "run", features, manifest, MomentConfig(split="train", context="video", bootstrap=200))
    assert alone["SVMR"]["metrics"]["R@10 IoU=0.5"] >= 70
    assert alone["SVMR"]["metrics"]["mIoU"] >= 15


def test_models_without_vsm_heads_are_refused(tmp_path):
    from videolm.moments.job import MomentConfig, run_moments
    from videolm.pretrain.trainer import run_pretrain
    from videolm.retrieval.queries import EvalError

    features, manifest = write_moment_data(tmp_path)
    run_pretrain(tiny_hero(1, ("joint",), "two_stream"), features, manifest, tmp_path / "run", progress=False)
    with pytest.raises(EvalError, match="vsm objective.*'two_stream' trained with joint.*no start/end heads"):
        run_moments(tmp_path / "run", features, manifest, MomentConfig(split="train"))
