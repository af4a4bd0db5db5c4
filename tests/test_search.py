"""Search: faiss-flat equals exact numpy, approximate modes agree on easy data, chunking and dual softmax."""

import numpy as np
import pytest

from videolm.errors import ConfigError
from videolm.retrieval.metrics import GroundTruth, ranks_from_scores
from videolm.retrieval.search import SEARCH_MODES, SearchConfig, search


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def data(seed=0, nq=120, ng=400, d=32, noise=0.6):
    rng = np.random.default_rng(seed)
    gallery = unit(rng.normal(size=(ng, d)))
    targets = rng.integers(0, ng, nq)
    queries = unit(gallery[targets] + noise * rng.normal(size=(nq, d)) / np.sqrt(d))
    return queries, gallery, GroundTruth.single(targets)


def test_exact_matches_full_matrix_and_lists_are_sorted():
    q, g, gt = data()
    r = search(q, g, gt, SearchConfig(chunk=7))
    want, _ = ranks_from_scores(q @ g.T, gt)
    np.testing.assert_array_equal(r.ranks, want)
    full = q @ g.T
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: (-full[i, j], j))[:10]
        assert r.top_ids[i].tolist() == order
        assert np.all(np.diff(r.top_scores[i]) <= 0)


def test_faiss_flat_equals_exact_including_ties():
    q, g, gt = data(seed=1)
    g[10:20] = g[0]  # duplicated videos tie exactly
    q[:5] = g[0]
    exact = search(q, g, gt, SearchConfig(mode="exact"))
    flat = search(q, g, gt, SearchConfig(mode="faiss-flat", k=50))
    np.testing.assert_array_equal(flat.ranks, exact.ranks)
    np.testing.assert_array_equal(flat.ties, exact.ties)
    np.testing.assert_allclose(flat.top_scores, exact.top_scores, atol=1e-5)
    # Lists agree up to the order of (near-)tied candidates, which BLAS kernels may split by an ulp.
    for i in range(len(q)):
        e, f = exact.top_scores[i], flat.top_scores[i]
        clear = lambda ids, sc: {int(j) for j, x in zip(ids, sc) if x > sc[-1] + 1e-5}
        assert clear(exact.top_ids[i], e) == clear(flat.top_ids[i], f)
    assert (flat.top_ids[5:, 0] == exact.top_ids[5:, 0]).mean() > 0.95
    assert flat.gt_not_returned > 0  # ranks beyond k were filled in exactly


@pytest.mark.parametrize("mode", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_modes_agree_on_easy_data_and_report_parameters(mode):
    q, g, gt = data(seed=2, ng=2000, noise=0.3)
    exact = search(q, g, gt)
    approx = search(q, g, gt, SearchConfig(mode=mode, k=20))
    agree = np.mean(approx.top_ids[:, 0] == exact.top_ids[:, 0])
    assert agree >= 0.95
    assert ("nprobe" in approx.params) if mode == "faiss-ivf" else ("ef_search" in approx.params)
    # a ground truth the index did not return never counts as a hit within k
    missed = ~np.array([gt.of(i)[0] in approx.top_ids[i] for i in range(len(q))])
    assert np.all(approx.ranks[missed] > 10)


def test_scores_an_ulp_apart_are_ties():
    s = np.array([[0.7, np.nextafter(np.float32(0.7), np.float32(1)), 0.2]], np.float32)
    ranks, ties = ranks_from_scores(s, GroundTruth.single([0]))
    assert ranks.tolist() == [1] and ties.tolist() == [1]


def test_index_miss_is_ranked_beyond_k():
    q, g, gt = data(seed=3, noise=3.0)  # hard: many ground truths rank low
    exact = search(q, g, gt)
    flat = search(q, g, gt, SearchConfig(mode="faiss-flat", k=10))
    np.testing.assert_array_equal(flat.ranks, exact.ranks)
    assert flat.gt_not_returned == int((exact.ranks > 10).sum()) > 0


def test_dual_softmax_matches_naive_full_matrix():
    q, g, gt = data(seed=4, nq=60, ng=60)
    cfg = SearchConfig(dsl=True, dsl_temperature=30.0, chunk=16)
    r = search(q, g, gt, cfg)
    s = (q @ g.T).astype(np.float64)
    prior = np.exp(30 * s) / np.exp(30 * s).sum(0, keepdims=True)  # softmax over queries, per video
    want, _ = ranks_from_scores((s * prior).astype(np.float32), gt)
    np.testing.assert_array_equal(r.ranks, want)
    assert r.params["dsl"] is True


def test_bad_search_requests():
    q, g, gt = data()
    with pytest.raises(ConfigError, match="needs --search exact"):
        SearchConfig(mode="faiss-flat", dsl=True)
    with pytest.raises(ConfigError, match="search must be one of"):
        SearchConfig(mode="annoy")
    with pytest.raises(ValueError, match="same width"):
        search(q[:, :5], g, gt)
    with pytest.raises(ValueError, match="outside the gallery"):
        search(q[:1], g, GroundTruth.single([len(g)]))


def test_every_mode_handles_a_gallery_smaller_than_k():
    q, g, gt = data(seed=5, nq=8, ng=6)
    exact = search(q, g, gt)
    for mode in SEARCH_MODES[1:]:
        r = search(q, g, gt, SearchConfig(mode=mode, k=100))
        assert r.top_ids.shape == (8, 10) and (r.top_ids[:, 6:] == -1).all()
        if mode == "faiss-flat":
            np.testing.assert_array_equal(r.ranks, exact.ranks)
