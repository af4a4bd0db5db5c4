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


def _quantised_store(tmp_path, videos):
    from videolm.quantize.kmeans import QuantizeConfig
    from videolm.quantize.job import run_quantize

    make_store(tmp_path, videos).close()
    run_quantize(tmp_path, QuantizeConfig(k=2, levels=2, sample=100, normalize="none"), progress=False)
    return FeatureStore(tmp_path)


def test_a_ranged_read_equals_the_whole_video_sliced(tmp_path):
    store = _quantised_store(tmp_path, [("v1", 12), ("v2", 70), ("v3", 1)])
    rng = np.random.default_rng(0)
    for vid in ("v1", "v2", "v3"):
        full = store.get(vid)
        n = len(full.features)
        windows = [(0, None), (0, n), (n - 1, n), (0, n + 5), (n + 2, n + 9), (3, 1)]
        windows += [tuple(sorted(int(x) for x in rng.integers(0, n + 1, 2))) for _ in range(20)]
        for a, b in windows:
            part, sl = store.get(vid, a, b), slice(a, b)
            assert part.features.dtype == np.float32 and part.duration == full.duration
            for name in ("features", "starts", "ends", "tokens", "token_paths"):
                np.testing.assert_array_equal(getattr(part, name), getattr(full, name)[sl], err_msg=f"{vid} {name} {sl}")


def test_examples_read_only_their_clips_and_keep_the_rows_of_the_whole_video(tmp_path):
    store = _quantised_store(tmp_path, [("v1", 40), ("v2", 9)])
    caps = tuple(Caption(float(t), t + 2.5, f"c{t}") for t in range(0, 40, 3))
    entries = [VideoEntry("v1", "x", "train", captions=caps), VideoEntry("v2", "x", "train", captions=caps[:2])]
    reads = []
    get = store.get
    store.get = lambda vid, start=0, stop=None: reads.append((vid, start, stop)) or get(vid, start, stop)
    for mode, seconds in (("segment", 0.0), ("segment", 6.0), ("video", 0.0)):
        ds = VideoTextDataset(store, entries, DataConfig(mode=mode, max_frames=8, min_segment_seconds=seconds), seed=1)
        for item in [(i, epoch) for i in range(len(ds)) for epoch in range(3)]:
            reads.clear()
            ex = ds[item]
            full = get(ex["video_id"])
            first = int(np.searchsorted(full.starts, ex["clip_starts"][0]))
            rows = slice(first, first + len(ex["features"]))
            assert reads == [(ex["video_id"], first, rows.stop)]  # one read, of the example's clips only
            np.testing.assert_array_equal(ex["features"], full.features[rows])
            np.testing.assert_array_equal(ex["tokens"], full.tokens[rows])
            np.testing.assert_array_equal(ex["clip_ends"], full.ends[rows])
            assert len(ex["features"]) <= 8 and len(ex["texts"]) == len(ex["text_spans"]) > 0


TRICKY_TEXTS = ["hello world", "Café au lait, s'il vous plaît!", "日本語のテキスト mixed", "", "  spaced   out  ",
                "tab\there\nnewline", "don't stop-believing...", "x" * 150, "ÀÉÎÕÜ accents", "emoji 🙂 test",
                "numbers 3.14159 and 1,000,000", "[MASK] literal [SEP]", "##sub words", " ".join(["long"] * 60)]


def test_cached_tokenisation_gives_the_tensors_of_fresh_tokenisation():
    import torch

    from videolm.model.inputs import tokenize
    from videolm.model.text import load_tokenizer
    from videolm.pretrain.collate import Collator

    tok = load_tokenizer(None)
    collate = Collator(tok, max_text_len=20, max_sub_len=10, max_subs=3)
    rng = np.random.default_rng(0)
    for _ in range(60):  # captions come back across batches: later ones are served from the cache
        examples = []
        for i in range(int(rng.integers(1, 5))):
            texts = list(rng.choice(TRICKY_TEXTS, int(rng.integers(1, 6))))
            n = len(texts)
            examples.append({"video_id": f"v{i}", "features": np.zeros((n, 2), np.float32), "tokens": None,
                             "clip_starts": np.arange(n, dtype=float), "clip_ends": np.arange(n) + 1.0,
                             "texts": texts, "text_spans": np.stack([np.arange(n)] * 2, 1),
                             "text_times": np.stack([np.arange(n), np.arange(n) + 1.0], 1).astype(np.float32)})
        batch = collate(examples)
        ids, mask = tokenize(tok, [" ".join(e["texts"]) for e in examples], 20)
        assert torch.equal(batch["text_ids"], ids) and torch.equal(batch["text_mask"], mask)
        sub_ids, sub_mask = tokenize(tok, [t for e in examples for t in e["texts"][:3]], 10)
        valid = batch["sub_valid"]
        assert batch["sub_ids"].shape[-1] == sub_ids.shape[-1]
        assert torch.equal(batch["sub_ids"][valid], sub_ids) and torch.equal(batch["sub_mask"][valid], sub_mask)
        assert not batch["sub_mask"][~valid].any()
    assert len(collate.words._ids) == len(set(TRICKY_TEXTS))  # one entry per distinct text
