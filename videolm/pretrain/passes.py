"""The encoder passes of one micro-batch, each run once and shared by the objectives that read it.

UniVL's stage 2 runs its encoders twice per step, a clean pass and one masked
pass that all its masked losses read; HERO's MLM and MFM likewise read one masked
input each. Objectives that each ran their own pass paid that work once per
objective (five text and five video passes for UniVL's five losses). Here:

* ``sides()``: the clean text and video, each alone (joint; align's pairs on
  two_stream, which re-pair these states instead of re-encoding);
* ``masked()``: one cross-modal pass over the batch with its text corrupted and
  some clips hidden (mlm, mvm, mfm_nce, mfm_reg, caption). The text corruption is
  mlm's (80% [MASK] / 10% random / 10% kept) when mlm runs this step, otherwise
  caption's input masking; clips are hidden at the largest ``mask_prob`` of the
  clip objectives that run; EnhancedV at the largest ``enhanced_v`` asked for. So
  when mlm and mfm run together, mlm sees the hidden clips and mfm the corrupted
  text, as in UniVL; an objective alone draws exactly what it drew on its own.

Draws come from the step's generator in a fixed order (text, clips, EnhancedV) when
the first reader asks for the pass, so a resumed run repeats them. Objectives
declare what they read with ``masked_pass`` (``"text"``, ``"clips"``, ``"decoder"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import hide_clips, hide_whole_texts, sample_mask


@dataclass
class MaskedPass:
    inputs: dict  # the batch as the model read it (corrupted text, hidden clips)
    out: object  # the model's VideoTextOutput
    labels: torch.Tensor | None  # mlm's targets (IGNORE where not chosen), when mlm corrupted the text
    chosen: torch.Tensor | None  # (B, T) the hidden clips, when a clip objective ran


class SharedPasses:
    def __init__(self, model, batch: dict, gen: torch.Generator, objectives):
        self.model, self.batch, self.gen = model, batch, gen
        readers = [o for o in objectives if getattr(o, "masked_pass", None)]
        kinds = {o.masked_pass for o in readers}
        by_kind = {k: [o for o in readers if o.masked_pass == k] for k in kinds}
        self.corruptor = (by_kind.get("text") or by_kind.get("decoder") or [None])[0]
        # max over a list, not max(..., default=): torch.compile cannot trace the keyword (a graph break)
        self.clip_prob = max([0.0] + [o.mask_prob for o in by_kind.get("clips", [])])
        self.enhanced_v = max([0.0] + [getattr(o, "enhanced_v", 0.0) for o in readers])
        self.vocab = next((o.vocab for o in readers if getattr(o, "vocab", None) is not None), None)
        self.local_only = kinds == {"text"}  # hierarchical: mlm alone reads the local level only
        self._sides = self._masked = None

    def sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text states, video states) of the clean batch, each side alone."""
        if self._sides is None:
            b, m = self.batch, self.model
            self._sides = (m.encode_text(b["text_ids"], b["text_mask"]),
                           m.encode_video(b["video_mask"], b["video"], b.get("video_tokens")))
        return self._sides

    def masked(self) -> MaskedPass:
        if self._masked is None:
            self._masked = self._run_masked()
        return self._masked

    def _run_masked(self) -> MaskedPass:
        b, gen, key = self.batch, self.gen, self.model.text_input
        inputs, labels, chosen = dict(b), None, None
        if self.corruptor is not None:
            ids, labels = self.corruptor.corrupt(b[f"{key}_ids"], b[f"{key}_mask"], gen)
            inputs[f"{key}_ids"] = ids
        if self.clip_prob > 0:
            chosen = sample_mask(b["video_mask"], self.clip_prob, gen)
            inputs = hide_clips(inputs, chosen)
        if self.enhanced_v > 0:
            inputs = hide_whole_texts(self.model, inputs, self.enhanced_v, self.vocab, gen)
        out = self.model(inputs, local_only=self.local_only)
        return MaskedPass(inputs, out, labels, chosen)
