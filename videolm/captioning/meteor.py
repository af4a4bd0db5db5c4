"""METEOR 1.5 as pycocoevalcap runs it, plus its corpus score of any resample, for bootstrap intervals.

pycocoevalcap's ``Meteor`` sends each item to the jar (``SCORE ||| refs ||| hyp``), which
answers with the item's 23 sufficient statistics; one ``EVAL`` line then returns
every item's score and the corpus score, which METEOR computes from the
*summed* statistics, not as the mean of the item scores (the two differ by about a
point on short captions). A bootstrap interval must resample that corpus
statistic, and asking the jar for each of 1000 resamples costs about a minute, so
``corpus_from_stats`` recomputes it from summed statistics with METEOR's formula
and the English defaults that ``-l en -norm`` selects. A test checks it against the
jar on random subsets (exact to 1e-12).

The statistics, in the jar's order: test length, reference length, test and
reference function words, then per stage (exact, stem, synonym, paraphrase) the
test content, reference content, test function and reference function matches,
then chunks and the test and reference word matches. The jar leaves a perfect
match's single chunk out of the corpus sum (its fragmentation is 0), so
``item_stats`` sets that chunk count to 0 before summing.
"""

from __future__ import annotations

import numpy as np

ALPHA, BETA, GAMMA, DELTA = 0.85, 0.20, 0.60, 0.75  # METEOR 1.5 English defaults
STAGE_WEIGHTS = np.array([1.0, 0.6, 0.8, 0.6])  # exact, stem, synonym, paraphrase
N_STATS = 23


def jar_scores(gts: dict, res: dict, keys: list[str]) -> tuple[float, np.ndarray, np.ndarray]:
    """(corpus METEOR, per-item METEOR, (n, 23) statistics) from the jar, as ``Meteor.compute_score``."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    with meteor.lock:
        # ``_stat`` is the jar's SCORE round trip that ``compute_score`` itself runs per item
        lines = [meteor._stat(res[k][0], gts[k]) for k in keys]
        proc = meteor.meteor_p
        proc.stdin.write(("EVAL ||| " + " ||| ".join(lines) + "\n").encode())
        proc.stdin.flush()
        items = np.array([float(proc.stdout.readline().strip()) for _ in keys])
        corpus = float(proc.stdout.readline().strip())
    stats = np.array([line.split() for line in lines], dtype=np.float64).reshape(len(keys), -1)
    if stats.shape[1] != N_STATS:
        raise RuntimeError(f"the METEOR jar returned {stats.shape[1]} statistics per item, expected {N_STATS}")
    return corpus, items, item_stats(stats)


def item_stats(stats: np.ndarray) -> np.ndarray:
    """The jar's statistics with a perfect match's chunk dropped, ready to be summed over items."""
    stats = np.array(stats, dtype=np.float64)
    stages = stats[:, 4:20].reshape(-1, 4, 4)
    perfect = ((stages[:, :, 0].sum(1) + stages[:, :, 2].sum(1) == stats[:, 0])
               & (stages[:, :, 1].sum(1) + stages[:, :, 3].sum(1) == stats[:, 1]) & (stats[:, 20] == 1))
    stats[perfect, 20] = 0.0
    return stats


def corpus_from_stats(summed: np.ndarray) -> np.ndarray:
    """METEOR of summed statistics; rows are resamples (or one row). Fragmentation 0 with no chunks."""
    s = np.atleast_2d(summed)
    stages = s[:, 4:20].reshape(-1, 4, 4)
    test_len = DELTA * (s[:, 0] - s[:, 2]) + (1 - DELTA) * s[:, 2]
    ref_len = DELTA * (s[:, 1] - s[:, 3]) + (1 - DELTA) * s[:, 3]
    test_match = (STAGE_WEIGHTS * (DELTA * stages[:, :, 0] + (1 - DELTA) * stages[:, :, 2])).sum(1)
    ref_match = (STAGE_WEIGHTS * (DELTA * stages[:, :, 1] + (1 - DELTA) * stages[:, :, 3])).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p, r = test_match / test_len, ref_match / ref_len
        f_mean = p * r / (ALPHA * p + (1 - ALPHA) * r)
        frag = np.where(s[:, 20] > 0, s[:, 20] / ((s[:, 21] + s[:, 22]) / 2), 0.0)
        score = f_mean * (1 - GAMMA * frag**BETA)
    return np.maximum(np.nan_to_num(score, nan=0.0), 0.0)
