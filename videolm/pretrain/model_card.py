"""The run directory's ``README.md``: a model card written at the end of every pretrain, finetune and import.

It says, for a person who finds the directory later: what data the model saw
(manifest and its sha256, videos, the feature directory and how its features were
made), the recipe (stages, objectives and weights, the architecture and its sizes),
how long it trained, its last losses (and, fine-tuned, the best held-out score and
its step), and how to load it. It is rewritten whole at each run's end (temporary
file, then rename), by rank 0 only under torchrun.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .. import __version__
from ..extract.job import file_sha256
from .features_record import describe_features
from .metrics_log import read_metrics
from .recipe import PretrainConfig

CARD_NAME = "README.md"
_SIZE_FIELDS = ("hidden", "heads", "text_init", "text_layers", "video_layers", "cross_layers", "temporal_layers",
                "decoder_layers", "embed_dim", "max_frames", "max_text_len", "video_input", "feature_dim",
                "visual_vocab", "parts")


def is_main_process() -> bool:
    """Rank 0, from torchrun's environment (the process group may already be shut down)."""
    return int(os.environ.get("RANK", "0")) == 0


def _data_lines(features: str | os.PathLike | None, manifest: str | os.PathLike | None, videos) -> list[str]:
    lines = ["## Data", ""]
    if manifest and Path(manifest).is_file():
        lines.append(f"- manifest: `{Path(manifest).resolve()}` (sha256 `{file_sha256(manifest)}`)")
    if videos is not None:
        lines.append(f"- videos trained on: {videos}")
    record = describe_features(features) if features and Path(features).is_dir() else None
    if record:
        s = record["sampling"]
        lines += [f"- features: `{record['feature_dir']}`, {record['dim']}-d, encoder `{record['encoder']}`"
                  + (f" (weights `{record['weights']}`)" if record["weights"] else ""),
                  f"- sampling: {s['fps']} fps, {s['frames_per_clip']} frames per clip, a clip every "
                  f"{s['clip_stride']} s, short side {s['short_side']}, crop {s['crop']}; "
                  f"decoder {record['backend']} ({record['decode']})",
                  "- `features.json` in each checkpoint records this, to embed new videos the same way"]
    elif features:
        lines.append(f"- features: `{features}`")
    return lines + [""]


def _recipe_lines(cfg: PretrainConfig) -> list[str]:
    lines = ["## Recipe", ""]
    for stage in cfg.stages:
        objectives = ", ".join(f"{o.name} (weight {o.weight:g}" + (f", ratio {o.ratio:g})" if stage.mixing ==
                                                                    "sample" else ")") for o in stage.active)
        lines.append(f"- stage `{stage.name}` ({stage.fraction:g} of the steps, mixing {stage.mixing}): {objectives}")
    m = dataclasses.asdict(cfg.model)
    lines.append(f"- model: `{cfg.model.architecture}`; " + ", ".join(f"{k} {m[k]}" for k in _SIZE_FIELDS
                                                                       if m.get(k) not in (None, "")))
    t = cfg.train
    lines.append(f"- training: lr {t.lr:g}, batch {t.batch_size} x {t.grad_accum} accumulation, "
                 f"{t.max_steps} steps planned, seed {t.seed}")
    if t.init_from:
        lines.append(f"- initialised from `{t.init_from}`")
    return lines + [""]


def _result_lines(out: Path, summary: dict, best: dict | None) -> list[str]:
    lines = ["## Training", ""]
    if summary.get("steps") is not None:
        lines.append(f"- steps trained: {summary['steps']}" + (" (stopped early)" if summary.get("stopped_early")
                                                               else ""))
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    if rows:
        last = rows[-1]
        losses = {k: v for k, v in sorted(last.items()) if k == "loss" or k.endswith("_loss")}
        lines.append(f"- final losses (step {last['step']}): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    if best:
        lines.append(f"- best {best.get('metric', 'score')}: {best.get('score')} at step {best.get('step')} "
                     f"(kept in `best/`)")
    return lines + [""]


def _usage_lines(out: Path) -> list[str]:
    return ["## Loading", "", "```python", "from videolm import VideoTextModel", "",
            f'model, tokenizer = VideoTextModel.model_and_tokenizer("{out}")  # eval mode', "```", "",
            "```", f"videolm eval-retrieval --checkpoint {out} --features FEATURES --manifest MANIFEST", "```", ""]


def render_model_card(out: Path, cfg: PretrainConfig, summary: dict, kind: str, features=None, manifest=None,
                      best: dict | None = None, notes: list[str] = ()) -> str:
    lines = [f"# videolm {kind} run `{Path(out).name}`", "",
             f"A `{cfg.model.architecture}` video-text model written by videolm {__version__}.", ""]
    lines += _data_lines(features, manifest, summary.get("videos"))
    lines += _recipe_lines(cfg)
    lines += _result_lines(Path(out), summary, best)
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += _usage_lines(Path(out))
    return "\n".join(lines)


def write_model_card(out: str | os.PathLike, cfg: PretrainConfig, summary: dict, kind: str, features=None,
                     manifest=None, best: dict | None = None, notes: list[str] = ()) -> Path | None:
    """Write ``out/README.md`` atomically (rank 0 only; None elsewhere)."""
    if not is_main_process():
        return None
    out = Path(out)
    text = render_model_card(out, cfg, summary, kind, features, manifest, best, notes)
    tmp = out / f".{CARD_NAME}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out / CARD_NAME)
    return out / CARD_NAME

