"""Caption metrics as UniVL and HERO report them: the COCO caption scorers of ``pycocoevalcap``.

* Tokenisation: pycocoevalcap's PTB tokenizer (Stanford CoreNLP 3.4.1's
  PTBTokenizer, lower-cased, punctuation tokens dropped), which runs ``java``.
  Without ``java`` a Python stand-in (``python_tokenize``) is used instead and the
  report says so: lower-case, PTB's clitic splits (``n't``, ``'s``, ``'re`` ...),
  words and numbers kept whole with inner hyphens, dots and apostrophes, every
  other symbol its own token, the same punctuation tokens dropped. It matches the
  PTB tokenizer on plain English captions (a test checks it), not on every input.
* Scores: BLEU-1..4 (``Bleu``, "closest" reference length, corpus-level), METEOR
  (``Meteor``, Java; unavailable without it), ROUGE-L (``Rouge``, mean of per-caption
  F with beta 1.2) and CIDEr-D (``Cider``: pycocoevalcap's CIDEr is CIDEr-D, clipped
  counts and a Gaussian length penalty, sigma 6, times 10; document frequencies from
  the references of the set scored). BLEU, METEOR and ROUGE-L are reported times 100,
  CIDEr-D as is, as in the papers' tables.
* Intervals: 95% percentile bootstrap over items (videos or segments). BLEU is a
  corpus statistic, so each resample sums the items' n-gram counts (``bleu_stats``,
  the same rule as pycocoevalcap's scorer; a test checks the two agree); so is
  METEOR, recomputed from summed per-item statistics (``meteor``); ROUGE-L and
  CIDEr-D resample the mean of the per-item scores (CIDEr-D's document frequencies
  stay those of the whole set).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter

import numpy as np

from ..retrieval.metrics import _resamples
from . import meteor

log = logging.getLogger("videolm.captioning.metrics")
BLEU_N = 4
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
MEAN_METRICS = ("ROUGE-L", "CIDEr-D")  # corpus score = mean of the item scores
# the PTB tokenizer's punctuation tokens that pycocoevalcap leaves out of every caption
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"])
PTB_NAME = "ptb: pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, -lowerCase), punctuation dropped"
FALLBACK_NAME = ("python fallback (java not found): lower-case, PTB clitic splits, words/numbers with inner "
                 "-.' kept whole, other symbols split, pycocoevalcap's punctuation dropped")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ll|'ve|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ll|ve|d|m)\b|\w+(?:[-.']\w+)*|\.\.\.|--|\S")
_warned_no_java = False


def java_path() -> str | None:
    return shutil.which("java")


def python_tokenize(text: str) -> str:
    """The no-Java stand-in for the PTB tokenizer (see the module docstring)."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    return " ".join(t for t in _TOKEN.findall(text) if t not in PUNCTUATION)


def tokenize(captions: dict, use_java: bool) -> dict:
    """{key: [text, ...]} -> {key: [tokenised text, ...]} with the PTB tokenizer or the fallback."""
    if not use_java:
        return {k: [python_tokenize(t) for t in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in captions.items()})


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu_stats(hyp: str, refs: list[str], n: int = BLEU_N) -> np.ndarray:
    """One item's BLEU counts: [hyp length, closest reference length, n-grams guessed (1..n), matched (1..n)].

    Matches are clipped at the most any one reference has; the reference length is
    the one closest to the hypothesis' (ties: the shorter), as pycocoevalcap's "closest".
    """
    words, ref_words = hyp.split(), [r.split() for r in refs]
    closest = min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    guess, correct = [], []
    for k in range(1, n + 1):
        mine = ngrams(words, k)
        best = Counter()
        for r in ref_words:
            best |= ngrams(r, k)  # elementwise max over references
        guess.append(max(0, len(words) - k + 1))
        correct.append(sum(min(c, best[g]) for g, c in mine.items()))
    return np.array([len(words), closest, *guess, *correct], dtype=np.float64)


def bleu_from_stats(stats: np.ndarray, n: int = BLEU_N) -> np.ndarray:
    """BLEU-1..n from summed ``bleu_stats`` (rows: resamples, or one row), pycocoevalcap's smoothing."""
    stats = np.atleast_2d(stats)
    tiny, small = 1e-15, 1e-9
    guess, correct = stats[:, 2 : 2 + n], stats[:, 2 + n : 2 + 2 * n]
    cum = np.cumprod((correct + tiny) / (guess + small), axis=1)
    bleus = cum ** (1.0 / np.arange(1, n + 1))
    ratio = (stats[:, 0] + tiny) / (stats[:, 1] + small)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, tiny)), 1.0)
    return bleus * brevity[:, None]


