"""Retrieval metrics against a brute-force per-query rank, ties, NaN, several correct answers, bootstrap."""

import numpy as np
import pytest

from videolm.retrieval.metrics import (GroundTruth, bootstrap_ci, paired_bootstrap, ranks_from_scores, recall_curve,
                             summarize)


def brute_force(scores, gt_lists):
    """Loop over every candidate: rank = 1 + wrong-or-right candidates strictly above the best right one."""
    ranks, ties = [], []
    for q, row in enumerate(scores):
        row = [(-np.inf if np.isnan(x) else float(np.float32(x))) for x in row]
        best = max(row[j] for j in gt_lists[q])
        ranks.append(1 + sum(1 for x in row if x > best))
        ties.append(sum(1 for j, x in enumerate(row) if x == best and j not in gt_lists[q]))
    return np.array(ranks), np.array(ties)


@pytest.mark.parametrize("seed", range(4))
def test_ranks_match_brute_force_with_ties_nan_and_several_answers(seed):
    rng = np.random.default_rng(seed)
    nq, nc = 40, 30
    # Scores on a coarse grid: many exact ties. Some NaNs, including on ground truths.
    scores = rng.integers(0, 6, size=(nq, nc)).astype(np.float32) / 5
    scores[rng.random((nq, nc)) < 0.05] = np.nan
    gt_lists = [sorted(set(rng.integers(0, nc, size=rng.integers(1, 4)).tolist())) for _ in range(nq)]
    gt_lists[0] = [int(np.flatnonzero(np.isnan(scores[0]))[0])] if np.isnan(scores[0]).any() else gt_lists[0]
    ranks, ties = ranks_from_scores(scores, GroundTruth.from_lists(gt_lists))
    want_ranks, want_ties = brute_force(scores, gt_lists)
    np.testing.assert_array_equal(ranks, want_ranks)
    np.testing.assert_array_equal(ties, want_ties)
    assert ties.sum() > 0  # the grid really produced ties


def test_ties_are_not_double_counted():
    # The ground truth (column 0) ties with two wrong candidates and one is above it.
    scores = np.array([[0.5, 0.5, 0.9, 0.5, 0.1]], np.float32)
    ranks, ties = ranks_from_scores(scores, GroundTruth.single([0]))
    assert ranks.tolist() == [2] and ties.tolist() == [2]


def test_nan_ground_truth_ranks_below_every_finite_candidate():
    scores = np.array([[np.nan, 0.1, -5.0, np.nan]], np.float32)
    ranks, _ = ranks_from_scores(scores, GroundTruth.single([0]))
    assert ranks.tolist() == [3]  # two finite candidates above; the other NaN does not count


def test_identity_similarity_is_perfect():
    ranks, ties = ranks_from_scores(np.eye(50, dtype=np.float32), GroundTruth.single(np.arange(50)))
    m = summarize(ranks)
    assert m == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MedR": 1.0, "MnR": 1.0}
    assert ties.sum() == 0


def test_known_answer_metrics():
    m = summarize(np.array([1, 2, 6, 11, 100]))
    assert m["R@1"] == pytest.approx(20) and m["R@5"] == pytest.approx(40) and m["R@10"] == pytest.approx(60)
    assert m["MedR"] == 6 and m["MnR"] == pytest.approx(24)


def test_recall_curve_agrees_with_summary():
    ranks = np.random.default_rng(0).integers(1, 40, 500)
    curve = recall_curve(ranks, 30)
    m = summarize(ranks)
    assert curve[0] == pytest.approx(m["R@1"]) and curve[4] == pytest.approx(m["R@5"])
    assert curve[9] == pytest.approx(m["R@10"]) and np.all(np.diff(curve) >= 0)


def test_ground_truth_transpose_and_rows():
    gt = GroundTruth.from_lists([[0], [0], [2], [1], [2]])
    back = gt.transpose(3)
    assert [back.of(j).tolist() for j in range(3)] == [[0, 1], [3], [2, 4]]
    assert gt.rows(2, 4).indices.tolist() == [2, 1]
    with pytest.raises(ValueError, match="no correct candidate"):
        GroundTruth.from_lists([[0], []])


def test_multi_caption_queries_both_directions():
    # 3 videos, captions 0-1 belong to video 0, 2 to video 1, 3-4 to video 2.
    owner = np.array([0, 0, 1, 2, 2])
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(5, 3)).astype(np.float32)
    t2v, _ = ranks_from_scores(sim, GroundTruth.single(owner))
    v2t, _ = ranks_from_scores(sim.T.copy(), GroundTruth.single(owner).transpose(3))
    lists = [[0, 1], [2], [3, 4]]
    np.testing.assert_array_equal(t2v, brute_force(sim, [[o] for o in owner])[0])
    np.testing.assert_array_equal(v2t, brute_force(sim.T, lists)[0])


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate():
    ranks = np.random.default_rng(1).integers(1, 20, 300)
    a = bootstrap_ci(ranks, n_boot=300, seed=5)
    assert a == bootstrap_ci(ranks, n_boot=300, seed=5)
    m = summarize(ranks)
    for name, (lo, hi) in a.items():
        assert lo <= m[name] <= hi and lo < hi
    wide = bootstrap_ci(ranks[:30], n_boot=300, seed=5)["R@1"]
    assert wide[1] - wide[0] > a["R@1"][1] - a["R@1"][0]  # fewer queries, wider interval


def test_paired_bootstrap():
    rng = np.random.default_rng(2)
    a = rng.integers(1, 10, 400)
    same = paired_bootstrap(a, a, n_boot=500)
    assert same["delta"] == 0 and same["p_value"] == 1.0
    better = np.where(rng.random(400) < 0.5, 1, a)  # half the queries fixed to rank 1
    t = paired_bootstrap(better, a, n_boot=2000)
    assert t["delta"] > 20 and t["ci"][0] > 0 and t["p_value"] <= 1 / 2000 * 2
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(a, a[:10])
