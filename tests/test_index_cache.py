"""The faiss index cache of eval-retrieval: reuse, invalidation, damaged files, off, atomic writes."""

import json
import logging

import faiss
import numpy as np
import pytest

import videolm.retrieval.index_cache as ic
from test_train import tiny, write_data
from videolm.cli import main
from videolm.features.layout import INDEX_CACHE_DIR, shard_name
from videolm.features.shards import FeatureStore, ShardWriter
from videolm.pretrain.trainer import run_pretrain
from videolm.retrieval.evaluate import EvalConfig, evaluate_embeddings
from videolm.retrieval.job import index_cache_for, index_report
from videolm.retrieval.queries import QuerySet
from videolm.retrieval.search import SearchConfig

N, DIM = 400, 16


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    videos = rng.normal(size=(N, DIM)).astype(np.float32)
    videos /= np.linalg.norm(videos, axis=1, keepdims=True)
    texts = (videos + 0.4 * rng.normal(size=videos.shape)).astype(np.float32)
    ids = [f"v{i:03d}" for i in range(N)]
    return QuerySet(ids, [f"text {i}" for i in range(N)], ids, np.arange(N)), texts, videos


def write_shard(features, index, seed):
    rng = np.random.default_rng(seed)
    w = ShardWriter(features / shard_name(index), DIM, {"encoder": "pixels", "config": json.dumps({})})
    for i in range(3):
        w.add_video(f"s{index}-{i}", rng.normal(size=(4, DIM)).astype(np.float32), np.arange(4.0),
                    np.arange(4.0) + 1, 4.0)
    w.finish()


@pytest.fixture
def store(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    for s in range(2):
        write_shard(features, s, seed=s)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    s = FeatureStore(features)
    s.model = ic.model_fields(ckpt, 4, False, 0)  # what run_eval passes for a checkpoint at step 4
    yield s
    s.close()


@pytest.fixture
def builds(monkeypatch):
    """Counts the indexes the cache builds (it reads and saves the rest)."""
    count = {"n": 0}
    real = ic.new_index

    def spy(gallery, cfg):
        count["n"] += 1
        return real(gallery, cfg)

    monkeypatch.setattr(ic, "new_index", spy)
    return count


def cfg_of(mode="faiss-ivf", cache="auto", **search):
    # one faiss thread: an HNSW graph built twice is then the same, so rankings compare exactly
    search = {"k": 20, "nlist": 8, "threads": 1, **search}
    return EvalConfig(search=SearchConfig(mode=mode, **search), bootstrap=20, index_cache=cache)


def evaluate(store, vectors, cfg, videos=None):
    qs, texts, vids = vectors
    part, results = evaluate_embeddings(qs, texts, vids if videos is None else videos, cfg,
                                        cache=index_cache_for(store, cfg, store.model))
    return part, results, index_report(results, cfg)


def ranks(part):
    return {d: part[d]["per_query"]["ranks"] for d in ("t2v", "v2t")}


def cache_files(store):
    d = store.directory / INDEX_CACHE_DIR
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.parametrize("mode", ["faiss-ivf", "faiss-hnsw"])
def test_second_call_reuses_the_index_and_ranks_like_a_fresh_build(store, vectors, builds, mode, caplog):
    cfg = cfg_of(mode)
    first, _, rep1 = evaluate(store, vectors, cfg)
    assert builds["n"] == 2 and rep1["t2v"]["status"] == "built" and rep1["t2v"]["saved"] is True
    assert len(cache_files(store)) == 4  # index + sidecar for the video and the text gallery
    with caplog.at_level(logging.INFO, logger="videolm"):
        second, results, rep2 = evaluate(store, vectors, cfg)
    assert builds["n"] == 2 and rep2["t2v"]["status"] == rep2["v2t"]["status"] == "reused"
    assert "load_s" in rep2["t2v"] and rep2["t2v"]["file"] == rep1["t2v"]["file"]
    assert "reusing index" in caplog.text
    fresh, fresh_results = evaluate_embeddings(vectors[0], vectors[1], vectors[2], cfg)  # no cache at all
    assert ranks(second) == ranks(first) == ranks(fresh)
    assert second["t2v"]["metrics"] == fresh["t2v"]["metrics"]
    assert np.array_equal(results["t2v"].top_ids, fresh_results["t2v"].top_ids)
    assert results["t2v"].params == fresh_results["t2v"].params


def test_changed_features_or_vectors_force_a_rebuild(store, vectors, builds, caplog):
    cfg = cfg_of()
    evaluate(store, vectors, cfg)
    before = cache_files(store)
    write_shard(store.directory, 1, seed=9)  # shard 1 re-extracted with other content
    fingerprint = store.fingerprint()
    store.close()
    changed = FeatureStore(store.directory)
    changed.model = store.model
    try:
        assert changed.fingerprint() != fingerprint
        with caplog.at_level(logging.INFO, logger="videolm"):
            _, _, rep = evaluate(changed, vectors, cfg)
        assert builds["n"] == 4 and rep["t2v"]["status"] == "built"
        assert rep["t2v"]["reason"].startswith("features_fingerprint differ") and "features_fingerprint" in caplog.text
        after = cache_files(changed)
        assert len(after) == 4 and not set(after) & set(before)  # the old key's files replaced, not kept beside
        videos = vectors[2].copy()
        videos[0, 0] += 1e-3  # same features and checkpoint, other gallery vectors (e.g. another --batch-size)
        _, _, rep = evaluate(changed, vectors, cfg, videos)
    finally:
        changed.close()
    assert rep["t2v"]["status"] == "built" and "vectors_sha256" in rep["t2v"]["reason"]
    assert "features_fingerprint" not in rep["t2v"]["reason"]
    assert rep["v2t"]["status"] == "reused"  # its gallery, the texts, did not change


def test_build_parameters_key_the_index_but_search_settings_do_not(store, vectors, builds):
    evaluate(store, vectors, cfg_of())
    _, _, rep = evaluate(store, vectors, cfg_of(nprobe=2, ef_search=7, k=30))  # search-time: same index
    assert builds["n"] == 2 and rep["t2v"]["status"] == "reused"
    _, results, rep = evaluate(store, vectors, cfg_of(nlist=4))
    assert builds["n"] == 4 and rep["t2v"]["status"] == "built" and results["t2v"].params["nlist"] == 4
    evaluate(store, vectors, cfg_of("faiss-hnsw"))
    _, _, rep = evaluate(store, vectors, cfg_of("faiss-hnsw", hnsw_m=8))
    assert builds["n"] == 8 and rep["t2v"]["status"] == "built"
    assert len(cache_files(store)) == 16  # four settings x two galleries, each an index and its sidecar


def test_damaged_cache_files_warn_and_are_rebuilt(store, vectors, builds, caplog):
    cfg = cfg_of()
    first, _, rep = evaluate(store, vectors, cfg)
    index_path = rep["t2v"]["file"]
    raw = bytearray(open(index_path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte among the stored vectors: faiss itself would not notice
    open(index_path, "wb").write(bytes(raw))
    with open(rep["v2t"]["file"][: -len(".faiss")] + ".json", "w") as f:
        f.write("{not json")
    with caplog.at_level(logging.WARNING, logger="videolm"):
        again, _, rep2 = evaluate(store, vectors, cfg)
    assert index_path in caplog.text and "sha256" in caplog.text and "sidecar" in caplog.text
    assert builds["n"] == 4 and rep2["t2v"]["status"] == rep2["v2t"]["status"] == "built"
    assert ranks(again) == ranks(first)
    _, _, rep3 = evaluate(store, vectors, cfg)  # rewritten whole: reused again
    assert builds["n"] == 4 and rep3["t2v"]["status"] == "reused"


def test_off_never_writes_and_rebuild_always_builds(store, vectors, builds):
    _, _, rep = evaluate(store, vectors, cfg_of(cache="off"))
    assert builds["n"] == 2 and rep["t2v"]["reason"] == "--index-cache off" and cache_files(store) == []
    evaluate(store, vectors, cfg_of())
    saved = cache_files(store)
    _, _, rep = evaluate(store, vectors, cfg_of(cache="rebuild"))
    assert builds["n"] == 6 and rep["t2v"]["status"] == "built" and rep["t2v"]["saved"] is True
    assert cache_files(store) == saved  # the same key's files, written again
    assert evaluate(store, vectors, cfg_of())[2]["t2v"]["status"] == "reused"


def test_exact_and_flat_have_nothing_cached(store, vectors, builds):
    assert evaluate(store, vectors, EvalConfig(bootstrap=20))[2] is None
    _, _, rep = evaluate(store, vectors, cfg_of("faiss-flat"))
    assert rep["t2v"]["status"] == "built" and "not cached" in rep["t2v"]["reason"] and cache_files(store) == []


def test_failed_write_leaves_no_file_and_warns_once(store, vectors, builds, monkeypatch, caplog):
    def half_write(index, path):
        with open(path, "wb") as f:
            f.write(b"IxHF" + b"\0" * 100)  # the start of an index, then the disk fills up
        raise RuntimeError("Error in faiss::FileIOWriter: fwrite failed (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", half_write)
    cfg = cfg_of()
    first, _, _ = evaluate(store, vectors, cfg_of(cache="off"))
    with caplog.at_level(logging.WARNING, logger="videolm"):
        part, _, rep = evaluate(store, vectors, cfg)
    assert cache_files(store) == []  # neither the final name nor the temporary one
    assert caplog.text.count("cannot write in") == 1 and "No space left" in caplog.text
    assert rep["t2v"]["saved"] is False and rep["v2t"]["saved"] is False and ranks(part) == ranks(first)


def test_unwritable_folder_falls_back_to_building(store, vectors, builds, caplog):
    (store.directory / INDEX_CACHE_DIR).write_text("")  # stands for a read-only features directory
    with caplog.at_level(logging.WARNING, logger="videolm"):
        _, _, rep = evaluate(store, vectors, cfg_of())
    assert caplog.text.count("cannot write in") == 1 and rep["t2v"]["status"] == "built"


def test_eval_cli_reuses_its_index_and_reports_it(tmp_path):
    features, manifest = write_data(tmp_path, quantize=False)
    run_pretrain(tiny({"joint": {"weight": 1.0}}), features, manifest, tmp_path / "run", progress=False)
    common = ["eval-retrieval", "--checkpoint", str(tmp_path / "run"), "--features", str(features), "--manifest",
              str(manifest), "--split", "train", "--quiet", "--bootstrap", "50", "--search", "faiss-hnsw"]
    reports = []
    for name, extra in (("a", []), ("b", []), ("c", ["--index-cache", "off"])):
        assert main(common + extra + ["--out", str(tmp_path / f"{name}.json")]) == 0
        reports.append(json.loads((tmp_path / f"{name}.json").read_text()))
    a, b, c = reports
    assert [r["index"]["t2v"]["status"] for r in reports] == ["built", "reused", "built"]
    assert b["index"]["cache"] == "auto" and c["index"]["cache"] == c["eval_config"]["index_cache"] == "off"
    assert a["t2v"]["per_query"] == b["t2v"]["per_query"] and a["v2t"]["per_query"] == b["v2t"]["per_query"]
    sidecar = json.loads((tmp_path / a["index"]["t2v"]["file"]).with_suffix(".json").read_text())
    assert sidecar["key"]["step"] == 4 and sidecar["gallery_ids"] == a["t2v"]["per_query"]["keys"]
    assert sidecar["slot"]["gallery"] == "videos" and sidecar["slot"]["split"] == "train"
