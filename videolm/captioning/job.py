"""``videolm caption`` and ``videolm eval-caption``: captions of a split's videos, then their scores.

Items (``--unit``):

* ``video`` (MSR-VTT): one per video, read at ``max_frames`` clips spread over its
  length (as retrieval reads it). References: its descriptions (kind ``caption``,
  ``query`` or unset); when they all share one time span they are alternatives
  (MSR-VTT's 20 sentences), otherwise they are one paragraph, joined in time order;
* ``segment`` (YouCook2, as UniVL evaluates it): one per distinct time span of the
  descriptions, read at the clips that span overlaps (the training rule,
  ``pretrain.dataset.caption_spans``), at most ``max_frames`` of them spread evenly;
  references: the descriptions of that span.

With ``--with-transcript`` the cross encoder reads the item's subtitles (kind
``subtitle`` or ``asr`` overlapping its span, joined in time order) instead of
``[CLS] [SEP]``. Output: one JSON line per item, ``key``, ``video_id``, ``start``,
``end``, ``hypothesis``, ``references`` (and ``transcript``), plus ``<out>.meta.json``
with how they were generated; ``eval-caption`` copies it into its report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError
from ..features.shards import FeatureStore
from ..manifests.manifest import Caption, VideoEntry
from ..model.inputs import evenly_spread_clips, pad_clips, tokenize
from ..pretrain.dataset import caption_spans, sorted_by_time
from ..retrieval.encoding import PairEncoder
from ..retrieval.job import split_entries, write_json, write_rankings
from ..retrieval.queries import DESCRIPTION_KINDS, EvalError
from .generate import Captioner, GenerateConfig
from .metrics import evaluate_captions

log = logging.getLogger("videolm.captioning.job")
UNITS = ("video", "segment")
REFERENCE_KINDS = (*DESCRIPTION_KINDS, "query")
TRANSCRIPT_KINDS = ("subtitle", "asr")


@dataclass(frozen=True)
class CaptionConfig:
    split: str = "test"
    unit: str = "video"
    with_transcript: bool = False
    batch_size: int = 32
    device: str = "cpu"
    generate: GenerateConfig = GenerateConfig()

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ConfigError(f"caption: unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.batch_size < 1:
            raise ConfigError("caption: batch_size must be >= 1")


@dataclass(frozen=True)
class CaptionItem:
    key: str
    video_id: str
    start: float
    end: float
    first: int  # first and last clip read (inclusive)
    last: int
    references: tuple[str, ...]
    transcript: str


def _transcript(caps: list[Caption], start: float, end: float) -> str:
    return " ".join(c.text.strip() for c in caps if c.kind in TRANSCRIPT_KINDS and c.start < end and c.end > start)


def video_items(entry: VideoEntry, times: np.ndarray) -> list[CaptionItem]:
    caps = sorted_by_time(entry.captions)
    described = [c for c in caps if c.kind in REFERENCE_KINDS and c.text.strip()]
    if not described:
        return []
    alternatives = len({(c.start, c.end) for c in described}) == 1
    refs = tuple(c.text.strip() for c in described) if alternatives else (" ".join(c.text.strip() for c in described),)
    start, end = float(times[0, 0]), float(times[-1, 1])
    return [CaptionItem(entry.video_id, entry.video_id, start, end, 0, len(times) - 1, refs,
                        _transcript(caps, start, end))]


def segment_items(entry: VideoEntry, times: np.ndarray) -> list[CaptionItem]:
    caps = sorted_by_time(entry.captions)
    spans: dict[tuple[float, float], list[str]] = {}
    for c in caps:
        if c.kind in REFERENCE_KINDS and c.text.strip():
            spans.setdefault((c.start, c.end), []).append(c.text.strip())
    windows = caption_spans(times[:, 0], times[:, 1], [Caption(s, e, "") for s, e in spans])
    items = []
    for n, (((s, e), refs), (first, last)) in enumerate(zip(spans.items(), windows)):
        if first >= 0:
            items.append(CaptionItem(f"{entry.video_id}#{n}", entry.video_id, float(s), float(e), int(first),
                                     int(last), tuple(refs), _transcript(caps, s, e)))
    return items


def build_items(entries: list[VideoEntry], store: FeatureStore, unit: str) -> tuple[list[CaptionItem], dict]:
    """The split's caption items and what was left out (no features, no reference, span on no clip)."""
    items, left_out = [], {"missing_features": 0, "without_reference": 0}
    for e in entries:
        if e.video_id not in store:
            left_out["missing_features"] += 1
            continue
        found = (video_items if unit == "video" else segment_items)(e, store.clip_times(e.video_id))
        left_out["without_reference"] += not found
        items.extend(found)
    if not items:
        raise EvalError(f"no caption items: none of the {len(entries)} split videos has features in "
                        f"{store.directory} and a description (kind caption, query or unset) on its clips")
    return items, left_out


