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
    """Token ids ``[CLS] ... [SEP]`` (CLIP: start ... end of text) of each text, padded to the longest (at most
    ``max_len``), and its mask."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def text_bounds(tokenizer) -> tuple[int, int]:
    """The ids that open and close every text: WordPiece's [CLS] / [SEP], or CLIP's start / end of text."""
    if tokenizer.cls_token_id is not None:
        return tokenizer.cls_token_id, tokenizer.sep_token_id
    return tokenizer.bos_token_id, tokenizer.eos_token_id


class CaptionTokens:
    """``tokenize`` for texts that come back: each distinct text goes through the tokenizer once.

    Training reads every caption again each epoch, and in one batch twice: joined with
    the rest of its example's text and on its own as a subtitle. The WordPiece ids of
    texts joined with spaces are the ids of each text one after the other (BERT's
    normaliser works per character and its pre-tokeniser splits at whitespace; CLIP's
    BPE likewise splits words at whitespace before merging inside each), so
    one entry per caption serves both, and ``pack`` gives exactly ``tokenize``'s
    tensors. Entries are the ids as bytes (uint16 for vocabularies below 65536: about
    100 bytes per caption); at ``max_entries`` the cache starts afresh, so memory
    stays bounded. Each DataLoader worker builds its own as it goes.
    """

    def __init__(self, tokenizer, max_len: int, max_entries: int = 1_000_000):
        self.tokenizer, self.max_len, self.max_entries = tokenizer, max_len, max_entries
        # longer texts are cut to what the longest ``pack`` keeps, as ``tokenize``'s truncation would
        self.cut = max_len - 2
        self.cls, self.sep = text_bounds(tokenizer)
        self.pad = tokenizer.pad_token_id
        self.dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
        self._ids: dict[str, bytes] = {}

    def ids(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids without [CLS]/[SEP], at most ``max_len - 2``; one tokenizer call for the new ones."""
        if len(self._ids) + len(texts) > self.max_entries:
            self._ids.clear()
        new = list(dict.fromkeys(t for t in texts if t not in self._ids))
        if new:
            enc = self.tokenizer(new, add_special_tokens=False, truncation=True, max_length=self.cut)
            self._ids.update((t, np.asarray(e, dtype=self.dtype).tobytes()) for t, e in zip(new, enc["input_ids"]))
        return [np.frombuffer(self._ids[t], dtype=self.dtype) for t in texts]

    def pack(self, rows: list[list[np.ndarray]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] ids... [SEP]`` of each row (its texts' ids joined, cut to ``max_len``), padded on the
        right to the longest, and its mask: what ``tokenize`` gives for the rows' texts joined by spaces."""
        import torch

        if max_len > self.max_len:
            raise ValueError(f"pack to {max_len} tokens, but the cache keeps at most {self.max_len}")
        joined = [np.concatenate(r)[: max_len - 2] if r else np.zeros(0, dtype=self.dtype) for r in rows]
        width = max((len(j) for j in joined), default=0) + 2
        ids = np.full((len(rows), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for i, j in enumerate(joined):
            ids[i, 0], ids[i, 1 : len(j) + 1], ids[i, len(j) + 1] = self.cls, j, self.sep
            mask[i, : len(j) + 2] = True
        return torch.from_numpy(ids), torch.from_numpy(mask)


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