def score_items(gts: dict, res: dict, with_meteor: bool) -> tuple[dict, dict, np.ndarray | None]:
    """(corpus scores, per-item scores in key order, METEOR's per-item statistics or None) of tokenised
    references ``gts`` and hypotheses ``res``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    corpus, per_item = {}, {}
    bleu, _ = Bleu(BLEU_N).compute_score(gts, res, verbose=0)
    for k in range(BLEU_N):
        corpus[f"BLEU-{k + 1}"] = 100.0 * float(bleu[k])
    meteor_stats = None
    if with_meteor:
        score, items, meteor_stats = meteor.jar_scores(gts, res, list(gts))
        corpus["METEOR"], per_item["METEOR"] = 100.0 * score, 100.0 * items
    score, items = Rouge().compute_score(gts, res)
    corpus["ROUGE-L"], per_item["ROUGE-L"] = 100.0 * float(score), 100.0 * np.asarray(items, np.float64)
    score, items = Cider().compute_score(gts, res)
    corpus["CIDEr-D"], per_item["CIDEr-D"] = float(score), np.asarray(items, np.float64)
    return corpus, per_item, meteor_stats


def bootstrap_intervals(per_item: dict, stats: np.ndarray, n_boot: int, seed: int, level: float = 0.95,
                        meteor_stats: np.ndarray | None = None) -> dict:
    """{metric: [low, high]}: percentile intervals over resampled items (BLEU and METEOR from summed
    statistics, as their corpus scores are computed)."""
    draws = {m: [] for m in per_item} | {f"BLEU-{k + 1}": [] for k in range(BLEU_N)}  # METEOR only with Java
    for idx in _resamples(len(stats), n_boot, seed):
        bleus = 100.0 * bleu_from_stats(stats[idx].sum(1))
        for k in range(BLEU_N):
            draws[f"BLEU-{k + 1}"].append(bleus[:, k])
        if meteor_stats is not None:
            draws["METEOR"].append(100.0 * meteor.corpus_from_stats(meteor_stats[idx].sum(1)))
        for m in MEAN_METRICS:
            draws[m].append(per_item[m][idx].mean(1))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for m in METRICS:
        if m in draws:
            v = np.concatenate(draws[m])
            out[m] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))]
    return out


def check_rows(rows: list[dict]) -> None:
    seen = set()
    for i, r in enumerate(rows):
        if not isinstance(r.get("hypothesis"), str) or not r.get("references"):
            raise ValueError(f"item {i} ({r.get('key')}): needs a 'hypothesis' string and non-empty 'references'")
        if r["key"] in seen:
            raise ValueError(f"item key {r['key']!r} appears twice")
        seen.add(r["key"])


def evaluate_captions(rows: list[dict], n_boot: int = 1000, seed: int = 0, use_java: bool | None = None) -> dict:
    """Scores, intervals and per-item scores of caption rows ({key, hypothesis, references}).

    ``use_java`` None: the PTB tokenizer and METEOR when ``java`` is on the PATH; without
    it, one warning, METEOR unavailable and the Python tokenizer, all recorded.
    """
    global _warned_no_java
    check_rows(rows)
    java = java_path()
    use_java = bool(java) if use_java is None else use_java and bool(java)
    if not java and not _warned_no_java:
        log.warning("java not found: METEOR is unavailable and captions are tokenised by the Python fallback "
                    "instead of the PTB tokenizer (recorded in the report); install a JRE for the papers' numbers")
        _warned_no_java = True
    keys = [r["key"] for r in rows]
    gts = tokenize({k: list(r["references"]) for k, r in zip(keys, rows)}, use_java)
    res = tokenize({k: [r["hypothesis"]] for k, r in zip(keys, rows)}, use_java)
    corpus, per_item, meteor_stats = score_items(gts, res, use_java)
    stats = np.stack([bleu_stats(res[k][0], gts[k]) for k in keys])
    per_item_bleu4 = 100.0 * bleu_from_stats(stats)[:, BLEU_N - 1]  # each item's own BLEU-4, for reading only
    return {
        "n_items": len(rows),
        "metrics": {m: corpus.get(m) for m in METRICS},
        "ci95": bootstrap_intervals(per_item, stats, n_boot, seed, meteor_stats=meteor_stats),
        "unavailable": {} if use_java else {"METEOR": "java not found on PATH (METEOR runs Java)" if not java
                                            else "switched off (use_java=False)"},
        "tokenizer": PTB_NAME if use_java else FALLBACK_NAME,
        "java": java if use_java else None,
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95, "over": "items"},
        "per_item": {"keys": keys, "bleu_stats": stats.tolist(), "BLEU-4": per_item_bleu4.tolist(),
                     **{m: v.tolist() for m, v in per_item.items()}},
    }
