"""``videolm eval-retrieval --zero-shot clip --weights DIR``: CLIP as it was released, no training.

Texts are embedded by CLIP's text tower (``CLIPModel.get_text_features``), videos
are the mean of their L2-normalised clip features (what ``extract --encoder clip``
stored: CLIP's projected image embeddings), normalised again; both go through the
evaluator, metrics and report of a checkpoint. The model is the ``dual`` layout
with ``video_layers: 0`` (CLIP4Clip's meanP) built straight from ``DIR``, so a
CLIP4Clip run fine-tuned from the same directory starts at exactly this score.

Both sides are normalised: scoring raw dot products instead costs CLIP a lot
(xpool issue #11: 21.7 against 29.4 R@1 on MSR-VTT). The features must come from
the same CLIP weights, which ``extract_config.json`` records.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..features.layout import EXTRACT_CONFIG_NAME, read_extract_config
from ..features.shards import FeatureStore
from ..model.clip_text import CLIP_PREFIX, clip_dir, weights_fingerprint
from ..model.text import load_tokenizer
from ..model.video_text import ModelConfig, build_model
from .evaluate import EvalConfig, rankings_rows
from .job import evaluate_model, make_report, split_entries, write_outputs
from .protocols import check_entries
from .queries import build_queries

ZERO_SHOT_MODELS = ("clip",)
# meanP has no position table, so a zero-shot video is read whole (evenly spread clips beyond this)
ZERO_SHOT_MAX_FRAMES = 4096
CLIP_TEXT_POSITIONS = 77  # OpenAI CLIP's context length: texts are cut there, as CLIP's own tokenize does


def check_clip_features(features: Path, weights: Path) -> dict:
    """The directory's extraction key, after checking it was made by ``--encoder clip`` with ``weights``."""
    record = read_extract_config(features)
    if record is None:
        raise ConfigError(f"{features / EXTRACT_CONFIG_NAME}: missing or unreadable, so there is no telling which "
                          "encoder made these features; re-extract with --encoder clip --weights "
                          f"{weights}")
    key = record.get("key", {})
    if key.get("encoder") != "clip":
        raise ConfigError(f"{features}: extracted with encoder {key.get('encoder')!r} "
                          f"({features / EXTRACT_CONFIG_NAME}), but zero-shot CLIP scores CLIP image embeddings: run `videolm extract --encoder clip "
                          f"--weights {weights}`")
    recorded = key.get("weights")
    if not recorded or not _same_weights(Path(recorded), weights):
        raise ConfigError(f"{features}: extracted with CLIP weights {recorded!r} ({features / EXTRACT_CONFIG_NAME}), "
                          f"not {weights}: the text and image towers must come from the same CLIP")
    return key


def _same_weights(recorded: Path, weights: Path) -> bool:
    """Same directory, or (moved or copied) a directory whose weights file has the same sha256."""
    if recorded.expanduser().resolve() == weights.resolve():
        return True
    try:
        return weights_fingerprint(recorded)["sha256"] == weights_fingerprint(weights)["sha256"]
    except (ConfigError, OSError):
        return False


def check_zero_shot_weights(kind: str, weights: Path) -> str:
    """``text_init`` for ``kind`` from ``weights``, or a clear error before anything loads."""
    if kind not in ZERO_SHOT_MODELS:
        raise ConfigError(f"--zero-shot {kind!r}: known: {', '.join(ZERO_SHOT_MODELS)}")
    text_init = CLIP_PREFIX + str(weights)
    clip_dir(text_init)
    return text_init


def zero_shot_model(kind: str, weights: Path, feature_dim: int, device: str):
    """(model in eval mode, tokenizer) of ``kind`` from ``weights``: the dual layout's meanP at CLIP's init."""
    text_init = check_zero_shot_weights(kind, weights)
    cfg = ModelConfig(architecture="dual", text_init=text_init, video_layers=0, embed_dim=0, dropout=0.0,
                      feature_dim=feature_dim, max_text_len=CLIP_TEXT_POSITIONS, max_frames=ZERO_SHOT_MAX_FRAMES)
    model = build_model(cfg).to(device).eval()
    return model, load_tokenizer(weights)


def run_zero_shot(kind: str, weights: Path, features: Path, manifest: Path, cfg: EvalConfig,
                  out: Path | None = None, rankings: Path | None = None, plot: Path | None = None,
                  progress: bool = True) -> dict:
    """Score ``kind`` (clip) from ``weights`` with no training and write the outputs ``run_eval`` writes."""
    if cfg.rerank_top:
        raise ConfigError("--zero-shot has no cross encoder to re-rank with; leave out --rerank-top")
    weights = Path(weights)
    check_zero_shot_weights(kind, weights)
    check_clip_features(Path(features), weights)
    torch.manual_seed(cfg.seed)
    store = FeatureStore(features)
    try:
        model, tokenizer = zero_shot_model(kind, weights, store.dim, cfg.device)
        entries = split_entries(manifest, cfg.split)
        if cfg.protocol:
            check_entries(cfg.protocol, entries, f"split {cfg.split} of {manifest}")
        qs = build_queries(entries, store, cfg.query_mode)
        # no faiss index cache: a cached index is keyed by checkpoint files, which a zero-shot model has not
        part, results, timing = evaluate_model(model, tokenizer, store, qs, cfg, progress, None)
    finally:
        store.close()
    about = {"model": {"kind": "zero_shot", "zero_shot": kind, **weights_fingerprint(weights),
                       "video_pooling": "mean of L2-normalised clip features, L2-normalised",
                       "text": "CLIP text tower: end-of-text state through text_projection, L2-normalised"}}
    report = make_report(part, qs, cfg, results, **about, features=str(features), manifest=str(manifest),
                         timing=timing)
    write_outputs(report, rankings_rows(qs, results), out, rankings, plot)
    return report
