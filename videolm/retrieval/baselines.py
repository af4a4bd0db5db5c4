"""The non-neural reference point of a retrieval table.

``TfidfRidge`` predicts the TF-IDF vector of a video's captions from its
mean-pooled clip features with ridge regression (fitted on the training
split), and retrieves by cosine between a query's TF-IDF vector and each
video's predicted one. It learns which words go with which average appearance
and motion, but nothing about order within a video: the floor a pretrained
model must clear.

Why this direction: on the demo's data (800 train / 200 test videos) mapping
text to features instead gave 3-6% R@1 and CCA 5-12%, against about 20% here.
The ridge strength is chosen on a held-out fifth of the training pairs, never
on the evaluation split.
"""

from __future__ import annotations

import numpy as np

from ..features.shards import FeatureStore
from ..manifests.manifest import VideoEntry
from .queries import DESCRIPTION_KINDS


def pooled_features(store: FeatureStore, video_ids: list[str]) -> np.ndarray:
    return np.stack([np.asarray(store.get(v).features, dtype=np.float32).mean(0) for v in video_ids])


def training_pairs(entries: list[VideoEntry], store: FeatureStore) -> tuple[list[str], list[str]]:
    """(joined captions, video id) of every training video with features and a description."""
    texts, ids = [], []
    for e in entries:
        caps = [c.text.strip() for c in sorted(e.captions, key=lambda c: (c.start, c.end))
                if c.kind in DESCRIPTION_KINDS + ("query",) and c.text.strip()]
        if caps and e.video_id in store:
            texts.append(" ".join(caps))
            ids.append(e.video_id)
    return texts, ids


class TfidfRidge:
    name = "tfidf-ridge"
    ALPHAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)

    def __init__(self, alpha: float | None = None, seed: int = 0):
        self.alpha, self.seed = alpha, seed  # alpha None: pick from ALPHAS on held-out training pairs
        self.validation: dict[float, float] = {}  # alpha -> held-out R@1 (percent)

    def _fit(self, texts: list[str], pooled: np.ndarray, alpha: float):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        # Keep one-character tokens: digits ("a red 3 moves left") carry the meaning here.
        vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", ngram_range=(1, 2), sublinear_tf=True)
        x = vectorizer.fit_transform(texts)
        scaler = StandardScaler().fit(pooled)
        ridge = Ridge(alpha=alpha).fit(scaler.transform(pooled), x.toarray())
        return vectorizer, scaler, ridge

    def fit(self, texts: list[str], pooled: np.ndarray) -> "TfidfRidge":
        if len(texts) < 5:
            raise ValueError(f"the TF-IDF baseline needs at least 5 training texts, got {len(texts)}")
        if self.alpha is None:
            from .metrics import GroundTruth, summarize
            from .search import search

            order = np.random.default_rng(self.seed).permutation(len(texts))
            held, train = order[: len(texts) // 5], order[len(texts) // 5 :]
            for alpha in self.ALPHAS:
                self.vectorizer, self.scaler, self.ridge = self._fit([texts[i] for i in train], pooled[train], alpha)
                q = self.embed_texts([texts[i] for i in held])
                ranks = search(q, self.embed_videos(pooled[held]), GroundTruth.single(np.arange(len(held)))).ranks
                self.validation[alpha] = summarize(ranks)["R@1"]
            self.alpha = max(self.ALPHAS, key=lambda a: (self.validation[a], -a))
        self.vectorizer, self.scaler, self.ridge = self._fit(texts, pooled, self.alpha)
        return self

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._unit(self.vectorizer.transform(texts).toarray())

    def embed_videos(self, pooled: np.ndarray) -> np.ndarray:
        return self._unit(self.ridge.predict(self.scaler.transform(pooled)))
