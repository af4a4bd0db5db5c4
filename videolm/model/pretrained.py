"""``VideoTextModel``: load and save a trained model the way transformers users expect.

    from videolm import VideoTextModel

    model = VideoTextModel.from_pretrained("runs/pretrain")      # eval mode
    model, tokenizer = VideoTextModel.model_and_tokenizer("runs/pretrain")
    VideoTextModel.save_pretrained(model, "exported/")             # config.json, model.safetensors, tokenizer

``from_pretrained`` takes a run directory (its latest checkpoint), one checkpoint
directory (``step_*`` or ``best/``), a fine-tuning run, or a directory written by
``save_pretrained``::

    config.json          the ModelConfig (videolm.model.video_text), plus model_type and videolm_version
    model.safetensors    the model's state dict (no pickle)
    tokenizer.json ...   the text tokenizer the model was trained with (tokenizer.save_pretrained)
    features.json        how the training features were made, when known (features_record.py)

There are several model classes (one per architecture); ``VideoTextModel`` is only
the entry point that builds the right one with ``build_model`` and loads its
weights strictly. The architecture is rebuilt from ``text_init``'s config, so the
text encoder's directory (or the default MiniLM package) must exist where the model
is loaded, as for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError

CONFIG_NAME = "config.json"
MODEL_TYPE = "videolm"
# what from_pretrained loaded with each model (tokenizer, feature record), so save_pretrained can carry it on
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_saved_pretrained(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``save_pretrained`` directory (not a checkpoint, which has config.yaml)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / "model.safetensors").is_file():
        return False
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("model_type") == MODEL_TYPE
    except ValueError:
        return False


def _read_config(directory: Path):
    from ..config import from_dict
    from .video_text import ModelConfig

    data = json.loads((directory / CONFIG_NAME).read_text())
    fields = {k: v for k, v in data.items() if k not in ("model_type", "videolm_version")}
    try:
        return from_dict(ModelConfig, fields)
    except ConfigError as exc:
        raise ConfigError(f"{directory / CONFIG_NAME}: {exc}") from None


def _load_saved(directory: Path, device: str):
    """(model, tokenizer, features record) from a ``save_pretrained`` directory."""
    from safetensors.torch import load_file

    from ..pretrain.checkpoint import feature_record, load_into
    from .text import load_tokenizer
    from .video_text import build_model

    model = build_model(_read_config(directory))
    load_into(model, load_file(str(directory / "model.safetensors")), directory)
    return model.to(device).eval(), load_tokenizer(directory), feature_record(directory)


def _load(path: str | os.PathLike, device: str):
    from ..pretrain.checkpoint import feature_record, latest_checkpoint, load_pretrained

    path = Path(path)
    if is_saved_pretrained(path):
        model, tokenizer, features = _load_saved(path, device)
    else:
        ckpt = latest_checkpoint(path)
        if ckpt is None and (path / "best").is_dir():  # a fine-tuning run whose last checkpoints were pruned
            ckpt = latest_checkpoint(path / "best")
        if ckpt is None:
            raise ConfigError(f"{path}: not a videolm model (no config.json + model.safetensors written by "
                              "save_pretrained, and no checkpoint: checkpoints/step_*/model.safetensors)")
        model, tokenizer, _ = load_pretrained(ckpt, device)
        features = feature_record(ckpt)
    _LOADED[model] = (tokenizer, features)
    return model, tokenizer


class VideoTextModel:
    """Entry point for loading and saving any videolm model (two_stream, single_stream, hierarchical, dual)."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, device: str = "cpu"):
        """The model saved at ``path`` (run, checkpoint, ``best/`` or save_pretrained directory), in eval mode."""
        return _load(path, device)[0]

    @staticmethod
    def model_and_tokenizer(path: str | os.PathLike, device: str = "cpu"):
        """(model in eval mode, its text tokenizer) from the same places as ``from_pretrained``."""
        return _load(path, device)

    @staticmethod
    def save_pretrained(model, directory: str | os.PathLike, tokenizer=None, features: dict | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors``, the tokenizer and ``features.json`` into ``directory``.

        ``tokenizer`` and ``features`` default to what ``from_pretrained`` loaded with the model; otherwise
        the tokenizer of the model's ``text_init``. Written in a temporary sibling and renamed into place."""
        return _save(model, Path(directory), tokenizer, features)


def _default_tokenizer(model):
    from .text import load_tokenizer, resolve_text_dir

    return load_tokenizer(resolve_text_dir(model.cfg.text_init))


def _save(model, directory: Path, tokenizer, features: dict | None) -> Path:
    from .. import __version__
    from ..config import to_dict
    from ..pretrain.checkpoint import save_weights
    from ..pretrain.features_record import write_features_json

    loaded_tokenizer, loaded_features = _LOADED.get(model, (None, None))
    tokenizer = tokenizer or loaded_tokenizer or _default_tokenizer(model)
    features = features if features is not None else loaded_features
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cfg = replace(model.cfg, parts=tuple(model.cfg.parts) if model.cfg.parts is not None else None)
    data = {"model_type": MODEL_TYPE, "videolm_version": __version__, **to_dict(cfg)}
    (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2))
    save_weights(model.state_dict(), tmp / "model.safetensors")
    tokenizer.save_pretrained(str(tmp))
    write_features_json(features, tmp)
    old = directory.with_name(f".tmp-old-{directory.name}-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)  # a reader sees the old directory or the new one, never a mix
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory
