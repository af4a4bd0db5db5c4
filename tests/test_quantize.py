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
import videolm.quantize.kmeans as kmeans
from videolm.quantize.kmeans import Codebook, QuantizeConfig, fit_codebook, normalize_rows
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


# --------------------------------------------------------------------------- the reference walk
# Codebook.assign as it was before it was vectorised (a Python loop over each chunk's nodes),
# kept verbatim as the reference: the fast assignment must give exactly its words and paths.


def reference_nearest(x, centroids, c_sq=None, chunk=16384):
    if c_sq is None:
        c_sq = np.einsum("ij,ij->i", centroids, centroids)
    idx = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for a in range(0, len(x), chunk):
        xc = x[a : a + chunk]
        d = c_sq[None, :] - 2.0 * (xc @ centroids.T)
        i = np.argmin(d, axis=1)
        idx[a : a + chunk] = i
        dist[a : a + chunk] = np.maximum(d[np.arange(len(xc)), i] + np.einsum("ij,ij->i", xc, xc), 0.0)
    return idx, dist


def reference_assign(cb, x, chunk=32768):
    n = len(x)
    paths = np.zeros((n, cb.depth), dtype=np.int16)
    dists = np.zeros((n, cb.depth), dtype=np.float32)
    node_sq = [np.einsum("ij,ij->i", lv["centroids"], lv["centroids"]) for lv in cb.levels]
    for a in range(0, n, chunk):
        xc = x[a : a + chunk]
        node = np.zeros(len(xc), dtype=np.int64)
        for l, level in enumerate(cb.levels):
            if l == 0:
                first = np.zeros(1, dtype=np.int64)
                count = np.array([len(level["centroids"])])
            else:
                first, count = cb.levels[l - 1]["first_child"], cb.levels[l - 1]["num_children"]
            order = np.argsort(node, kind="stable")
            parents, starts = np.unique(node[order], return_index=True)
            ends = np.append(starts[1:], len(order))
            child = np.empty(len(xc), dtype=np.int64)
            for p, s, e in zip(parents, starts, ends):
                rows = order[s:e]
                lo, hi = int(first[p]), int(first[p] + count[p])
                j, d = reference_nearest(xc[rows], level["centroids"][lo:hi], node_sq[l][lo:hi])
                child[rows] = lo + j
                dists[a + rows, l] = d
            node = child
            paths[a : a + len(xc), l] = level["child_index"][node]
    k_pow = cb.k ** np.arange(cb.depth - 1, -1, -1, dtype=np.int64)
    words = (paths.astype(np.int64) * k_pow).sum(axis=1)
    return words.astype(np.int32), paths, dists


def assert_same_as_reference(cb, x, chunk=32768):
    words, paths, dists = cb.assign(x, chunk=chunk)
    ref_words, ref_paths, ref_dists = reference_assign(cb, x, chunk)
    np.testing.assert_array_equal(words, ref_words)
    np.testing.assert_array_equal(paths, ref_paths)
    assert words.dtype == ref_words.dtype and paths.dtype == ref_paths.dtype and dists.dtype == ref_dists.dtype
    # distances only to float32 rounding: a product's last bits depend on its shape
    np.testing.assert_allclose(dists, ref_dists, rtol=1e-5, atol=1e-6 * max(1.0, float(ref_dists.max())))
    return words


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
    assert_same_as_reference(cb, test, chunk=128)
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
    assert_same_as_reference(cb, x, chunk=1000)


def test_small_clusters_get_fewer_children_deterministically():
    x = normalize_rows(blobs(20, centres=3, seed=5), "l2")
    cfg = QuantizeConfig(k=4, levels=3, sample=20)
    cb, _ = fit_codebook(x, cfg)
    counts = cb.levels[1]["num_children"]
    assert (counts <= 4).all() and (counts >= 1).all() and counts.min() < 4
    words = assert_same_as_reference(cb, x)
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


# --------------------------------------------------------------------------- fast assignment = the reference


@pytest.mark.parametrize("k,levels,dim,normalize,chunk", [
    (3, 3, 16, "l2", 32768), (4, 3, 16, "l2", 97), (12, 2, 64, "l2", 1000), (2, 6, 8, "none", 500),
    (5, 2, 32, "none", 32768), (40, 1, 16, "none", 300),
])
def test_assign_matches_the_reference_walk(k, levels, dim, normalize, chunk):
    x = normalize_rows(blobs(2000, dim=dim, seed=k + levels), normalize)
    cb, _ = fit_codebook(x, QuantizeConfig(k=k, levels=levels, sample=2000, normalize=normalize))
    test = normalize_rows(blobs(3000, dim=dim, seed=99) * (10.0 if normalize == "none" else 1.0), normalize)
    assert_same_as_reference(cb, test, chunk)


