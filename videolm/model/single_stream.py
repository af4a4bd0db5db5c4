"""single_stream: VideoBERT's layout (Sun et al. 2019): one BERT over text and visual words together.

The sequence is ``[CLS] text [SEP] visual words [SEP]``: the text encoder's BERT
(initialised from ``text_init``) reads it whole, with token type 0 on the text
and 1 on the video. The vocabulary is extended by the codebook's words: a new
embedding table (``visual_words``, one row per model id ``w + VISUAL_TOKEN_OFFSET``
and the 5 special ids) sits beside BERT's word table, which is what adding rows to
BERT's vocabulary amounts to. With ``video_input: features`` a Linear embeds clip
features instead (not VideoBERT, but it lets the same layout read features).

Positions run on from the text: the clips of an example whose text has n tokens
take positions n, n+1, ..., and the closing [SEP] the next one, as if the sequence
were packed, whatever the padding of the batch. So ``max_text_len + max_frames + 1``
must fit the BERT's position table (MiniLM: 512).

Each side alone (``encode_text``, ``encode_video``) is the same BERT over one
modality: it gives the joint space its vectors. ``align``: pooler (dense + tanh at
[CLS]) and a Linear, VideoBERT's linguistic-visual alignment classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from .bert_layers import Pooler
from .layers import init_weights
from .text import build_text_encoder
from .video_text import JointSpace, ModelConfig, VideoTextOutput, check_inputs, need_part


class SingleStreamModel(nn.Module):
    text_input = "text"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_inputs(cfg)
        self.cfg, self.parts = cfg, cfg.built_parts
        H = cfg.hidden
        self.text = build_text_encoder(cfg.text_init, H, cfg.text_layers, cfg.heads,
                                       cfg.max_text_len + cfg.max_frames + 1, cfg.dropout)
        positions = self.text.config.max_position_embeddings
        if cfg.max_text_len + cfg.max_frames + 1 > positions:
            raise ConfigError(f"single_stream reads max_text_len + max_frames + 1 = "
                              f"{cfg.max_text_len + cfg.max_frames + 1} positions but its BERT has {positions}")
        if self.text.config.type_vocab_size < 2:
            raise ConfigError("single_stream needs a BERT with 2 token types (text and video)")
        if cfg.video_input == "tokens":
            self.visual_words = nn.Embedding(cfg.visual_vocab, H)
        else:
            self.visual_words = nn.Linear(cfg.feature_dim, H)
        if "cross" in self.parts:  # the joint sequence; joint alone reads each side alone and needs none of it
            # the video block's closing [SEP]: one more row of the extended vocabulary
            self.video_sep = nn.Parameter(torch.randn(H) * 0.02)
        self.joint = JointSpace(H, cfg.embed_dim)
        if "align" in self.parts:
            self.align_pooler = Pooler(H)
            self.align_head = nn.Linear(H, 1)
        init_weights(self, skip=self.text)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.text.get_input_embeddings().weight

    def _video_vectors(self, video, tokens) -> torch.Tensor:
        if self.cfg.video_input == "tokens":
            if tokens is None:
                raise ValueError("this model reads visual words (video_input: tokens) but the batch has none")
            x = self.visual_words(tokens)
        else:
            x = self.visual_words(video)
        if x.shape[1] > self.cfg.max_frames:
            raise ValueError(f"{x.shape[1]} clips exceed the model's max_frames={self.cfg.max_frames}")
        return x

    def _run(self, embeds, mask, positions, types) -> torch.Tensor:
        return self.text(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
                         token_type_ids=types).last_hidden_state

    def _sequence(self, ids, text_mask, video_mask, video, tokens):
        """Embeddings, mask, positions and types of ``[CLS] text [SEP] | clips [SEP]`` (text block padded to L)."""
        B, L = ids.shape
        clips = self._video_vectors(video, tokens)
        T = clips.shape[1]
        sep = self.video_sep.to(clips.dtype).expand(B, 1, -1)
        n_clips = video_mask.sum(1)
        # the closing [SEP] goes right after each example's last real clip
        slot = torch.arange(T + 1, device=ids.device)[None]
        is_sep = slot == n_clips[:, None]
        video_block = torch.cat([clips, torch.zeros_like(clips[:, :1])], 1)
        video_block = torch.where(is_sep[..., None], sep, video_block)
        embeds = torch.cat([self.text.embeddings.word_embeddings(ids), video_block], 1)
        mask = torch.cat([text_mask, (slot <= n_clips[:, None])], 1)
        text_len = text_mask.sum(1, keepdim=True)
        positions = torch.cat([torch.arange(L, device=ids.device).expand(B, L), text_len + slot], 1)
        types = torch.cat([torch.zeros_like(ids), torch.ones(B, T + 1, dtype=torch.long, device=ids.device)], 1)
        return embeds, mask, positions, types

    # ------------------------------------------------------------------ each side alone
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def encode_video(self, mask: torch.Tensor, video=None, tokens=None) -> torch.Tensor:
        x = self._video_vectors(video, tokens)
        B, T = mask.shape
        pos = torch.arange(T, device=mask.device).expand(B, T)
        return self._run(x, mask, pos, torch.ones(B, T, dtype=torch.long, device=mask.device))

    # ------------------------------------------------------------------ the joint sequence
    def forward(self, inputs: dict, **_levels) -> VideoTextOutput:
        need_part(self, "cross", "the joint sequence")
        ids, tm, vm = inputs["text_ids"], inputs["text_mask"], inputs["video_mask"]
        y = self._run(*self._sequence(ids, tm, vm, inputs.get("video"), inputs.get("video_tokens")))
        L, T = ids.shape[1], vm.shape[1]
        cv = y[:, L : L + T]
        pooled = self.align_pooler(y) if "align" in self.parts else None
        return VideoTextOutput(cross_text=y[:, :L], cross_video=cv, clips=cv, pooled=pooled)

    def pair_pooled(self, inputs: dict, text_idx: torch.Tensor, video_idx: torch.Tensor, sides=None) -> torch.Tensor:
        """Pooled [CLS] of each pair, every pair its own joint sequence (``sides`` is not used: one
        sequence mixes both sides from its first layer)."""
        need_part(self, "align", "pair scores")
        pairs = {"text_ids": inputs["text_ids"][text_idx], "text_mask": inputs["text_mask"][text_idx],
                 "video_mask": inputs["video_mask"][video_idx]}
        for key in ("video", "video_tokens"):
            if inputs.get(key) is not None:
                pairs[key] = inputs[key][video_idx]
        return self(pairs).pooled

    def align_score(self, pooled: torch.Tensor) -> torch.Tensor:
        need_part(self, "align", "the alignment score")
        return self.align_head(pooled).squeeze(-1)
