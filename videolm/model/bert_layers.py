"""BERT-style (post-LayerNorm) building blocks from ``transformers``, sized by ``ModelConfig``.

The papers' models (UniVL's visual, cross and decoder stacks; HERO's temporal
transformer; VideoBERT's one BERT) are BERT layers: attention, add, LayerNorm,
feed-forward, add, LayerNorm (eps 1e-12, exact GELU). ``transformers``' own
``BertEncoder`` provides them, with the state-dict names (``layer.N.attention.self.query``,
``layer.N.crossattention...``, ``layer.N.output.LayerNorm``) that released
checkpoints use, so importing one is a key rename, not a re-implementation.

Masks: every stack here takes boolean key masks (True on real positions) and
hands SDPA a (B, 1, Lq, Lk) boolean mask; the attention implementation is
pinned to ``sdpa`` so a boolean mask is never added to scores by the eager path.
"""

from __future__ import annotations

import torch
import torch.nn as nn

LN_EPS = 1e-12  # BERT's LayerNorm epsilon


def bert_config(hidden: int, layers: int, heads: int, ffn_mult: int, dropout: float, positions: int = 1,
                vocab: int = 1, type_vocab: int = 2, decoder: bool = False):
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn_mult * hidden, hidden_act="gelu", hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, max_position_embeddings=positions,
                     type_vocab_size=type_vocab, layer_norm_eps=LN_EPS, is_decoder=decoder,
                     add_cross_attention=decoder, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def attention_mask(key_mask: torch.Tensor, query_len: int | None = None, causal: bool = False) -> torch.Tensor:
    """(B, 1, Lq, Lk) boolean SDPA mask from a (B, Lk) key mask; causal also hides later keys."""
    lq = key_mask.shape[1] if query_len is None else query_len
    mask = key_mask.bool()[:, None, None, :].expand(-1, 1, lq, -1)
    if causal:
        mask = mask & torch.ones(lq, key_mask.shape[1], dtype=torch.bool, device=key_mask.device).tril()
    return mask


class BertStack(nn.Module):
    """``layers`` BERT layers (``transformers.BertEncoder``); with ``decoder`` each also attends to a memory."""

    def __init__(self, layers: int, hidden: int, heads: int, ffn_mult: int, dropout: float, decoder: bool = False):
        from transformers.models.bert.modeling_bert import BertEncoder

        super().__init__()
        self.encoder = BertEncoder(bert_config(hidden, layers, heads, ffn_mult, dropout, decoder=decoder))

    @property
    def layer(self) -> nn.ModuleList:
        return self.encoder.layer

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, causal: bool = False,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask(key_mask, x.shape[1], causal)
        mem = None if memory is None else attention_mask(memory_mask, x.shape[1])
        return self.encoder(x, attention_mask=mask, encoder_hidden_states=memory,
                            encoder_attention_mask=mem).last_hidden_state


class InputEmbeddings(nn.Module):
    """Input vectors + learned positions (+ token types), LayerNorm, dropout: BERT's embedding recipe.

    ``word_embeddings`` maps the input: a ``Linear`` for clip features (UniVL's
    visual embeddings), an ``Embedding`` for visual words, or ``None`` when the
    input is already hidden-sized (UniVL's cross embeddings).
    """

    def __init__(self, word_embeddings: nn.Module | None, positions: int, hidden: int, dropout: float,
                 types: int = 0):
        super().__init__()
        self.word_embeddings = word_embeddings
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden) if types else None
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.word_embeddings is not None:
            x = self.word_embeddings(x)
        if position_ids is None:
            if x.shape[1] > self.position_embeddings.num_embeddings:
                raise ValueError(f"{x.shape[1]} positions exceed the table of {self.position_embeddings.num_embeddings}")
            x = x + self.position_embeddings.weight[: x.shape[1]]
        else:
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None and type_ids is not None:
            x = x + self.token_type_embeddings(type_ids)
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    """BERT's pooler: the first position through dense + tanh (UniVL's ``cross.pooler``)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(states[:, 0]))


def prediction_transform(hidden: int) -> nn.Module:
    """BERT's LM-head transform (dense, GELU, LayerNorm eps 1e-12) before the tied output embeddings."""
    from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

    return BertPredictionHeadTransform(bert_config(hidden, 1, 1, 4, 0.0))
