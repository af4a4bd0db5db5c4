import json

import h5py
import numpy as np
import pytest

from videolm.features.hdf5 import ShardError
from videolm.features.layout import (
    CODEBOOK_NAME, list_shards, list_token_files, planned_shard_count, remove_partials, shard_count, shard_index,
    shard_name, token_path, unfinished_files, unfinished_quantize_files,
)
from videolm.features.shards import FeatureStore, ShardReader, ShardWriter


def make_shard(directory, index, videos, dim=6, config=None):
    attrs = {"encoder": "pixels", "config": json.dumps(config or {"encoder": "pixels", "sampling": {}})}
    w = ShardWriter(directory / shard_name(index), dim, attrs)
    for vid, n in videos:
        feats = np.arange(n * dim, dtype=np.float32).reshape(n, dim) / 7 + index
        w.add_video(vid, feats, np.arange(n, dtype=float), np.arange(n, dtype=float) + 1, n + 0.5)
    w.add_failure("bad", "file does not exist")
    return w


def test_round_trip(tmp_path):
    make_shard(tmp_path, 0, [("a", 3), ("b", 5)]).finish()
    with ShardReader(tmp_path / shard_name(0)) as r:
        assert r.video_ids == ["a", "b"] and r.dim == 6 and len(r) == 2
        b = r.get("b")
        expected = (np.arange(30, dtype=np.float32).reshape(5, 6) / 7).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(b.features, expected)
        np.testing.assert_array_equal(b.starts, np.arange(5))
        np.testing.assert_array_equal(b.ends, np.arange(5) + 1)
        assert b.duration == 5.5
        assert r.failures() == [("bad", "file does not exist")]
        assert r.attrs["num_clips"] == 8 and r.attrs["format_version"] == 1


def test_unfinished_shard_is_invisible_and_removable(tmp_path):
    w = make_shard(tmp_path, 3, [("a", 2)])
    assert list_shards(tmp_path) == []  # only a .partial file exists until finish()
    assert remove_partials(tmp_path, 3) == 1
    assert not any(tmp_path.iterdir())
    w._file.close()


def test_file_names_are_made_and_parsed_in_one_place(tmp_path):
    assert shard_name(12) == "shard_00012.h5" and shard_index(tmp_path / shard_name(12)) == 12
    assert token_path(tmp_path / shard_name(7)).name == "shard_00007.tokens.h5"
    assert shard_index(token_path(tmp_path / shard_name(7))) == 7
    names = [shard_name(0), "shard_1.h5", token_path(shard_name(0)).name, shard_name(1) + ".partial-host-1",
             token_path(shard_name(1)).name + ".partial-abc", CODEBOOK_NAME + ".tmp-host-2", "failures.jsonl.tmp-h-3"]
    for name in names:
        (tmp_path / name).touch()
    assert [p.name for p in list_shards(tmp_path)] == ["shard_00000.h5"]
    assert [p.name for p in list_token_files(tmp_path)] == ["shard_00000.tokens.h5"]
    assert {p.name for p in unfinished_files(tmp_path)} == set(names[3:])
    assert {p.name for p in unfinished_quantize_files(tmp_path)} == {names[4], names[5]}
    assert shard_count(8, 4) == 2 and shard_count(9, 4) == 3
    assert planned_shard_count({"num_videos": 9, "shard_size": 4}) == 3 and planned_shard_count({}) is None


def test_abort_leaves_nothing(tmp_path):
    make_shard(tmp_path, 0, [("a", 2)]).abort()
    assert not any(tmp_path.iterdir())


def test_layout_is_concatenated_with_offsets(tmp_path):
    make_shard(tmp_path, 0, [("a", 3), ("b", 5)]).finish()
    with h5py.File(tmp_path / shard_name(0)) as f:
        assert f["features"].shape == (8, 6) and f["features"].dtype == np.float16
        assert f["index/offset"][()].tolist() == [0, 3]
        assert f["index/num_clips"][()].tolist() == [3, 5]
        assert f["clip_times"].shape == (8, 2)


def test_writer_rejects_bad_features(tmp_path):
    w = make_shard(tmp_path, 0, [])
    with pytest.raises(ShardError, match="NaN"):
        w.add_video("x", np.full((2, 6), np.nan, np.float32), np.zeros(2), np.ones(2), 1.0)
    with pytest.raises(ShardError, match="expected"):
        w.add_video("x", np.zeros((2, 5), np.float32), np.zeros(2), np.ones(2), 1.0)
    w.abort()


def test_truncated_shard_is_a_clear_error(tmp_path):
    make_shard(tmp_path, 0, [("a", 300)]).finish()
    p = tmp_path / shard_name(0)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated"):
        ShardReader(p)


def test_store_addresses_videos_across_shards(tmp_path):
    make_shard(tmp_path, 0, [("a", 3)]).finish()
    make_shard(tmp_path, 1, [("b", 4)]).finish()
    store = FeatureStore(tmp_path)
    assert sorted(store.video_ids) == ["a", "b"] and store.get("b").features.shape == (4, 6)
    assert store.get("b").features[0, 0] == 1.0  # written by shard 1
    with pytest.raises(KeyError, match="not in the shards"):
        store.get("zzz")


def test_store_refuses_mixed_encoders(tmp_path):
    make_shard(tmp_path, 0, [("a", 3)]).finish()
    make_shard(tmp_path, 1, [("b", 3)], config={"encoder": "s3d", "sampling": {}}).finish()
    with pytest.raises(ShardError, match="different encoders"):
        FeatureStore(tmp_path)


def test_store_on_empty_directory(tmp_path):
    with pytest.raises(ShardError, match="no feature shards"):
        FeatureStore(tmp_path)
