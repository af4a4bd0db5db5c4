"""Collate: examples from ``VideoTextDataset`` into padded tensors with attention masks.

A batch is a plain dict (DataLoader pins and moves dicts of tensors for free):

=================  ============  ==========================================================
key                shape         meaning
=================  ============  ==========================================================
``video``          (B, T, D)     clip features, zero where padded
``video_mask``     (B, T) bool   True on real clips
``video_tokens``   (B, T) long   visual words + ``TOKEN_OFFSET`` (0 = [PAD]); only when the
                                 features are quantised
``clip_owner``     (B, T) long   subtitle index (into ``sub_*``) owning each clip, -1 none
``clip_start``     (B, T) float  clip start time in seconds (with ``video_key``, identifies a clip)
``text_ids``       (B, L) long   the example's captions joined in time order, WordPiece ids
                                 ``[CLS] ... [SEP]``
``text_mask``      (B, L) bool
``sub_ids``        (B, S, Ls)    each caption on its own (HERO subtitles / VSM queries)
``sub_mask``       (B, S, Ls)
``sub_spans``      (B, S, 2)     first and last clip each caption overlaps
``sub_valid``      (B, S) bool   False on padding subtitles
``video_key``      (B,) long     CRC32 of the video id, equal for examples cut from the same
                                 video: contrastive objectives must not use such pairs as
                                 negatives (a hash, so it also compares across ranks)
``video_ids``      list[str]
=================  ============  ==========================================================

T, L, S and Ls are the longest in the batch (capped by the config), not fixed
maxima, so short segments do not pay for padding.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from ..quantize.kmeans import TOKEN_OFFSET


class Collator:
    def __init__(self, tokenizer, max_text_len: int = 48, max_sub_len: int = 24, max_subs: int = 16):
        self.tokenizer = tokenizer
        self.max_text_len, self.max_sub_len, self.max_subs = max_text_len, max_sub_len, max_subs

    def _tokenize(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].bool()

    def __call__(self, examples: list[dict]) -> dict:
        B = len(examples)
        T = max(len(e["features"]) for e in examples)
        D = examples[0]["features"].shape[1]
        video = torch.zeros(B, T, D)
        video_mask = torch.zeros(B, T, dtype=torch.bool)
        owner = torch.full((B, T), -1, dtype=torch.long)
        clip_start = torch.zeros(B, T)
        has_tokens = all(e["tokens"] is not None for e in examples)
        tokens = torch.zeros(B, T, dtype=torch.long) if has_tokens else None
        for i, e in enumerate(examples):
            n = len(e["features"])
            video[i, :n] = torch.from_numpy(np.ascontiguousarray(e["features"], dtype=np.float32))
            video_mask[i, :n] = True
            owner[i, :n] = torch.from_numpy(np.asarray(e["clip_owner"], dtype=np.int64))
            if e.get("clip_starts") is not None:  # NaN otherwise: compares unequal, so no clip counts as a copy
                clip_start[i, :n] = torch.from_numpy(np.asarray(e["clip_starts"], dtype=np.float32))
            else:
                clip_start[i, :n] = float("nan")
            if has_tokens:
                tokens[i, :n] = torch.from_numpy(np.asarray(e["tokens"], dtype=np.int64)) + TOKEN_OFFSET

        text_ids, text_mask = self._tokenize([" ".join(e["texts"]) for e in examples], self.max_text_len)

        S = max(1, min(self.max_subs, max(len(e["texts"]) for e in examples)))
        flat, where = [], []
        spans = torch.full((B, S, 2), -1, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for i, e in enumerate(examples):
            for j, (t, span) in enumerate(zip(e["texts"][:S], e["text_spans"][:S])):
                flat.append(t)
                where.append((i, j))
                spans[i, j] = torch.as_tensor(span, dtype=torch.long)
                valid[i, j] = True
        owner[owner >= S] = -1  # owners past the subtitle cap have no subtitle row
        ids, mask = self._tokenize(flat, self.max_sub_len)
        sub_ids = torch.zeros(B, S, ids.shape[1], dtype=torch.long)
        sub_mask = torch.zeros(B, S, ids.shape[1], dtype=torch.bool)
        for k, (i, j) in enumerate(where):
            sub_ids[i, j], sub_mask[i, j] = ids[k], mask[k]

        video_key = torch.tensor([zlib.crc32(e["video_id"].encode("utf-8")) for e in examples], dtype=torch.long)
        batch = {
            "video": video, "video_mask": video_mask, "clip_owner": owner, "clip_start": clip_start,
            "text_ids": text_ids, "text_mask": text_mask,
            "sub_ids": sub_ids, "sub_mask": sub_mask, "sub_spans": spans, "sub_valid": valid,
            "video_key": video_key, "video_ids": [e["video_id"] for e in examples],
        }
        if has_tokens:
            batch["video_tokens"] = tokens
        return batch


def batch_to(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
