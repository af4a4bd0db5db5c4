"""two_stream: UniVL's layout (Luo et al. 2020; microsoft/UniVL ``modules/``).

* text encoder: a BERT (``text.py``; UniVL: bert-base, 12 layers);
* visual encoder: clip features LayerNorm-ed (UniVL's ``normalize_video``), a
  Linear embedding with learned positions, LayerNorm, then BERT layers (UniVL: 6);
  with ``video_input: tokens`` the Linear becomes an embedding table of visual words;
* joint space: mean-pooled text (after [CLS]) and clip states (``JointSpace``);
  ``embed_dim: 0`` scores them unprojected, as UniVL does;
* ``cross``: ``[text; video]`` plus positions and type embeddings, LayerNorm, BERT
  layers (UniVL: 2);
* ``align``: the cross pooler (dense + tanh at the text's [CLS]) and a Linear on it
  (UniVL's ``similarity_dense``);
* ``decoder``: BERT decoder layers (self-attention, attention to the cross
  encoder's output, feed-forward; UniVL: 3), input embeddings shared with the text
  encoder's word and position tables under their own LayerNorm, output through
  BERT's prediction transform and the tied word embeddings.

Cross positions: text tokens take 0..L-1 and clip t takes ``max_text_len + t``,
so a clip's position does not depend on how long the batch's longest text is
(UniVL pads every text to ``max_words`` and gets the same numbers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bert_layers import LN_EPS, BertStack, InputEmbeddings, Pooler, prediction_transform
from .layers import init_weights
from .text import build_text_encoder
from .video_text import JointSpace, ModelConfig, VideoTextOutput, check_inputs, need_part


class TwoStreamModel(nn.Module):
    text_input = "text"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_inputs(cfg)
        self.cfg, self.parts = cfg, cfg.built_parts
        H = cfg.hidden
        self.text = build_text_encoder(cfg.text_init, H, cfg.text_layers, cfg.heads, cfg.max_text_len, cfg.dropout)
        if cfg.video_input == "tokens":
            self.video_norm, video_words = None, nn.Embedding(cfg.visual_vocab, H)
        else:
            self.video_norm = nn.LayerNorm(cfg.feature_dim, eps=LN_EPS)
            video_words = nn.Linear(cfg.feature_dim, H)
        self.video_embed = InputEmbeddings(video_words, cfg.max_frames, H, cfg.dropout)
        self.video_encoder = self._stack(cfg.video_layers)
        self.joint = JointSpace(H, cfg.embed_dim)
        if "cross" in self.parts:
            self.cross_embed = InputEmbeddings(None, cfg.max_text_len + cfg.max_frames, H, cfg.dropout, types=2)
            self.cross_encoder = self._stack(cfg.cross_layers)
        if "align" in self.parts:  # UniVL's cross pooler feeds only its pair score
            self.cross_pooler = Pooler(H)
            self.align_head = nn.Linear(H, 1)
        if "decoder" in self.parts:
            self.decoder_norm = nn.LayerNorm(H, eps=LN_EPS)
            self.decoder_drop = nn.Dropout(cfg.dropout)
            self.decoder = self._stack(cfg.decoder_layers, decoder=True)
            self.decoder_head = prediction_transform(H)
            self.caption_bias = nn.Parameter(torch.zeros(self.word_embeddings.shape[0]))
        init_weights(self, skip=self.text)

    def _stack(self, layers: int, decoder: bool = False) -> BertStack:
        c = self.cfg
        return BertStack(layers, c.hidden, c.heads, c.ffn_mult, c.dropout, decoder)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.text.get_input_embeddings().weight

    # ------------------------------------------------------------------ each side alone
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def encode_video(self, mask: torch.Tensor, video: torch.Tensor | None = None,
                     tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Clip features (or, with ``video_input: tokens``, visual words) -> (B, T, H)."""
        if self.cfg.video_input == "tokens":
            if tokens is None:
                raise ValueError("this model reads visual words (video_input: tokens) but the batch has none")
            x = tokens
        else:
            x = self.video_norm(video)
        if x.shape[1] > self.cfg.max_frames:
            raise ValueError(f"{x.shape[1]} clips exceed the model's max_frames={self.cfg.max_frames}")
        return self.video_encoder(self.video_embed(x), mask)

    # ------------------------------------------------------------------ cross-modal
    def cross(self, text_h, text_mask, video_h, video_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(text states, clip states, pooled) of the cross encoder over the two sides' states (pooled: with align)."""
        need_part(self, "cross", "the cross encoder")
        L, T = text_h.shape[1], video_h.shape[1]
        dev = text_h.device
        positions = torch.cat([torch.arange(L, device=dev), self.cfg.max_text_len + torch.arange(T, device=dev)])
        types = torch.cat([torch.zeros(L, dtype=torch.long, device=dev), torch.ones(T, dtype=torch.long, device=dev)])
        x = self.cross_embed(torch.cat([text_h, video_h], 1), positions[None], types[None])
        y = self.cross_encoder(x, torch.cat([text_mask, video_mask], 1))
        return y[:, :L], y[:, L:], (self.cross_pooler(y) if "align" in self.parts else None)

    def forward(self, inputs: dict, **_levels) -> VideoTextOutput:
        tm, vm = inputs["text_mask"], inputs["video_mask"]
        text_h = self.encode_text(inputs["text_ids"], tm)
        video_h = self.encode_video(vm, inputs.get("video"), inputs.get("video_tokens"))
        ct, cv, pooled = self.cross(text_h, tm, video_h, vm)
        return VideoTextOutput(cross_text=ct, cross_video=cv, clips=cv, pooled=pooled)

    def pair_pooled(self, inputs: dict, text_idx: torch.Tensor, video_idx: torch.Tensor,
                    sides: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Pooled cross states of the pairs (text ``text_idx[i]``, video ``video_idx[i]``); each side encoded
        once, or taken from ``sides`` ((text states, video states) of ``inputs`` already encoded)."""
        need_part(self, "align", "pair scores")
        tm, vm = inputs["text_mask"], inputs["video_mask"]
        if sides is None:
            sides = (self.encode_text(inputs["text_ids"], tm),
                     self.encode_video(vm, inputs.get("video"), inputs.get("video_tokens")))
        text_h, video_h = sides
        return self.cross(text_h[text_idx], tm[text_idx], video_h[video_idx], vm[video_idx])[2]

    def align_score(self, pooled: torch.Tensor) -> torch.Tensor:
        need_part(self, "align", "the alignment score")
        return self.align_head(pooled).squeeze(-1)

    def decode(self, ids, mask, memory, memory_mask, last_only: bool = False) -> torch.Tensor:
        """Caption logits (B, L, vocab) for teacher-forced ``ids`` attending to ``memory``; with
        ``last_only``, (B, 1, vocab) at the last position only (generation: the vocabulary projection
        is most of a step's work)."""
        need_part(self, "decoder", "caption decoding")
        L = ids.shape[1]
        if L > self.cfg.max_text_len:
            raise ValueError(f"caption of {L} tokens exceeds max_text_len={self.cfg.max_text_len}")
        positions = self.text.embeddings.position_embeddings.weight[:L]  # shared with the text encoder (UniVL)
        x = self.decoder_drop(self.decoder_norm(F.embedding(ids, self.word_embeddings) + positions))
        h = self.decoder(x, mask, causal=True, memory=memory, memory_mask=memory_mask)
        if last_only:
            h = h[:, -1:]
        return self.decoder_head(h) @ self.word_embeddings.t() + self.caption_bias
