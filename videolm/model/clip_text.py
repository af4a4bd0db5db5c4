"""CLIP's text tower and BPE tokenizer from a local Hugging Face CLIP directory (``text_init: clip:DIR``).

``DIR`` is what ``CLIPModel.save_pretrained`` (or ``huggingface-cli download
openai/clip-vit-base-patch32``) writes: ``config.json`` with ``model_type`` clip
(or clip_text_model), the weights, and the tokenizer files (``vocab.json`` +
``merges.txt``, or ``tokenizer.json``). Only the text tower and its
``text_projection`` are loaded; the image tower is what ``videolm extract
--encoder clip`` already ran. Everything loads with ``local_files_only=True``.

The text embedding is CLIP's own (``CLIPModel.get_text_features``): the final
LayerNorm's state at the end-of-text token through ``text_projection``. The model
(``dual_encoder.py``) projects every token state, which is the same thing at the
end-of-text row because the projection is linear without a bias.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..errors import ConfigError

log = logging.getLogger("videolm.model.clip_text")

CLIP_PREFIX = "clip:"
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# CLIP4Clip's learned temperature is CLIP's logit scale, clamped at ln(100) during training (the joint
# objective clamps exp(scale) at 100); without a stored one a new run starts where CLIP did
DEFAULT_LOGIT_SCALE = 2.6592  # ln(1 / 0.07)


def is_clip(text_init: str) -> bool:
    return text_init.startswith(CLIP_PREFIX)


def clip_dir(text_init: str) -> Path:
    """The directory of ``clip:DIR`` (or a bare path), checked to be a CLIP model directory."""
    path = Path(text_init[len(CLIP_PREFIX):] if is_clip(text_init) else text_init).expanduser()
    config = path / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{text_init!r}: {config} is not a readable Hugging Face config ({exc}); "
                          "give a local CLIP directory (CLIPModel.save_pretrained)") from None
    if model_type not in CLIP_MODEL_TYPES:
        raise ConfigError(f"{text_init!r}: {config} says model_type {model_type!r}, not a CLIP model "
                          f"({' or '.join(CLIP_MODEL_TYPES)}); a BERT directory goes in text_init without 'clip:'")
    return path


def is_clip_tokenizer_dir(directory: Path) -> bool:
    """Whether ``directory`` holds CLIP's tokenizer (a checkpoint's ``tokenizer/`` or a CLIP model dir)."""
    try:
        cls = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class") or ""
    except (OSError, ValueError):
        cls = ""
    if cls:
        return cls.startswith("CLIPTokenizer")
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") in CLIP_MODEL_TYPES
    except (OSError, ValueError):
        return False


def load_clip_tokenizer(directory: Path):
    from transformers import CLIPTokenizer  # backed by the tokenizers library (fast) in transformers 5

    try:
        return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load CLIP's BPE tokenizer from {directory} (vocab.json + merges.txt or "
                          f"tokenizer.json): {exc}") from None


def load_clip_text(text_init: str, max_len: int, layers: int):
    """``CLIPTextModelWithProjection`` from the directory (text tower + ``text_projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .text import _quietly

    directory = clip_dir(text_init)
    cfg = CLIPTextConfig.from_pretrained(str(directory), local_files_only=True)
    # a CLIPModel's config keeps the projection width at its top level; its text_config may hold a default
    top = json.loads((directory / "config.json").read_text())
    if top.get("model_type") == "clip" and top.get("projection_dim"):
        cfg.projection_dim = int(top["projection_dim"])
    if cfg.max_position_embeddings < max_len:
        raise ConfigError(f"max_text_len={max_len} but CLIP's text tower in {directory} has "
                          f"{cfg.max_position_embeddings} positions (77 for OpenAI's CLIP)")
    if layers and layers < cfg.num_hidden_layers:
        cfg.num_hidden_layers = layers
    try:
        model = _quietly(lambda: CLIPTextModelWithProjection.from_pretrained(
            str(directory), config=cfg, local_files_only=True, dtype=torch.float32))
    except OSError as exc:
        raise ConfigError(f"cannot load CLIP's text tower from {directory}: {exc}") from None
    log.info("text encoder: CLIP %s (%d layers, hidden %d, projection %d)", directory, cfg.num_hidden_layers,
             cfg.hidden_size, cfg.projection_dim)
    return model


def random_clip_text(vocab: int, hidden: int, heads: int, layers: int, max_len: int, projection: int):
    """An untrained CLIP text tower (``text_init: none`` on the dual layout), over the default vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers or 2, num_attention_heads=heads,
                         max_position_embeddings=max(max_len, 77), projection_dim=projection)
    return CLIPTextModelWithProjection(cfg)


def weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(f"{directory}: no CLIP weights ({' or '.join(WEIGHT_FILES)})")


def clip_logit_scale(directory: Path) -> float:
    """CLIPModel's learned ``logit_scale`` from the weights file (a text-only directory has none)."""
    path = weights_file(directory)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return float(f.get_tensor("logit_scale")) if "logit_scale" in f.keys() else DEFAULT_LOGIT_SCALE
    state = torch.load(path, map_location="cpu", weights_only=True)
    return float(state["logit_scale"]) if "logit_scale" in state else DEFAULT_LOGIT_SCALE


def weights_fingerprint(directory: Path) -> dict:
    """Path and sha256 of the weights file: what a zero-shot report names as the model."""
    path = weights_file(directory)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"weights": str(directory.resolve()), "weights_file": path.name, "sha256": digest.hexdigest()}
