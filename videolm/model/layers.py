"""Small pieces shared by the models and the objectives' heads: MLP heads, BERT's initialisation, masked means.

The transformer layers themselves are ``transformers``' BERT layers (``bert_layers.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


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
