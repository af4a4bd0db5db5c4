"""Collate: examples from ``VideoTextDataset`` into padded tensors with attention masks.

A batch is a plain dict (DataLoader pins and moves dicts of tensors for free):

=================  ============  ==========================================================
key                shape         meaning
=================  ============  ==========================================================
``video``          (B, T, D)     clip features, zero where padded
``video_mask``     (B, T) bool   True on real clips
``video_tokens``   (B, T) long   visual words + ``VISUAL_TOKEN_OFFSET`` (0 = [PAD]); only when
                                 the features are quantised
``clip_start``     (B, T) float  clip start time in seconds (with ``video_key``, identifies a clip)
``text_ids``       (B, L) long   the example's captions joined in time order, WordPiece ids
                                 ``[CLS] ... [SEP]``
``text_mask``      (B, L) bool
``sub_ids``        (B, S, Ls)    each caption on its own (HERO subtitles / VSM queries)
``sub_mask``       (B, S, Ls)
``sub_spans``      (B, S, 2)     first and last clip each caption overlaps
``sub_valid``      (B, S) bool   False on padding subtitles
``clip_owner``     (B, T) long   the subtitle each clip belongs to (HERO's local level), -1 for
                                 none: of the subtitles a clip overlaps, the one with the largest
                                 temporal IoU (ties: the earlier one)
``video_key``      (B,) long     CRC32 of the video id, equal for examples cut from the same
                                 video: contrastive objectives must not use such pairs as
                                 negatives (a hash, so it also compares across ranks)
``video_ids``      list[str]
=================  ============  ==========================================================

T, L, S and Ls are the longest in the batch (capped by the config), not fixed
maxima, so short segments do not pay for padding. Texts, clips and visual words
go through ``model.inputs``, the pipeline evaluation uses too. Each distinct caption
is tokenised once per process (``CaptionTokens``), however often it is read.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from ..model.inputs import CaptionTokens, pad_clips


class Collator:
    def __init__(self, tokenizer, max_text_len: int = 48, max_sub_len: int = 24, max_subs: int = 16):
        self.tokenizer = tokenizer
        self.max_text_len, self.max_sub_len, self.max_subs = max_text_len, max_sub_len, max_subs
        # each caption tokenised once per worker, for the joined text and the subtitles alike
        self.words = CaptionTokens(tokenizer, max(max_text_len, max_sub_len))

    def __call__(self, examples: list[dict]) -> dict:
        quantised = all(e["tokens"] is not None for e in examples)
        video, video_mask, video_tokens = pad_clips([e["features"] for e in examples],
                                                    [e["tokens"] for e in examples] if quantised else None)
        S = max(1, min(self.max_subs, max(len(e["texts"]) for e in examples)))
        (text_ids, text_mask), subs = self._tokenize(examples, S)
        batch = {
            "video": video, "video_mask": video_mask, "clip_start": clip_starts(examples, video_mask.shape[1]),
            "text_ids": text_ids, "text_mask": text_mask, **self._subtitles(examples, S, *subs),
            "video_key": torch.tensor([zlib.crc32(e["video_id"].encode("utf-8")) for e in examples], dtype=torch.long),
            "video_ids": [e["video_id"] for e in examples],
        }
        if quantised:
            batch["video_tokens"] = video_tokens
        return batch

    def _tokenize(self, examples: list[dict], S: int):
        """((ids, mask) of each example's texts joined in time order, (ids, mask) of each of the first
        ``S`` texts of every example on its own, in example order): ``tokenize``'s tensors, from the cache."""
        ids = self.words.ids([t for e in examples for t in e["texts"]])  # one tokenizer call, new captions only
        per_example, at = [], 0
        for e in examples:
            per_example.append(ids[at : at + len(e["texts"])])
            at += len(e["texts"])
        joined = self.words.pack(per_example, self.max_text_len)
        each = [[t] for e, texts in zip(examples, per_example) for t in texts[: subtitle_count(e, S)]]
        return joined, self.words.pack(each, self.max_sub_len)

    def _subtitles(self, examples: list[dict], S: int, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """``sub_ids``, ``sub_mask``, ``sub_spans``, ``sub_valid``: each caption (the first ``max_subs``) on its own.

        ``ids``/``mask``: the subtitles' tokens, example after example. Filled in numpy and
        copied to torch once: per-element tensor writes cost more than the rest of the batch.
        """
        B = len(examples)
        spans = np.full((B, S, 2), -1, dtype=np.int64)
        valid = np.zeros((B, S), dtype=bool)
        owner = np.full((B, max(len(e["features"]) for e in examples)), -1, dtype=np.int64)
        for i, e in enumerate(examples):
            if e.get("text_times") is not None and e.get("clip_starts") is not None:
                found = clip_owner(e["clip_starts"], e["clip_ends"], e["text_times"][:S])
                owner[i, : len(found)] = found
            k = subtitle_count(e, S)
            spans[i, :k], valid[i, :k] = np.asarray(e["text_spans"][:k], dtype=np.int64).reshape(k, 2), True
        sub_ids = torch.zeros(B, S, ids.shape[1], dtype=torch.long)
        sub_mask = torch.zeros(B, S, ids.shape[1], dtype=torch.bool)
        at = torch.from_numpy(valid)  # row-major, as the subtitles come: example after example, in order
        sub_ids[at], sub_mask[at] = ids, mask
        return {"sub_ids": sub_ids, "sub_mask": sub_mask, "sub_spans": torch.from_numpy(spans),
                "sub_valid": at, "clip_owner": torch.from_numpy(owner)}


def subtitle_count(example: dict, S: int) -> int:
    """How many of an example's captions become subtitles: the first ``S`` that have a clip span."""
    return min(S, len(example["texts"]), len(example["text_spans"]))


def clip_owner(starts: np.ndarray, ends: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(n_clips,) index of the subtitle (rows of ``times``: start, end) each clip belongs to, -1 for none.

    HERO pairs every frame with one subtitle: the one whose time span overlaps
    the clip's most, measured as intersection over union.
    """
    starts, ends = np.asarray(starts, np.float64)[:, None], np.asarray(ends, np.float64)[:, None]
    if len(times) == 0:
        return np.full(len(starts), -1, dtype=np.int64)
    s, e = np.asarray(times, np.float64)[:, 0][None], np.asarray(times, np.float64)[:, 1][None]
    inter = np.clip(np.minimum(ends, e) - np.maximum(starts, s), 0, None)
    union = np.maximum(ends, e) - np.minimum(starts, s)
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    best = iou.argmax(1)
    return np.where(iou.max(1) > 0, best, -1).astype(np.int64)


def clip_starts(examples: list[dict], longest: int) -> torch.Tensor:
    """(B, longest) start time in seconds of each example's clips, zero where padded.

    An example without ``clip_starts`` gets NaN, which compares unequal to
    everything, so none of its clips counts as a copy of another.
    """
    starts = torch.zeros(len(examples), longest)
    for i, e in enumerate(examples):
        n = len(e["features"])
        if e.get("clip_starts") is not None:
            starts[i, :n] = torch.from_numpy(np.asarray(e["clip_starts"], dtype=np.float32))
        else:
            starts[i, :n] = float("nan")
    return starts
