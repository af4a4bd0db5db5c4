import json

import numpy as np
import pytest

from videolm.errors import ConfigError
from videolm.pretrain.dataset import DataConfig, DataError, VideoTextDataset, caption_spans, merge_segments
from videolm.features.layout import shard_name
from videolm.features.shards import FeatureStore, ShardWriter
from videolm.manifests.manifest import Caption, VideoEntry

STARTS = np.arange(6, dtype=float)  # six 1-second clips: [0,1) [1,2) ... [5,6)
ENDS = STARTS + 1


def test_caption_spans_cover_overlapping_clips():
    caps = [Caption(0.5, 2.0, "a"), Caption(2.0, 2.0, "point"), Caption(4.2, 9.0, "b"), Caption(7, 8, "after")]
    assert caption_spans(STARTS, ENDS, caps).tolist() == [[0, 1], [2, 2], [4, 5], [-1, -1]]


def test_merge_segments_reaches_min_duration():
    caps = [Caption(0, 1, "a"), Caption(1, 2, "b"), Caption(2, 6, "c"), Caption(6, 6.5, "d")]
    assert merge_segments(caps, 0.0) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert merge_segments(caps, 2.0) == [(0, 1), (2, 3)]  # the short tail "d" joins "c"
    assert merge_segments(list(reversed(caps)), 2.0) == [(0, 1), (2, 3)]  # time order, not list order


def make_store(tmp_path, videos):
    cfg = json.dumps({"encoder": "pixels", "sampling": {}})
    w = ShardWriter(tmp_path / shard_name(0), 4, {"encoder": "pixels", "config": cfg})
    for vid, n in videos:
        feats = np.tile(np.arange(n, dtype=np.float32)[:, None], (1, 4))  # row i holds i
        w.add_video(vid, feats, np.arange(n, dtype=float), np.arange(n) + 1.0, float(n))
    w.finish()
    return FeatureStore(tmp_path)


def test_segment_examples(tmp_path):
    store = make_store(tmp_path, [("v1", 10), ("v2", 4)])
    entries = [
        VideoEntry("v1", "x", "train", captions=(Caption(5.5, 7.5, "late"), Caption(0.2, 1.5, "early"))),
        VideoEntry("v2", "x", "train", captions=(Caption(0, 4, "all"),)),
        VideoEntry("gone", "x", "train", captions=(Caption(0, 1, "never extracted"),)),
    ]
    ds = VideoTextDataset(store, entries, DataConfig(mode="segment", max_frames=2))
    assert len(ds) == 3 and ds.missing == 1
    first = ds[0]  # captions in time order: "early" first
    assert first["texts"] == ["early"] and first["features"][:, 0].tolist() == [0, 1]
    late = ds[1]
    assert late["texts"] == ["late"] and late["features"][:, 0].tolist() == [5, 6]  # 5..7 cut to max_frames
    assert late["text_spans"].tolist() == [[0, 1]] and late["tokens"] is None


def test_video_examples_crop_deterministically(tmp_path):
    store = make_store(tmp_path, [("v1", 30)])
    caps = tuple(Caption(float(t), t + 2.0, f"c{t}") for t in range(0, 30, 3))
    ds = VideoTextDataset(store, [VideoEntry("v1", "x", "train", captions=caps)],
                          DataConfig(mode="video", max_frames=8), seed=3)
    a = ds[0]
    assert len(a["features"]) == 8
    first = int(a["features"][0, 0])
    # subtitles are the captions overlapping the crop, with spans relative to it
    expected = [c.text for c in caps if c.start < first + 8 and c.end > first]
    assert a["texts"] == expected and (a["text_spans"] >= 0).all()
    assert (ds[0]["features"] == a["features"]).all()  # same epoch, same crop
    crops = set()
    for epoch in range(8):
        crops.add(int(ds[(0, epoch)]["features"][0, 0]))
    assert len(crops) > 1