def item_inputs(store: FeatureStore, items: list[CaptionItem], tokenizer, model_cfg, with_transcript: bool) -> dict:
    """Model inputs of a batch of items: the condition text and the items' clips (through ``model.inputs``)."""
    feats, words = [], []
    for it in items:
        v = store.get(it.video_id, it.first, it.last + 1)
        pick = evenly_spread_clips(len(v.features), model_cfg.max_frames)
        feats.append(v.features[pick])
        words.append(None if v.tokens is None else v.tokens[pick])
    tokens = model_cfg.video_input == "tokens"
    video, vm, toks = pad_clips(feats, words if tokens else None)
    texts = [it.transcript if with_transcript else "" for it in items]
    ids, tm = tokenize(tokenizer, texts, model_cfg.max_text_len)  # "" -> [CLS] [SEP]
    inputs = {"text_ids": ids, "text_mask": tm, "video": video, "video_mask": vm}
    if toks is not None:
        inputs["video_tokens"] = toks
    return inputs


def warn_on_conditioning(run_cfg, with_transcript: bool) -> str:
    """How the checkpoint's caption objective conditioned its decoder; a warning when it is not this input."""
    specs = [o for s in run_cfg.stages for o in s.active if o.name == "caption"]
    trained = specs[-1].options.get("condition", "caption") if specs else None
    if trained is None:
        log.warning("the checkpoint's recipe never trained the caption objective: its decoder is untrained")
    elif trained == "caption" and not with_transcript:
        log.warning("this checkpoint's caption objective read the (mostly visible) caption in the cross encoder; "
                    "generating from [CLS] [SEP] + video is an input it did not train on (fine-tune with "
                    "caption.condition=video for UniVL's video-only setting)")
    return str(trained)


def generate_rows(captioner: Captioner, store, items, tokenizer, cfg: CaptionConfig, progress=None) -> list[dict]:
    rows = []
    for a in range(0, len(items), cfg.batch_size):
        batch = items[a : a + cfg.batch_size]
        inputs = item_inputs(store, batch, tokenizer, captioner.model.cfg, cfg.with_transcript)
        hyps = captioner.captions({k: v.to(cfg.device) for k, v in inputs.items()})
        for it, hyp in zip(batch, hyps):
            row = {"key": it.key, "video_id": it.video_id, "start": round(it.start, 3), "end": round(it.end, 3),
                   "hypothesis": hyp, "references": list(it.references)}
            if cfg.with_transcript:
                row["transcript"] = it.transcript
            rows.append(row)
        if progress is not None:
            progress.update(len(batch))
    return rows


def meta_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".meta.json")


def run_caption(checkpoint: Path, features: Path, manifest: Path, cfg: CaptionConfig, out: Path,
                progress: bool = True) -> dict:
    """Caption every item of the split and write the JSONL and its ``.meta.json``; returns the meta."""
    from ..pretrain.checkpoint import latest_checkpoint, load_pretrained
    from ..retrieval.job import _progress

    torch.manual_seed(0)
    model, tokenizer, run_cfg = load_pretrained(checkpoint, cfg.device)
    captioner = Captioner(model, tokenizer, cfg.generate)
    trained = warn_on_conditioning(run_cfg, cfg.with_transcript)
    ckpt = latest_checkpoint(checkpoint)
    meta_json = ckpt / "meta.json"
    step = json.loads(meta_json.read_text()).get("step") if meta_json.is_file() else None
    store = FeatureStore(features)
    try:
        PairEncoder(model, tokenizer, store)  # refuses features of another size or a missing codebook
        items, left_out = build_items(split_entries(manifest, cfg.split), store, cfg.unit)
        bar = _progress(len(items), "caption", progress)
        t0 = time.perf_counter()
        rows = generate_rows(captioner, store, items, tokenizer, cfg, bar)
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    finally:
        store.close()
    write_rankings(rows, out)
    meta = {"videolm": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {"checkpoint": str(ckpt), "step": step, "objectives": run_cfg.objective_names,
                      "caption_condition_trained": trained},
            "features": str(features), "manifest": str(manifest), "n_items": len(rows), "left_out": left_out,
            "caption_config": asdict(cfg), "seconds": round(seconds, 3),
            "captions_per_s": round(len(rows) / max(seconds, 1e-9), 2), "captions": str(out)}
    write_json(meta, meta_path(out))
    return meta


def read_captions(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such captions file") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not JSON ({exc})") from None
    if not rows:
        raise ConfigError(f"{path}: no captions")
    return rows


def run_eval_caption(captions: Path, out: Path | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Score a captions JSONL (``videolm caption``'s, or any with key/hypothesis/references) and write the report."""
    rows = read_captions(captions)
    try:
        scored = evaluate_captions(rows, n_boot, seed)
    except ValueError as exc:
        raise ConfigError(f"{captions}: {exc}") from None
    meta = meta_path(Path(captions))
    report = {"kind": "caption", "videolm": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "captions": str(captions),
              "generation": json.loads(meta.read_text()) if meta.is_file() else None, **scored}
    if out is not None:
        write_json(report, out)
    return report


def metrics_line(report: dict) -> str:
    parts = []
    for m, v in report["metrics"].items():
        if v is None:
            parts.append(f"{m} n/a")
            continue
        lo, hi = report["ci95"][m]
        parts.append(f"{m} {v:.2f} [{lo:.2f}, {hi:.2f}]" if m == "CIDEr-D" else f"{m} {v:.1f} [{lo:.1f}, {hi:.1f}]")
    return "  ".join(parts) + f"  ({report['n_items']} items; tokenizer: {report['tokenizer'].split(':')[0]})"
