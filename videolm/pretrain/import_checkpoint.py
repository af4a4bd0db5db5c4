"""``videolm import-checkpoint univl PATH --out RUN``: a released UniVL checkpoint as a videolm run directory.

The run directory is the one ``videolm pretrain`` writes (``checkpoint.py``), at step 0:

* ``checkpoints/step_0000000/model.safetensors``: the ``two_stream`` model, every key from the file;
* ``objectives.safetensors``: UniVL's stage-2 objectives; the mlm head is UniVL's ``cls``,
  the others (mfm_nce) start fresh, and the report says so;
* ``config.yaml``: model sizes read from the weights, ``embed_dim: 0`` (UniVL's
  unprojected joint space), the recipe of UniVL's stage 2;
* ``text_encoder/``: the text BERT as a local transformers directory (config,
  weights, WordPiece tokenizer); ``model.text_init`` points at it;
* ``import.json``: what was read, kept, cut and left out;
* ``README.md``: the model card (``model_card.py``); no ``features.json``, as UniVL's
  features were made outside videolm.

No ``trainer.pt``: there is no optimiser state to resume. ``eval-retrieval
--checkpoint RUN`` scores it; ``pretrain --init-from RUN`` trains on from it with a
fresh optimiser.
"""

from __future__ import annotations


import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..errors import ConfigError
from ..model.text import _quietly, load_tokenizer
from ..model.univl_checkpoint import check_state_fits, map_univl_state, read_univl_state, univl_sizes
from ..model.video_text import ModelConfig, build_model
from .checkpoint import checkpoint_dir, save_checkpoint
from .model_card import write_model_card
from .objectives import TextVocab, build_objective
from .recipe import PretrainConfig, load_recipe, recipe_from_dict, save_recipe
from .run import task_key

log = logging.getLogger("videolm.pretrain.import_checkpoint")

# UniVL's stage 2 (joint, mlm, mfm_nce, align, caption), with its EnhancedV
UNIVL_OBJECTIVES = {"joint": {"weight": 1.0}, "mlm": {"weight": 1.0, "mask_prob": 0.15},
                    "mfm_nce": {"weight": 1.0, "mask_prob": 0.15, "enhanced_v": 0.15},
                    "align": {"weight": 1.0, "negatives": 3},
                    "caption": {"weight": 1.0, "input_mask_prob": 0.15, "enhanced_v": 0.15}}


# videolm's own parameters that UniVL has no counterpart for, set to a fixed documented value (never random)
VIDEOLM_ONLY = {"joint.logit_scale": "videolm's contrastive temperature (used only by the joint loss in training; "
                                     "UniVL has none): starts at 1/0.07, as in a new run"}


