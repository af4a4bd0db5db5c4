"""The one input pipeline: texts, clip features and visual words -> the tensors every model call takes.

Training (``pretrain.collate``), retrieval evaluation, re-ranking and (later)
captioning all build their model inputs here, so a tokenizer setting, the clip
padding or the visual-word id rule cannot drift between them.

Visual words: the codebook's word ``w`` is model id ``w + VISUAL_TOKEN_OFFSET``;
ids below the offset are the special tokens, in ``VISUAL_SPECIAL_TOKENS`` order
(the codebook records both, ``quantize.job`` writes them from here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

# torch is imported inside the functions below, not here: ``quantize`` reads the id
# constants from this module and would otherwise pay torch's import (~1.5 s, ~200 MB).
if TYPE_CHECKING:
    import torch

VISUAL_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VISUAL_PAD_ID = VISUAL_SPECIAL_TOKENS.index("[PAD]")
VISUAL_MASK_ID = VISUAL_SPECIAL_TOKENS.index("[MASK]")
VISUAL_TOKEN_OFFSET = len(VISUAL_SPECIAL_TOKENS)


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """WordPiece ids ``[CLS] ... [SEP]`` of each text, padded to the longest (at most ``max_len``), and its mask."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def evenly_spread_clips(n_clips: int, max_frames: int) -> np.ndarray:
    """Indices of the clips a model reads from a video of ``n_clips``.

    All of them when they fit; a longer video is read at ``max_frames`` clips
    spread over its whole length, not cut after its first ``max_frames``.
    """
    if n_clips <= max_frames:
        return np.arange(n_clips)
    return np.linspace(0, n_clips - 1, max_frames).round().astype(int)


def pad_clips(features: list[np.ndarray], visual_words: list[np.ndarray] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(video, video_mask, video_tokens) of a batch of videos, padded to the longest.

    ``features[i]`` is video i's (n_i, D) clip features; ``video`` is zero and
    ``video_mask`` False where padded. ``visual_words[i]``, when given, is its
    (n_i,) codebook words, which become model ids ``w + VISUAL_TOKEN_OFFSET``
    (``VISUAL_PAD_ID`` where padded); without them ``video_tokens`` is None.
    """
    import torch

    batch, longest, dim = len(features), max(len(f) for f in features), features[0].shape[1]
    video = torch.zeros(batch, longest, dim)
    video_mask = torch.zeros(batch, longest, dtype=torch.bool)
    video_tokens = None
    if visual_words is not None:
        video_tokens = torch.full((batch, longest), VISUAL_PAD_ID, dtype=torch.long)
    for i, clips in enumerate(features):
        n = len(clips)
        video[i, :n] = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float32))
        video_mask[i, :n] = True
        if video_tokens is not None:
            video_tokens[i, :n] = torch.from_numpy(np.asarray(visual_words[i], dtype=np.int64)) + VISUAL_TOKEN_OFFSET
    return video, video_mask, video_tokens


def batch_to(batch: dict, device: torch.device | str) -> dict:
    """The batch with its tensors on ``device`` (other values, e.g. video ids, as they are)."""
    import torch

    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