def test_errors(tmp_path):
    store = make_store(tmp_path, [("v1", 3)])
    with pytest.raises(DataError, match="none of the 1 manifest videos"):
        VideoTextDataset(store, [VideoEntry("zz", "x", "train")], DataConfig())
    with pytest.raises(ConfigError, match="mode 'tokens' was removed.*video_input: tokens"):
        DataConfig(mode="tokens")
    with pytest.raises(DataError, match="has a caption overlapping its clips"):
        VideoTextDataset(store, [VideoEntry("v1", "x", "train")], DataConfig())


def test_captions_outside_clips_are_counted_and_skipped(tmp_path, caplog):
    store = make_store(tmp_path, [("v1", 3), ("v2", 4)])
    entries = [VideoEntry("v1", "x", "train", captions=(Caption(0, 1, "in"), Caption(7, 9, "past the end"))),
               VideoEntry("v2", "x", "train", captions=(Caption(10, 12, "also past"),))]
    for mode in ("segment", "video"):
        ds = VideoTextDataset(store, entries, DataConfig(mode=mode))
        assert ds.uncovered == 2 and len(ds) == 1 and ds[0]["texts"] == ["in"]
    assert "2 caption(s) overlap no clip" in caplog.text and "v1 [7.00, 9.00] s" in caplog.text
    with pytest.raises(DataError, match="has a caption overlapping"):
        VideoTextDataset(store, entries[1:], DataConfig())


def test_a_plain_index_is_epoch_0(tmp_path):
    store = make_store(tmp_path, [("v1", 30)])
    caps = (Caption(0.0, 30.0, "all"),)
    ds = VideoTextDataset(store, [VideoEntry("v1", "x", "train", captions=caps)], DataConfig(mode="video", max_frames=4))
    np.testing.assert_array_equal(ds[0]["features"], ds[(0, 0)]["features"])


def test_examples_carry_visual_words_of_quantised_features(tmp_path):
    from videolm.quantize.kmeans import QuantizeConfig
    from videolm.quantize.job import run_quantize

    make_store(tmp_path, [("v1", 12)]).close()
    run_quantize(tmp_path, QuantizeConfig(k=2, levels=2, sample=12, normalize="none"), progress=False)
    store = FeatureStore(tmp_path)
    ds = VideoTextDataset(store, [VideoEntry("v1", "x", "train", captions=(Caption(2, 5, "a"),))], DataConfig())
    ex = ds[0]
    np.testing.assert_array_equal(ex["tokens"], store.get("v1").tokens[2:5])


def _owner_naive(starts, ends, times):
    out = []
    for cs, ce in zip(starts, ends):
        best, best_iou = -1, 0.0
        for j, (s, e) in enumerate(times):
            inter = max(0.0, min(ce, e) - max(cs, s))
            union = max(ce, e) - min(cs, s)
            iou = inter / union if union > 0 else 0.0
            if iou > best_iou:  # strictly larger: ties keep the earlier subtitle
                best, best_iou = j, iou
        out.append(best)
    return out


def test_clip_owner_is_the_subtitle_with_the_largest_iou():
    from videolm.pretrain.collate import clip_owner

    times = np.array([[0.5, 2.0], [1.8, 3.5], [5.5, 9.0]])
    # clip 1: IoU 1/1.5 with the first, 0.2/2.5 with the second; clip 4 overlaps none
    assert clip_owner(STARTS, ENDS, times).tolist() == [0, 0, 1, 1, -1, 2]
    assert clip_owner(STARTS, ENDS, np.zeros((0, 2))).tolist() == [-1] * 6
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, m = int(rng.integers(1, 12)), int(rng.integers(0, 6))
        starts = np.sort(rng.uniform(0, 20, n))
        ends = starts + rng.uniform(0.1, 3, n)
        s = rng.uniform(0, 20, m)
        subs = np.stack([s, s + rng.uniform(0, 5, m)], 1) if m else np.zeros((0, 2))
        assert clip_owner(starts, ends, subs).tolist() == _owner_naive(starts, ends, subs)
