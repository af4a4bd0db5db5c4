"""hierarchical: HERO's layout (Li et al. 2020; linjieli222/HERO ``model/model.py``).

* local, the Cross-modal Transformer: for each subtitle, the clips it owns
  (``clip_owner``, the IoU rule in ``pretrain.collate``) followed by the
  subtitle's tokens, through the text encoder's BERT (HERO starts it from RoBERTa;
  here from ``text_init``). Clips are embedded like HERO's frames: LayerNorm,
  Linear, position (the clip's index in the video), token type 1, LayerNorm.
* global, the Temporal Transformer: every clip of the video, each the sum of a
  transform of its raw feature (LayerNorm, Linear, ReLU) and its local output
  (zero for a clip no subtitle owns: HERO's video-only frames), plus positions,
  through BERT layers (``temporal_layers``; HERO: 3; its local level has 6).

Objectives read what HERO's ``model/pretrain.py`` reads: mlm the local text
states (``cross_text``, shaped like ``sub_ids``); mfm, fom and vsm the global clip
states (``clips``). fom shuffles between the levels (``clip_order``), as HERO
does, so the local level sees the clips in time order. A text alone (vsm's
query, retrieval) is the same BERT over the text; a video alone is the global
level without subtitles.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from .bert_layers import LN_EPS, BertStack, InputEmbeddings, attention_mask
from .layers import init_weights
from .text import build_text_encoder
from .video_text import JointSpace, ModelConfig, VideoTextOutput, check_inputs, need_part


class HierarchicalModel(nn.Module):
    text_input = "sub"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_inputs(cfg)
        self.cfg, self.parts = cfg, cfg.built_parts
        H = cfg.hidden
        self.text = build_text_encoder(cfg.text_init, H, cfg.text_layers, cfg.heads, cfg.max_text_len, cfg.dropout)
        if self.text.config.type_vocab_size < 2:
            raise ConfigError("hierarchical needs a BERT with 2 token types (subtitle and clip)")
        if "cross" in self.parts:  # the local level's clip input; joint alone runs the global level only
            self.frame_embed = InputEmbeddings(self._clip_input(), cfg.max_frames, H, cfg.dropout)
        self.frame_transform = nn.Sequential(self._clip_input(), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.temporal_embed = InputEmbeddings(None, cfg.max_frames, H, cfg.dropout)
        self.temporal_encoder = BertStack(cfg.temporal_layers, H, cfg.heads, cfg.ffn_mult, cfg.dropout)
        self.joint = JointSpace(H, cfg.embed_dim)
        init_weights(self, skip=self.text)

    def _clip_input(self) -> nn.Module:
        c = self.cfg
        if c.video_input == "tokens":
            return nn.Embedding(c.visual_vocab, c.hidden)
        return nn.Sequential(nn.LayerNorm(c.feature_dim, eps=LN_EPS), nn.Linear(c.feature_dim, c.hidden))

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.text.get_input_embeddings().weight

    def _clips(self, video, tokens) -> torch.Tensor:
        x = tokens if self.cfg.video_input == "tokens" else video
        if x is None:
            raise ValueError("this model reads visual words (video_input: tokens) but the batch has none")
        if x.shape[1] > self.cfg.max_frames:
            raise ValueError(f"{x.shape[1]} clips exceed the model's max_frames={self.cfg.max_frames}")
        return x

    # ------------------------------------------------------------------ each side alone
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def encode_video(self, mask: torch.Tensor, video=None, tokens=None) -> torch.Tensor:
        return self._global(self.frame_transform(self._clips(video, tokens)), mask)

    # ------------------------------------------------------------------ the two levels
    def _local(self, inputs: dict, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text states (B, S, Ls, H), clip states (B, T, H)) of the Cross-modal Transformer per subtitle."""
        sub_ids, sub_mask, owner, vm = inputs["sub_ids"], inputs["sub_mask"], inputs["clip_owner"], inputs["video_mask"]
        B, S, Ls = sub_ids.shape
        H, T = self.cfg.hidden, vm.shape[1]
        rows, subs = inputs["sub_valid"].nonzero(as_tuple=True)
        if len(rows) == 0:
            zeros = self.word_embeddings.new_zeros
            return zeros(B, S, Ls, H), zeros(B, T, H)
        owned = (owner[rows] == subs[:, None]) & vm[rows]  # (N, T): clips of each subtitle
        F = max(1, int(owned.sum(1).max()))
        order = torch.sort((~owned).to(torch.uint8), dim=1, stable=True).indices[:, :F]  # owned clips first, in time
        f_mask = owned.gather(1, order)
        f_in = clips[rows[:, None], order]  # (N, F, D) or (N, F) visual words
        type1 = self.text.embeddings.token_type_embeddings.weight[1]
        frames = self._embedded_frames(f_in, order, type1)
        words = self.text.embeddings(input_ids=sub_ids[rows, subs], token_type_ids=torch.zeros_like(sub_ids[rows, subs]))
        key_mask = torch.cat([f_mask, sub_mask[rows, subs]], 1)
        y = self.text.encoder(torch.cat([frames, words], 1), attention_mask=attention_mask(key_mask)).last_hidden_state
        text_out = y.new_zeros(B, S, Ls, H)
        text_out[rows, subs] = y[:, F:]
        n, f = f_mask.nonzero(as_tuple=True)
        clip_out = y.new_zeros(B, T, H).index_put((rows[n], order[n, f]), y[n, f], accumulate=True)
        return text_out, clip_out

    def _embedded_frames(self, f_in, order, type1) -> torch.Tensor:
        e = self.frame_embed
        x = e.word_embeddings(f_in) + type1 + e.position_embeddings(order)
        return e.dropout(e.LayerNorm(x))

    def _global(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.temporal_encoder(self.temporal_embed(x), mask)

    def forward(self, inputs: dict, local_only: bool = False, clip_order: torch.Tensor | None = None
                ) -> VideoTextOutput:
        """Both levels; ``local_only`` stops after the local one (mlm), ``clip_order`` (B, T) puts clip
        ``clip_order[b, t]`` at global position t (fom)."""
        need_part(self, "cross", "the local (cross-modal) level")
        clips = self._clips(inputs.get("video"), inputs.get("video_tokens"))
        text_out, local_clips = self._local(inputs, clips)
        if local_only:
            return VideoTextOutput(cross_text=text_out, cross_video=local_clips, clips=None)
        g = self.frame_transform(clips) + local_clips  # HERO's residual: raw transform + fused output
        if clip_order is not None:
            g = g.gather(1, clip_order.unsqueeze(-1).expand_as(g))
        return VideoTextOutput(cross_text=text_out, cross_video=local_clips, clips=self._global(g, inputs["video_mask"]))
