"""Transformer pieces shared by the model and the objectives' heads.

Our own layers call ``F.scaled_dot_product_attention`` (fused kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def padding_mask(key_mask: torch.Tensor, query_len: int, causal: bool = False) -> torch.Tensor:
    """(B, 1, Lq, Lk) boolean mask for SDPA, True where attention is allowed."""
    mask = key_mask[:, None, None, :].expand(-1, 1, query_len, -1)
    if causal:
        tri = torch.ones(query_len, key_mask.shape[1], dtype=torch.bool, device=key_mask.device).tril()
        mask = mask & tri
    return mask


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, context, mask):
        B, Lq, H = x.shape
        q = self.q(x).view(B, Lq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Lq, H))


class Block(nn.Module):
    """Pre-LayerNorm transformer layer; with ``cross=True`` it also attends to a memory."""

    def __init__(self, hidden: int, heads: int, ffn_mult: int, dropout: float, cross: bool = False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(hidden), Attention(hidden, heads, dropout)
        self.cross = cross
        if cross:
            self.ln_cross, self.cross_attn = nn.LayerNorm(hidden), Attention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, ffn_mult * hidden), nn.GELU(), nn.Linear(ffn_mult * hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, memory=None, memory_mask=None):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, mask))
        if self.cross:
            x = x + self.drop(self.cross_attn(self.ln_cross(x), memory, memory_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class Stack(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, ffn_mult: int, dropout: float, cross: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn_mult, dropout, cross) for _ in range(layers))
        self.ln = nn.LayerNorm(hidden)

    def forward(self, x, key_mask, causal=False, memory=None, memory_key_mask=None):
        mask = padding_mask(key_mask, x.shape[1], causal)
        mem_mask = None if memory is None else padding_mask(memory_key_mask, x.shape[1])
        for block in self.blocks:
            x = block(x, mask, memory, mem_mask)
        return self.ln(x)


def mlp_head(hidden: int, out: int) -> nn.Sequential:
    return init_weights(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, out)))


def init_weights(module: nn.Module, skip: nn.Module | None = None) -> nn.Module:
    """BERT's initialisation (normal, std 0.02; zero biases) for every Linear/Embedding outside ``skip``.

    ``skip`` is the pretrained text encoder, whose weights must survive.
    """
    skip_ids = {id(m) for m in skip.modules()} if skip is not None else set()
    for m in module.modules():
        if id(m) in skip_ids:
            continue
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
