"""CLIP4Clip's layout (Luo et al. 2021): CLIP's text tower against pooled CLIP frame features.

``architecture: dual``. Two towers and no cross-modal pass:

* text: CLIP's text tower from ``text_init: clip:DIR`` (``clip_text.py``);
  ``encode_text`` returns every token state through ``text_projection``, so the
  joint space reads the end-of-text row and gets ``CLIPModel.get_text_features``
  exactly; the text tower's own width (512 for ViT-B/32) never meets ``hidden``;
* video: the clip features ``videolm extract --encoder clip`` stored (CLIP's
  projected image embeddings), read as they are (``video_layers: 0``, CLIP4Clip's
  meanP) or through CLIP4Clip's seqTransf (``video_layers: N``): learned frame
  positions added, N pre-LN CLIP transformer layers with padded frames masked out,
  the input features added back. Its layers start from the first N layers of
  CLIP's text transformer and its positions from the text position table, as
  CLIP4Clip initialises them, when the widths match;
* joint space: each frame vector L2-normalised, mean over the real frames,
  normalised again (CLIP4Clip's pooling); the text end-of-text vector normalised.
  ``embed_dim: 0`` scores in CLIP's own space (the feature and projection widths
  must agree); ``embed_dim > 0`` adds a Linear on each side. ``logit_scale`` starts
  at CLIP's learned one.

The image tower is not trained (features are precomputed): CLIP4Clip fine-tunes
it too, at the same ``coef_lr`` as the text tower.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .clip_text import (DEFAULT_LOGIT_SCALE, clip_dir, clip_logit_scale, is_clip, load_clip_text,
                        random_clip_text)
from .layers import masked_mean
from .video_text import ModelConfig, check_inputs, need_part


class DualJointSpace(nn.Module):
    """Retrieval vectors of the dual layout; ``logit_scale`` is the contrastive temperature (log)."""

    def __init__(self, text_dim: int, video_dim: int, embed_dim: int, logit_scale: float):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, embed_dim) if embed_dim else nn.Identity()
        self.video_proj = nn.Linear(video_dim, embed_dim) if embed_dim else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def text(self, text_h: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # the end-of-text token is the last real one: the tokenizer closes every text with it, padding follows
        last = text_mask.long().sum(1).clamp_min(1) - 1
        return F.normalize(self.text_proj(text_h[torch.arange(len(text_h), device=text_h.device), last]), dim=-1)

    def video(self, video_h: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        frames = F.normalize(video_h, dim=-1)  # CLIP4Clip normalises frames before the mean, and the mean after
        return F.normalize(self.video_proj(masked_mean(frames, video_mask)), dim=-1)

    def clips(self, video_h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video_proj(F.normalize(video_h, dim=-1)), dim=-1)


class FrameTransformer(nn.Module):
    """CLIP4Clip's seqTransf over a video's frame features, with a residual to its input."""

    def __init__(self, layer_cfg, layers: int, max_frames: int):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        self.positions = nn.Embedding(max_frames, layer_cfg.hidden_size)
        self.layers = nn.ModuleList(CLIPEncoderLayer(layer_cfg) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.positions(torch.arange(x.shape[1], device=x.device))[None]
        # additive key mask: padded frames are never attended to (CLIP4Clip: -1e6 on them)
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(~mask, torch.finfo(h.dtype).min)
        bias = bias[:, None, None, :]
        for layer in self.layers:
            h = layer(h, bias)
        return h + x

    def init_from_text(self, text_model) -> bool:
        """Start from the text transformer's first layers and positions (CLIP4Clip's initialisation)."""
        layers, table = text_model.encoder.layers, text_model.embeddings.position_embedding.weight
        if table.shape[1] != self.positions.weight.shape[1] or len(layers) < len(self.layers):
            return False  # another width, or fewer text layers than asked for: a fresh start
        with torch.no_grad():
            rows = min(len(table), len(self.positions.weight))
            self.positions.weight[:rows] = table[:rows]
        for ours, theirs in zip(self.layers, layers):
            ours.load_state_dict(theirs.state_dict())
        return True


def frame_layer_config(cfg: ModelConfig, text_config):
    """The frame transformer's layer sizes: the text tower's where the widths match (CLIP4Clip builds it
    like CLIP's text transformer and starts it from those weights), else ``model.heads`` and 4x wide."""
    from transformers import CLIPTextConfig

    dim = cfg.feature_dim
    if text_config.hidden_size == dim:
        heads, inner, act = text_config.num_attention_heads, text_config.intermediate_size, text_config.hidden_act
    else:
        heads, inner, act = cfg.heads, 4 * dim, "quick_gelu"
    if dim % heads:
        raise ConfigError(f"the dual layout's frame transformer runs at the feature width {dim}, which "
                          f"model.heads={heads} does not divide (CLIP4Clip: 512 wide, 8 heads)")
    layer_cfg = CLIPTextConfig(hidden_size=dim, intermediate_size=inner, num_attention_heads=heads,
                               hidden_act=act, attention_dropout=0.0, layer_norm_eps=text_config.layer_norm_eps)
    layer_cfg._attn_implementation = "sdpa"
    return layer_cfg


class DualEncoderModel(nn.Module):
    text_input = "text"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_inputs(cfg)
        self.cfg, self.parts = cfg, cfg.built_parts
        self.text = build_dual_text(cfg)
        projection = int(self.text.config.projection_dim)
        if not cfg.embed_dim and projection != cfg.feature_dim:
            raise ConfigError(f"the text tower projects to {projection}-d but the clip features are "
                              f"{cfg.feature_dim}-d: extract them with the same CLIP (--encoder clip --weights), "
                              "or set embed_dim > 0 to learn projections")
        self.frames = None
        if cfg.video_layers:
            layer_cfg = frame_layer_config(cfg, self.text.config)
            self.frames = FrameTransformer(layer_cfg, cfg.video_layers, cfg.max_frames)
            if is_clip(cfg.text_init):
                self.frames.init_from_text(self.text.text_model)
        scale = clip_logit_scale(clip_dir(cfg.text_init)) if is_clip(cfg.text_init) else DEFAULT_LOGIT_SCALE
        self.joint = DualJointSpace(projection, cfg.feature_dim, cfg.embed_dim, scale)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, projection_dim): every token state of CLIP's text tower through ``text_projection``."""
        h = self.text.text_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.text.text_projection(h)

    def encode_video(self, mask: torch.Tensor, video: torch.Tensor, tokens: torch.Tensor | None = None):
        """(B, T, D): the clip features (meanP) or the frame transformer's states (seqTransf)."""
        if video is None:
            raise ValueError("the dual layout reads clip features (video), not visual words")
        if video.shape[1] > self.cfg.max_frames:
            raise ValueError(f"{video.shape[1]} clips exceed the model's max_frames={self.cfg.max_frames}")
        return video if self.frames is None else self.frames(video, mask)

    def forward(self, inputs: dict, local_only: bool = False):
        need_part(self, "cross", "the cross-modal pass (mlm, mfm, caption)")


def build_dual_text(cfg: ModelConfig):
    if is_clip(cfg.text_init):
        return load_clip_text(cfg.text_init, cfg.max_text_len, cfg.text_layers)
    if cfg.text_init != "none":
        raise ConfigError(f"model.architecture 'dual' takes text_init 'clip:DIR' (CLIP's text tower) or 'none', "
                          f"got {cfg.text_init!r}")
    from transformers import BertConfig

    from .text import default_text_dir

    # untrained, over the default WordPiece vocabulary so token ids mean what the default tokenizer says
    vocab = BertConfig.from_pretrained(str(default_text_dir()), local_files_only=True).vocab_size
    projection = cfg.hidden if cfg.embed_dim else cfg.feature_dim
    return random_clip_text(vocab, cfg.hidden, cfg.heads, cfg.text_layers, cfg.max_text_len, projection)
