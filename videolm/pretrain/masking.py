"""Masks, corruptions and the facts objectives draw them from: all randomness comes from a generator.

Masks are drawn on the CPU from ``gen`` (a ``torch.Generator`` the trainer seeds
per step) and moved to the batch's device, so a resumed run, or the same run on
another device, draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.inputs import VISUAL_MASK_ID

IGNORE = -100


@dataclass(frozen=True)
class TextVocab:
    """The tokenizer facts objectives need (special ids are excluded from masking)."""

    size: int
    pad: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_tokenizer(cls, tok) -> "TextVocab":
        return cls(tok.vocab_size, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)


def uniform(shape, gen, device) -> torch.Tensor:
    """U[0, 1) draws of ``shape`` from ``gen`` (on the CPU), moved to ``device``."""
    return torch.rand(shape, generator=gen).to(device)


def sample_mask(valid: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Bernoulli(prob) over ``valid`` positions, with at least one position chosen per batch."""
    chosen = (uniform(valid.shape, gen, valid.device) < prob) & valid
    if not chosen.any() and valid.any():
        flat = valid.flatten().nonzero().squeeze(1)
        pick = flat[torch.randint(len(flat), (1,), generator=gen).item()]
        chosen.view(-1)[pick] = True
    return chosen


def same_video(batch: dict, keys: torch.Tensor | None = None) -> torch.Tensor:
    k = batch["video_key"] if keys is None else keys
    return k[:, None] == k[None, :]


def hide_clips(batch: dict, chosen: torch.Tensor) -> dict:
    """The batch with ``chosen`` clips hidden: features zeroed, visual words -> [MASK]."""
    out = {**batch, "video": batch["video"].masked_fill(chosen.unsqueeze(-1), 0.0)}
    if batch.get("video_tokens") is not None:
        out["video_tokens"] = batch["video_tokens"].masked_fill(chosen, VISUAL_MASK_ID)
    return out


def hide_whole_texts(model, batch: dict, prob: float, vocab: "TextVocab", gen) -> dict:
    """UniVL's EnhancedV: with probability ``prob`` per example, every word of its text becomes [MASK]
    ([CLS], [SEP] and padding stay), so the video side alone must carry what the objective predicts."""
    if prob <= 0:
        return batch
    key = model.text_input
    ids, mask = batch[f"{key}_ids"], batch[f"{key}_mask"]
    whole = uniform(ids.shape[:1], gen, ids.device) < prob
    words = mask & (ids != vocab.cls) & (ids != vocab.sep) & (ids != vocab.pad)
    hidden = words & whole.view(-1, *[1] * (ids.dim() - 1))
    return {**batch, f"{key}_ids": ids.masked_fill(hidden, vocab.mask)}


def shuffle_clips(valid: torch.Tensor, prob: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ~``prob`` of each row's clips (at least 2 where a row has 2) and rotate them.

    Returns ``order`` (B, T): the clip that lands at each position (identity
    elsewhere), and ``moved`` (B, T): True at positions that received another
    clip. Rotating the chosen set in random order moves every chosen clip, so
    each target differs from the position it is predicted at.
    """
    B, T = valid.shape
    order = torch.arange(T).repeat(B, 1)
    moved = torch.zeros(B, T, dtype=torch.bool)
    counts = valid.sum(1).cpu()
    for b in range(B):
        n = int(counts[b])
        if n < 2:
            continue
        k = max(2, int(round(prob * n)))
        pos = torch.randperm(n, generator=gen)[:k]  # valid positions come first in every row
        order[b, pos] = pos.roll(1)
        moved[b, pos] = True
    return order.to(valid.device), moved.to(valid.device)
