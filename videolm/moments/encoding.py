"""A model's side of moment retrieval: the vsm heads of a checkpoint, query vectors and clip states.

Moments are read off HERO's VSM heads (``pretrain.objectives.VideoSubtitleMatching``):
a query text, encoded alone by the text BERT and mean-pooled, becomes three vectors
(start, end, global) through vsm's ``query`` layer; a video's clip states are the
global (Temporal Transformer) outputs. Start and end scores of a clip are dot
products with the start and end vectors (softmax over the video's clips); the
query-video score is the highest cosine between the global vector and a clip.
That layer lives in the checkpoint's ``objectives.safetensors``, so only a run that trained
vsm (``model.architecture: hierarchical``) can be scored.

Videos go through the training input pipeline: examples shaped like
``pretrain.dataset.VideoTextDataset``'s, padded by ``pretrain.collate.Collator``.
The local (Cross-modal) level reads the video's *subtitles* (manifest lines of
kind ``subtitle`` or ``asr``), never its descriptions, which are the queries;
a video without subtitles, or every video with ``context: video``, runs the
global level on its clips alone (HERO's video-only setting). ``context: captions``
feeds every line, descriptions included, as vsm pretraining does: the query's own
text is then in its video's input, so that score is a diagnostic upper bound (is
the training condition learnt?), not a moment-retrieval result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..features.shards import FeatureStore
from ..manifests.manifest import VideoEntry
from ..model.inputs import batch_to, evenly_spread_clips, tokenize
from ..model.layers import masked_mean
from ..pretrain.collate import Collator
from ..pretrain.dataset import caption_spans, sorted_by_time
from ..retrieval.queries import EvalError

SUBTITLE_KINDS = ("subtitle", "asr")
CONTEXTS = ("subtitles", "video", "captions")


class MomentModel:
    """A loaded checkpoint with its vsm query layer; encodes queries and videos in batches."""

    def __init__(self, checkpoint: Path, device: str = "cpu", batch_size: int = 32):
        from ..pretrain.checkpoint import latest_checkpoint, load_pretrained

        self.model, self.tokenizer, self.run_cfg = load_pretrained(checkpoint, device)
        self.ckpt = latest_checkpoint(checkpoint)
        meta = self.ckpt / "meta.json"
        self.step = json.loads(meta.read_text()).get("step") if meta.is_file() else None
        self.device, self.batch_size = torch.device(device), batch_size
        self.query = load_vsm_query(self.model, self.run_cfg, self.ckpt, self.tokenizer).to(self.device).eval()
        mc = self.model.cfg
        self.max_sub_len = min(32, mc.max_text_len)  # the collator's subtitle length in training (pretrain.run)
        self.collator = Collator(self.tokenizer, mc.max_text_len, self.max_sub_len)

    def check_store(self, store: FeatureStore) -> None:
        cfg = self.model.cfg
        if cfg.video_input == "tokens":
            if store.codebook_attrs is None:
                raise EvalError(f"the model reads visual words but {store.directory} has no codebook: "
                                f"run `videolm quantize --features {store.directory}`")
        elif cfg.feature_dim != store.dim:
            raise EvalError(f"the checkpoint expects {cfg.feature_dim}-d clip features but {store.directory} "
                            f"holds {store.dim}-d ones (extracted with another encoder?)")

    @torch.inference_mode()
    def encode_queries(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, unit global) query vectors, each (Q, H), as vsm builds them from a subtitle."""
        parts = []
        for a in range(0, len(texts), self.batch_size):
            ids, mask = tokenize(self.tokenizer, texts[a : a + self.batch_size], self.max_sub_len)
            ids, mask = ids.to(self.device), mask.to(self.device)
            parts.append(self.query(masked_mean(self.model.encode_text(ids, mask), mask)).float().cpu())
        q_start, q_end, q_glob = torch.cat(parts).chunk(3, dim=-1)
        return q_start.numpy(), q_end.numpy(), F.normalize(q_glob, dim=-1).numpy()

    @torch.inference_mode()
    def encode_videos(self, store: FeatureStore, entries: list[VideoEntry], context: str
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per video, its global clip states (T, H) and the (T, 2) times of the clips read."""
        states, times = [], []
        for a in range(0, len(entries), self.batch_size):
            examples = [video_example(store, e, self.model.cfg.max_frames, context, self.tokens)
                        for e in entries[a : a + self.batch_size]]
            out = self.model(batch_to(self.collator(examples), self.device)).clips.float().cpu().numpy()
            for i, ex in enumerate(examples):
                states.append(out[i, : len(ex["features"])])
                times.append(np.stack([ex["clip_starts"], ex["clip_ends"]], 1))
        return states, times

    @property
    def tokens(self) -> bool:
        return self.model.cfg.video_input == "tokens"


def load_vsm_query(model, run_cfg, ckpt: Path, tokenizer) -> torch.nn.Module:
    """vsm's query layer from ``objectives.safetensors`` (the last stage's copy), or an EvalError naming what
    is missing."""
    from ..pretrain.checkpoint import load_objective_state
    from ..pretrain.masking import TextVocab
    from ..pretrain.objectives import build_objective

    arch, names = run_cfg.model.architecture, run_cfg.objective_names
    if arch != "hierarchical" or "vsm" not in names:
        raise EvalError(
            f"eval-moments reads the start/end heads of the vsm objective (HERO's video-subtitle matching), which "
            f"runs on model.architecture hierarchical only; {ckpt} is {arch!r} trained with "
            f"{', '.join(names)}, so it has no start/end heads"
            + ("" if arch == "hierarchical" else " (a two_stream or single_stream model cannot localise a moment)")
            + ": pretrain with pipelines/hero.yaml (or any hierarchical recipe with vsm)")
    state = {}
    for key, value in sorted(load_objective_state(ckpt).items()):  # "<stage>:vsm.<param>"; later stages win
        task, param = key.split(".", 1)
        if task.split(":", 1)[1] == "vsm":
            state[param] = value
    head = build_objective("vsm", model, TextVocab.from_tokenizer(tokenizer), {})
    head.load_state_dict(state)
    return head.query


def video_example(store: FeatureStore, entry: VideoEntry, max_frames: int, context: str, tokens: bool) -> dict:
    """The example ``VideoTextDataset`` would cut for a whole video: clips spread over it (at most
    ``max_frames``) and, with ``context: subtitles``, its subtitle lines as the local level's texts."""
    v = store.get(entry.video_id)
    pick = evenly_spread_clips(len(v.features), max_frames)
    if tokens and v.tokens is None:
        raise EvalError(f"the model reads visual words but {entry.video_id} has none: "
                        f"run `videolm quantize --features {store.directory}`")
    starts, ends = v.starts[pick], v.ends[pick]
    subs = {"subtitles": [c for c in sorted_by_time(entry.captions) if c.kind in SUBTITLE_KINDS],
            "captions": sorted_by_time(entry.captions), "video": []}[context]
    spans = caption_spans(starts, ends, subs)
    keep = spans[:, 0] >= 0
    subs = [c for c, k in zip(subs, keep) if k]
    return {"video_id": entry.video_id, "features": v.features[pick],
            "tokens": v.tokens[pick] if tokens else None, "clip_starts": starts, "clip_ends": ends,
            "texts": [c.text for c in subs], "text_spans": spans[keep],
            "text_times": np.array([(c.start, c.end) for c in subs], dtype=np.float32).reshape(-1, 2)}