def integer_codebook(k, levels, dim, seed):
    """A full tree of small-integer centroids (float32 arithmetic on them is exact, so scores tie exactly),
    some siblings duplicated."""
    rng = np.random.default_rng(seed)
    tree, n_prev = [], 1
    for l in range(levels):
        n = n_prev * k
        cents = rng.integers(-2, 3, (n, dim)).astype(np.float32)
        cents[k - 1 :: k * 2] = cents[0 :: k * 2]  # every other node: its last child copies its first
        tree.append({"centroids": cents, "parent": np.repeat(np.arange(n_prev), k),
                     "child_index": np.tile(np.arange(k), n_prev)})
        if l:
            tree[l - 1].update(first_child=np.arange(n_prev) * k, num_children=np.full(n_prev, k))
        n_prev = n
    tree[-1].update(first_child=np.zeros(n_prev, np.int64), num_children=np.zeros(n_prev, np.int64))
    return Codebook(k, tree, "none")


@pytest.mark.parametrize("close_call", [None, 0.0, np.inf])
def test_exact_ties_and_duplicate_centroids_match_the_reference(monkeypatch, close_call):
    if close_call is not None:  # 0: only exact ties are re-scored; inf: every choice is
        monkeypatch.setattr(kmeans, "_CLOSE_CALL", close_call)
    for k, levels, dim in [(3, 3, 4), (4, 2, 2), (12, 2, 3)]:
        cb = integer_codebook(k, levels, dim, seed=k)
        x = np.random.default_rng(k).integers(-3, 4, (3000, dim)).astype(np.float32)
        x = np.concatenate([x, cb.levels[-1]["centroids"], cb.levels[0]["centroids"] / 2])  # on and between words
        words = assert_same_as_reference(cb, x, chunk=700)
        d0 = cb.levels[0]["centroids"]
        scores = (d0**2).sum(1)[None, :] - 2 * x @ d0.T
        tied = (scores == scores.min(1, keepdims=True)).sum(1) > 1
        assert tied.mean() > 0.2  # the data does exercise ties
        np.testing.assert_array_equal(words // k ** (levels - 1), scores.argmin(1))  # the first child wins


def test_near_ties_go_to_the_reference_and_clear_choices_do_not(monkeypatch):
    calls = []
    real = kmeans.nearest
    monkeypatch.setattr(kmeans, "nearest", lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw))
    x = normalize_rows(blobs(2000, dim=32, seed=12), "l2")
    cb, _ = fit_codebook(x, QuantizeConfig(k=6, levels=3, sample=2000))
    calls.clear()
    cb.assign(x)
    assert len(calls) < 20  # a few groups at most: no per-node loop
    # points exactly halfway between two siblings: each is re-scored with its node's whole group
    c = cb.levels[1]["centroids"]
    mid = normalize_rows((c[0:1] + c[1:2]) / 2, "none").repeat(5, axis=0)
    calls.clear()
    assert_same_as_reference(cb, np.concatenate([x[:300], mid]))
    assert calls


def test_assign_in_small_pieces_matches_the_reference(monkeypatch):
    # one row per root slice, one tile per product, tiles of 1 to 7 rows, everything at once: edges of the tiling
    x = normalize_rows(blobs(1500, dim=16, seed=13), "l2")
    cb, _ = fit_codebook(x, QuantizeConfig(k=5, levels=3, sample=1500))
    for tiles, batch, root in [((1,), 1, 1), ((5, 3), 1, 64), ((7, 2), 10_000, 4096), ((64, 16, 4), 10**9, 10**9)]:
        monkeypatch.setattr(kmeans, "_TILES", tiles)
        monkeypatch.setattr(kmeans, "_BATCH_BYTES", batch)
        monkeypatch.setattr(kmeans, "_ROOT_BYTES", root)
        assert_same_as_reference(cb, x[:400], chunk=150)
    assert [len(v) for v in cb.assign(x[:0])] == [0, 0, 0]


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


def test_codebook_from_another_directory_tokenises_with_its_words(tmp_path):
    train = write_features(tmp_path / "train", seed=1)
    test = write_features(tmp_path / "test", n_shards=1, videos=2, clips=5, seed=2)  # fewer clips than k^2
    run_quantize(train, CFG, progress=False)
    s = run_quantize(test, None, progress=False, codebook_from=train)
    assert s["fit_seconds"] == 0 and s["config"] == json.loads(json.dumps(CFG.__dict__))
    cb, attrs = load_codebook(train / "codebook.h5")
    assert load_codebook(test / "codebook.h5")[1]["fingerprint"] == attrs["fingerprint"]
    v = FeatureStore(test).get("s0v1")
    np.testing.assert_array_equal(v.tokens, cb.assign(normalize_rows(v.features, "l2"))[0])
    # a codebook of other features is refused, as is replacing another codebook without --overwrite
    other = write_features(tmp_path / "s3d", n_shards=1, encoder="s3d")
    with pytest.raises(QuantizeError, match="fitted on features extracted with other settings"):
        run_quantize(other, None, progress=False, codebook_from=train / "codebook.h5")
    run_quantize(test, QuantizeConfig(k=2, levels=1, sample=100), overwrite=True, progress=False)
    with pytest.raises(QuantizeError, match="another codebook.*--overwrite"):
        run_quantize(test, None, progress=False, codebook_from=train)
    with pytest.raises(QuantizeError, match="no codebook there"):
        run_quantize(test, None, progress=False, codebook_from=tmp_path / "s3d")