def write_text_encoder(state: dict, sizes: dict, tokenizer_dir: Path, out: Path) -> Path:
    """The text BERT of a UniVL state dict as a transformers directory (config, weights, tokenizer)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], num_hidden_layers=sizes["text_layers"],
                     num_attention_heads=sizes["heads"], intermediate_size=sizes["ffn_mult"] * sizes["hidden"],
                     max_position_embeddings=sizes["text_positions"], type_vocab_size=sizes["type_vocab"],
                     hidden_act="gelu", layer_norm_eps=1e-12)
    bert = BertModel(cfg, add_pooling_layer=False)
    text = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    check_state_fits(bert, text, "UniVL text encoder")
    bert.load_state_dict(text)
    out.mkdir(parents=True, exist_ok=True)
    _quietly(lambda: bert.save_pretrained(str(out)))
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    return out


def import_univl(path: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None, max_words: int = 48,
                 max_frames: int = 64, heads: int | None = None, overwrite: bool = False) -> dict:
    """Convert UniVL's ``path`` into the run directory ``out``; returns the import report.

    Everything is written in a temporary sibling of ``out`` and renamed into place
    at the end, so a refused or interrupted import leaves nothing behind.
    """
    out, t0 = Path(out).resolve(), time.monotonic()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; choose another --out (or pass --overwrite)")
    state = read_univl_state(path)
    sizes = univl_sizes(state, heads)
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.vocab_size != sizes["vocab"]:
        raise ConfigError(f"the tokenizer in {tokenizer_dir or 'the default MiniLM package'} has {tokenizer.vocab_size} "
                          f"words but the checkpoint's text encoder {sizes['vocab']}: give UniVL's own vocabulary "
                          "(bert-base-uncased) with --tokenizer")
    if max_words > sizes["text_positions"]:
        raise ConfigError(f"--max-words {max_words} exceeds the text encoder's {sizes['text_positions']} positions")
    model_state, mlm_state, report = map_univl_state(state, max_words, max_frames)
    tmp = out.with_name(f".tmp-import-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _write_run(tmp, out, model_state, mlm_state, report, sizes, tokenizer, tokenizer_dir,
                             max_words, max_frames)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.update(file=str(Path(path).resolve()), tensors_read=len(state), seconds=round(time.monotonic() - t0, 2),
                   checkpoint=str(checkpoint_dir(out) / "step_0000000"))
    (out / "import.json").write_text(json.dumps(summary, indent=2))
    write_model_card(out, load_recipe(out / "config.yaml"), {"steps": 0}, "imported (UniVL)",
                     notes=[f"converted from `{summary['file']}`; no features recorded (features.json)",
                            *summary["notes"]])
    return summary


def _write_run(tmp: Path, out: Path, model_state: dict, mlm_state: dict, report: list[str], sizes: dict,
               tokenizer, tokenizer_dir, max_words: int, max_frames: int) -> dict:
    text_dir = write_text_encoder(model_state, sizes, Path(tokenizer_dir) if tokenizer_dir else None,
                                  tmp / "text_encoder")
    mcfg = ModelConfig(architecture="two_stream", hidden=sizes["hidden"], heads=sizes["heads"],
                       text_init=str(text_dir), video_layers=sizes["video_layers"],
                       cross_layers=sizes["cross_layers"], decoder_layers=sizes["decoder_layers"],
                       ffn_mult=sizes["ffn_mult"], max_frames=max_frames, max_text_len=max_words, embed_dim=0,
                       feature_dim=sizes["feature_dim"], parts=_parts(sizes))
    model = build_model(mcfg)
    for key, why in VIDEOLM_ONLY.items():
        model_state[key] = model.state_dict()[key]
        report.append(f"{key}: {why}")
    check_state_fits(model, model_state, "UniVL checkpoint -> videolm two_stream")
    model.load_state_dict(model_state)
    # the run's config names the text encoder where it will live, not where it was written
    cfg = _recipe(replace(mcfg, text_init=str(out / "text_encoder")), sizes)
    vocab = TextVocab.from_tokenizer(tokenizer)
    objectives = nn.ModuleDict({task_key(0, o.name): build_objective(o.name, model, vocab, o.options)
                                for o in cfg.stages[0].active})
    if "0:mlm" in objectives:
        check_state_fits(objectives["0:mlm"], mlm_state, "UniVL MLM head (cls.predictions)")
        objectives["0:mlm"].load_state_dict(mlm_state)
    fresh = [k for k in objectives if k != "0:mlm" and len(objectives[k].state_dict())]
    report += [f"objective {k}: its own head starts fresh (UniVL has no matching head)" for k in fresh]
    ckpt = save_checkpoint(tmp, 0, model, objectives, cfg, tokenizer, {"imported": True},
                           {"import_source": "univl"}, keep=1)
    (ckpt / "trainer.pt").unlink()  # nothing to resume: `pretrain --init-from` starts a fresh optimiser
    save_recipe(cfg, tmp / "config.yaml")
    return {"source": "univl", "sizes": sizes, "max_words": max_words, "max_frames": max_frames,
            "model_tensors": len(model_state), "mlm_head_tensors": len(mlm_state), "notes": report,
            "videolm": __version__}


def summary_lines(s: dict) -> list[str]:
    z = s["sizes"]
    return [f"import-checkpoint: {s['tensors_read']} tensors from {s['file']} -> {s['checkpoint']}",
            f"import-checkpoint: two_stream, hidden {z['hidden']}, text/visual/cross/decoder layers "
            f"{z['text_layers']}/{z['video_layers']}/{z['cross_layers']}/{z['decoder_layers']}, "
            f"{z['feature_dim']}-d clip features, {s['seconds']:.1f} s",
            *(f"import-checkpoint: {note}" for note in s["notes"])]


def _parts(sizes: dict) -> tuple[str, ...]:
    parts = ["cross", "align"] if sizes["cross_layers"] else []
    return tuple(parts + (["decoder"] if sizes["decoder_layers"] else []))


def _recipe(mcfg: ModelConfig, sizes: dict) -> PretrainConfig:
    """UniVL's stage-2 recipe around the imported model (what ``pretrain --init-from`` continues by default)."""
    objectives = {k: v for k, v in UNIVL_OBJECTIVES.items()
                  if (k not in ("mlm", "mfm_nce", "align", "caption") or sizes["cross_layers"])
                  and (k != "caption" or sizes["decoder_layers"])}
    cfg = recipe_from_dict({"data": {"mode": "segment", "max_frames": mcfg.max_frames, "min_segment_seconds": 5.0},
                            "train": {"lr": 1e-4, "text_lr_scale": 0.1}, "mixing": "sum", "objectives": objectives})
    return replace(cfg, model=mcfg)
