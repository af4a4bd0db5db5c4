"""A model's side of retrieval: pooled text and video vectors, and cross-encoder pair scores.

Texts and videos become model inputs through ``model.inputs``, as in training:
the same tokenizer settings, clip padding and visual-word ids. A video longer
than the model's ``max_frames`` is read at clips spread evenly over its length.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..features.shards import FeatureStore
from ..model.inputs import evenly_spread_clips, pad_clips, tokenize
from .queries import EvalError

log = logging.getLogger("videolm.retrieval.encoding")


def require_align_head(model, objectives: list[str]) -> None:
    """Re-ranking scores pairs with the cross encoder's align head; a model built without one cannot re-rank."""
    if "align" in model.parts and "align" not in objectives:  # kept by model.parts, never trained
        log.warning("re-ranking with an align head the run never trained (objectives: %s): expect noise",
                    ", ".join(objectives))
    if "align" not in model.parts:
        raise EvalError("re-ranking (--rerank-top) scores candidates with the cross encoder's align head, but this "
                        f"checkpoint's recipe had no align objective (objectives: {', '.join(objectives)}), so the "
                        "model has no align head: retrain with align in the recipe, or evaluate without --rerank-top")


def read_video_batch(store: FeatureStore, video_ids: list[str], max_frames: int, visual_words: bool):
    """(video, video_mask, video_tokens) of the videos, each read at most at ``max_frames`` clips."""
    videos = [store.get(v) for v in video_ids]
    picks = [evenly_spread_clips(len(v.features), max_frames) for v in videos]
    words = None
    if visual_words:
        lacking = next((v.video_id for v in videos if v.tokens is None), None)
        if lacking is not None:
            raise EvalError(f"the model reads visual words but {lacking} has none: "
                            f"run `videolm quantize --features {store.directory}`")
        words = [v.tokens[p] for v, p in zip(videos, picks)]
    return pad_clips([v.features[p] for v, p in zip(videos, picks)], words)


class PairEncoder:
    """Runs a model's encoders in batches, with its tokenizer and limits."""

    def __init__(self, model, tokenizer, store: FeatureStore, batch_size: int = 64, device: str = "cpu"):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.batch_size, self.device = batch_size, torch.device(device)
        cfg = model.cfg
        self.max_frames, self.max_text_len = cfg.max_frames, cfg.max_text_len
        self.tokens = cfg.video_input == "tokens"
        if not self.tokens and cfg.feature_dim != store.dim:
            raise EvalError(f"the checkpoint expects {cfg.feature_dim}-d clip features but {store.directory} "
                            f"holds {store.dim}-d ones (extracted with another encoder?)")
        if self.tokens:
            book = store.codebook_attrs
            if book is None:
                raise EvalError(f"the model reads visual words but {store.directory} has no codebook: run "
                                f"`videolm quantize --features {store.directory}` with the training k/levels")
            if int(book["model_vocab_size"]) != cfg.visual_vocab:
                raise EvalError(f"the model has a visual vocabulary of {cfg.visual_vocab} ids but the codebook of "
                                f"{store.directory} gives {book['model_vocab_size']}; quantise with the training k/levels")

    def text_states(self, texts: list[str]):
        ids, mask = tokenize(self.tokenizer, texts, self.max_text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model.encode_text(ids, mask), mask

    def video_states(self, video_ids: list[str]):
        video, mask, toks = read_video_batch(self.store, video_ids, self.max_frames, self.tokens)
        mask = mask.to(self.device)
        return self.model.encode_video(mask, video.to(self.device), None if toks is None else toks.to(self.device)), mask

    @torch.inference_mode()
    def _embed(self, items: list[str], states, pool, progress) -> np.ndarray:
        out = []
        for a in range(0, len(items), self.batch_size):
            h, m = states(items[a : a + self.batch_size])
            out.append(pool(h, m).float().cpu().numpy())
            if progress is not None:
                progress.update(len(h))
        return np.concatenate(out)

    def embed_texts(self, texts: list[str], progress=None) -> np.ndarray:
        return self._embed(texts, self.text_states, self.model.joint.text, progress)

    def embed_videos(self, video_ids: list[str], progress=None) -> np.ndarray:
        return self._embed(video_ids, self.video_states, self.model.joint.video, progress)

    @torch.inference_mode()
    def align_scores(self, texts: list[str], video_ids: list[str]) -> np.ndarray:
        """Cross-encoder alignment score of each (text, video) pair.

        Re-ranking sends each query with its K candidates, so within a batch every
        distinct text and video is read once and paired by index (``model.pair_pooled``:
        a two-stream model encodes each once, a single-stream one runs every pair).
        """
        out = []
        for a in range(0, len(texts), self.batch_size):
            t_uniq, t_idx = np.unique(np.asarray(texts[a : a + self.batch_size], dtype=object), return_inverse=True)
            v_uniq, v_idx = np.unique(np.asarray(video_ids[a : a + self.batch_size], dtype=object),
                                      return_inverse=True)
            ids, tm = tokenize(self.tokenizer, list(t_uniq), self.max_text_len)
            video, vm, toks = read_video_batch(self.store, list(v_uniq), self.max_frames, self.tokens)
            inputs = {"text_ids": ids, "text_mask": tm, "video": video, "video_mask": vm}
            if toks is not None:
                inputs["video_tokens"] = toks
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            pooled = self.model.pair_pooled(inputs, torch.as_tensor(t_idx, device=self.device),
                                            torch.as_tensor(v_idx, device=self.device))
            out.append(self.model.align_score(pooled).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)
