import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from videolm.features.hdf5 import ShardError
from videolm.features.layout import list_shards, shard_name, token_path
from videolm.features.shards import FeatureStore, ShardWriter
from videolm.model.inputs import VISUAL_TOKEN_OFFSET
from videolm.quantize.kmeans import QuantizeConfig, fit_codebook, normalize_rows
from videolm.quantize.job import QuantizeError, load_codebook, run_quantize


def blobs(n, dim=16, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)) * 4
    return (c[rng.integers(0, centres, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def brute_force_walk(cb, x):
    """Reference: at each level, the nearest child of the current node by direct (x - c)^2."""
    words, paths = [], []
    for v in x:
        node, path = None, []
        for l, level in enumerate(cb.levels):
            if l == 0:
                lo, hi = 0, len(level["centroids"])
            else:
                prev = cb.levels[l - 1]
                lo, hi = prev["first_child"][node], prev["first_child"][node] + prev["num_children"][node]
            d = ((level["centroids"][lo:hi] - v) ** 2).sum(1)
            node = lo + int(np.argmin(d))
            path.append(int(level["child_index"][node]))
        paths.append(path)
        words.append(sum(p * cb.k ** (len(path) - 1 - i) for i, p in enumerate(path)))
    return np.array(words), np.array(paths)


def test_tree_structure_and_paths():
    cfg = QuantizeConfig(k=3, levels=3, sample=3000, seed=1)
    cb, inertia = fit_codebook(normalize_rows(blobs(3000), "l2"), cfg)
    assert cb.vocab_size == 27 and len(cb.levels) == 3 and len(inertia) == 3
    assert inertia[0] > inertia[1] > inertia[2]  # deeper levels fit tighter
    assert len(cb.levels[-1]["centroids"]) == 27  # enough data: a full tree
    for l in range(1, 3):
        prev, level = cb.levels[l - 1], cb.levels[l]
        for p in range(len(prev["centroids"])):
            a, n = prev["first_child"][p], prev["num_children"][p]
            assert (level["parent"][a : a + n] == p).all()
            assert level["child_index"][a : a + n].tolist() == list(range(n))
    words = cb.leaf_words()
    assert sorted(words.tolist()) == list(range(27))


def test_assignment_matches_brute_force_at_every_level():
    x = normalize_rows(blobs(2000, seed=2), "l2")
    cfg = QuantizeConfig(k=4, levels=3, sample=2000, seed=0)
    cb, _ = fit_codebook(x, cfg)
    test = normalize_rows(blobs(500, seed=3), "l2")
    words, paths, dists = cb.assign(test, chunk=128)
    ref_words, ref_paths = brute_force_walk(cb, test)
    np.testing.assert_array_equal(paths, ref_paths)
    np.testing.assert_array_equal(words, ref_words)
    assert (words == (paths.astype(int) * np.array([16, 4, 1])).sum(1)).all()
    assert dists.shape == (500, 3) and (dists >= 0).all()


def test_flat_codebook_equals_faiss_exact_search():
    import faiss

    x = blobs(3000, dim=24, seed=4)
    cb, _ = fit_codebook(normalize_rows(x, "none"), QuantizeConfig(k=32, levels=1, sample=3000, normalize="none"))
    index = faiss.IndexFlatL2(24)
    index.add(cb.levels[0]["centroids"])
    _, ref = index.search(x, 1)
    words, _, _ = cb.assign(x)
    np.testing.assert_array_equal(words, ref[:, 0])


def test_small_clusters_get_fewer_children_deterministically():
    x = normalize_rows(blobs(20, centres=3, seed=5), "l2")
    cfg = QuantizeConfig(k=4, levels=3, sample=20)
    cb, _ = fit_codebook(x, cfg)
    counts = cb.levels[1]["num_children"]
    assert (counts <= 4).all() and (counts >= 1).all() and counts.min() < 4
    words, _, _ = cb.assign(x)
    assert (words < 64).all()
    cb2, _ = fit_codebook(x, cfg)
    assert cb.fingerprint() == cb2.fingerprint()


def test_seed_determinism_and_backends():
    x = normalize_rows(blobs(1500, seed=6), "l2")
    a, _ = fit_codebook(x, QuantizeConfig(k=5, levels=2, sample=1500, seed=7))
    b, _ = fit_codebook(x, QuantizeConfig(k=5, levels=2, sample=1500, seed=7))
    c, _ = fit_codebook(x, QuantizeConfig(k=5, levels=2, sample=1500, seed=8))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    s, _ = fit_codebook(x, QuantizeConfig(k=5, levels=2, sample=1500, backend="sklearn"))
    assert [lv["centroids"].shape for lv in s.levels] == [lv["centroids"].shape for lv in a.levels]


# --------------------------------------------------------------------------- over shards


def write_features(directory, n_shards=3, videos=6, clips=9, dim=16, seed=0, encoder="pixels"):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cfg = json.dumps({"encoder": encoder, "weights": None, "sampling": {"fps": 4.0}})
    for s in range(n_shards):
        w = ShardWriter(directory / shard_name(s), dim, {"encoder": encoder, "config": cfg, "manifest_sha256": "x"})
        for v in range(videos):
            feats = blobs(clips, dim=dim, seed=int(rng.integers(1 << 30)))
            w.add_video(f"s{s}v{v}", feats, np.arange(clips, dtype=float), np.arange(clips) + 1.0, clips)
        w.finish()
    return directory


def file_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


CFG = QuantizeConfig(k=3, levels=2, sample=100, seed=0)


def test_run_writes_tokens_beside_shards(tmp_path):
    d = write_features(tmp_path / "f")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(d)}
    s = run_quantize(d, CFG, report_dir=tmp_path / "report", progress=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(d)} == before  # untouched
    assert s["clips"] == 3 * 6 * 9 and s["vocab_size"] == 9 and s["token_offset"] == VISUAL_TOKEN_OFFSET
    assert s["sample_size"] == 100
    store = FeatureStore(d)
    v = store.get("s1v2")
    cb, attrs = load_codebook(d / "codebook.h5")
    words, paths, _ = cb.assign(normalize_rows(v.features, "l2"))
    np.testing.assert_array_equal(v.tokens, words)
    np.testing.assert_array_equal(v.token_paths, paths)
    assert attrs["model_vocab_size"] == 9 + VISUAL_TOKEN_OFFSET and json.loads(attrs["inertia_per_level"])
    # the model's id table as docs/formats.md states it: the special tokens take ids 0-4
    assert json.loads(attrs["special_tokens"]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert attrs["token_offset"] == 5
    summary = json.loads((tmp_path / "report" / "quantize_summary.json").read_text())
    assert summary["words_used"] == s["words_used"] and (tmp_path / "report" / "word_frequencies.png").stat().st_size
    assert sum(s["word_counts"]) == s["clips"]
    # same settings again: nothing refitted; other settings: refused unless --overwrite
    again = run_quantize(d, CFG, progress=False)
    assert again["fit_seconds"] == 0 and (again["word_counts"] == s["word_counts"]).all()
    with pytest.raises(QuantizeError, match="--overwrite"):
        run_quantize(d, QuantizeConfig(k=4, levels=2, sample=100), progress=False)
    run_quantize(d, QuantizeConfig(k=4, levels=2, sample=100), overwrite=True, progress=False)
    assert FeatureStore(d).get("s1v2").tokens.max() < 16


def test_interrupted_assignment_resumes_to_the_same_result(tmp_path, monkeypatch):
    import videolm.quantize.job as qj

    ref = write_features(tmp_path / "ref")
    run_quantize(ref, CFG, progress=False)
    d = write_features(tmp_path / "f")
    real, calls = qj._assign_shard, []

    def dies_on_third(reader, codebook):
        calls.append(reader.path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a kill between two shards
        return real(reader, codebook)

    monkeypatch.setattr(qj, "_assign_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(d, CFG, progress=False)
    assert not (d / "codebook.h5").exists() and not token_path(d / shard_name(0)).exists()  # nothing published
    monkeypatch.setattr(qj, "_assign_shard", real)
    run_quantize(d, CFG, progress=False)
    assert file_hashes(d).keys() == file_hashes(ref).keys()
    for s in range(3):
        a, b = FeatureStore(ref), FeatureStore(d)
        np.testing.assert_array_equal(a.get(f"s{s}v0").tokens, b.get(f"s{s}v0").tokens)
    assert load_codebook(d / "codebook.h5")[1]["fingerprint"] == load_codebook(ref / "codebook.h5")[1]["fingerprint"]


def test_sigkill_mid_run_then_rerun(tmp_path):
    shape = dict(n_shards=30, videos=40, clips=20, dim=32)
    ref = write_features(tmp_path / "ref", **shape)
    args = ["--k", "4", "--levels", "3", "--sample", "2000", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "videolm.cli", "quantize", *args, "--features"]
    assert subprocess.run([*cmd, str(ref)], env=env, capture_output=True).returncode == 0
    for attempt in range(3):  # a very fast machine may finish before the kill lands: try again
        d = write_features(tmp_path / f"f{attempt}", **shape)
        shards_before = {p.name: p.read_bytes() for p in list_shards(d)}
        proc = subprocess.Popen([*cmd, str(d)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if list(d.glob("*.tokens.h5.partial-*")):  # mid-assignment
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, "the run always finished before it could be killed"
    assert not (d / "codebook.h5").exists()
    assert {p.name: p.read_bytes() for p in list_shards(d)} == shards_before  # features never damaged
    assert subprocess.run([*cmd, str(d)], env=env, capture_output=True).returncode == 0
    assert not list(d.glob("*.partial-*"))
    a, b = FeatureStore(ref), FeatureStore(d)
    for vid in a.video_ids:
        np.testing.assert_array_equal(a.get(vid).tokens, b.get(vid).tokens)


def test_mixed_configs_are_refused_naming_the_shards(tmp_path):
    d = write_features(tmp_path / "f", n_shards=2)
    w = ShardWriter(d / shard_name(2), 16, {"encoder": "s3d", "config": json.dumps({"encoder": "s3d"})})
    w.add_video("x", blobs(3), np.zeros(3), np.ones(3), 1.0)
    w.finish()
    with pytest.raises(ShardError) as err:
        run_quantize(d, CFG, progress=False)
    assert "shard_00002.h5" in str(err.value) and "shard_00000.h5, shard_00001.h5" in str(err.value)
    assert not (d / "codebook.h5").exists()


def test_nan_features_error_and_nothing_written(tmp_path):
    d = write_features(tmp_path / "f")
    with h5py.File(d / shard_name(1), "r+") as f:
        f["features"][20, 3] = np.nan  # damage after the fact; the writer itself refuses NaN
    names = set(p.name for p in d.iterdir())
    with pytest.raises(QuantizeError, match=r"shard_00001.h5: NaN/inf features at row 20 \(video 's1v2'\)"):
        run_quantize(d, QuantizeConfig(k=3, levels=2, sample=10_000), progress=False)
    assert set(p.name for p in d.iterdir()) == names
    with pytest.raises(QuantizeError, match=r"row 20 \(video 's1v2'\)"):  # not in the sample: caught assigning
        run_quantize(d, QuantizeConfig(k=3, levels=2, sample=5), progress=False)
    with h5py.File(d / shard_name(1), "r+") as f:  # now in most samples, among rows not all picked
        f["features"][20:, 3] = np.nan
    with pytest.raises(QuantizeError, match=r"shard_00001.h5: NaN/inf features at row 2\d \(video 's1v2'\)"):
        run_quantize(d, QuantizeConfig(k=3, levels=2, sample=60), progress=False)
    assert set(p.name for p in d.iterdir()) == names


def test_no_shards_and_empty_shards(tmp_path):
    with pytest.raises(QuantizeError, match="no feature shards"):
        run_quantize(tmp_path, CFG, progress=False)
    w = ShardWriter(tmp_path / shard_name(0), 4, {"encoder": "pixels", "config": json.dumps({"encoder": "pixels"})})
    w.add_failure("a", "file does not exist")
    w.finish()
    with pytest.raises(QuantizeError, match="no clips"):
        run_quantize(tmp_path, CFG, progress=False)


def test_cli(tmp_path, capsys):
    from videolm.cli import main

    d = write_features(tmp_path / "f")
    assert main(["quantize", "--features", str(d), "--k", "3", "--levels", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "leaves used" in out and "entropy" in out
    assert main(["quantize", "--features", str(tmp_path / "none"), "--quiet"]) == 2
    assert "no feature shards" in capsys.readouterr().err
