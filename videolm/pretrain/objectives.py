"""Pretraining objectives: each builds its own masks and targets from a batch and returns named losses.

An objective is a small ``nn.Module``: ``objective(model, batch, gen)`` returns a
dict whose ``*_loss`` entries are differentiable scalars (the trainer sums them,
times the objective's weight) and whose other entries are detached values for
the log: 0-dim tensors (or plain numbers), which the trainer reads off the device
once per ``log_every`` steps rather than once per value. A head that only this
objective uses (mlm's transform, mvm/mfm/fom's classifiers, vsm's query vectors)
is the objective's own parameter, built from
the model it will train, so a recipe without ``fom`` has no ``fom`` head. What
downstream use needs (encoders, joint space, align score, caption decoder) is the
model's. ``model_parts`` names the optional model parts an objective runs
(``model.video_text.KNOWN_PARTS``); the trainer builds the model with the union
over the recipe. ``architectures`` lists the model layouts an objective runs on
(``model.video_text.ARCHITECTURES``); a recipe that pairs it with another is
refused when its config is loaded (``check_architecture``).

Randomness comes only from ``gen`` (a CPU ``torch.Generator`` the trainer seeds
per step), so a resumed run draws the same masks as an uninterrupted one.
Masks are drawn on the CPU and moved, which keeps them identical across devices.

Examples cut from the same video (``batch["video_key"]``) are never used as each
other's negatives: in segment mode two captions of one video often share a batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .distributed import gather_keys, gather_with_grad
from .masking import IGNORE, TextVocab, same_video, sample_mask, shuffle_clips, uniform
from .passes import SharedPasses
from ..model.bert_layers import prediction_transform
from ..model.layers import init_weights, masked_mean, mlp_head
from ..model.video_text import ARCHITECTURES, CROSS_ARCHITECTURES


def own_passes(objective, model, batch, gen, passes):
    """The micro-batch's shared passes, or, for an objective called on its own, passes of its own."""
    return passes if passes is not None else SharedPasses(model, batch, gen, [objective])


def masked_clip_states(passes) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden clips (B, T), their states in the shared masked pass): mvm, mfm_nce and mfm_reg differ
    only in what they predict from these (``out.clips``: the cross encoder's, or HERO's global level)."""
    p = passes.masked()
    return p.chosen, p.out.clips[p.chosen]


class MaskedLanguageModelling(nn.Module):
    """Caption tokens masked 15% (80% [MASK], 10% random, 10% kept), predicted with video context.

    The prediction is BERT's: transform, then the text encoder's own word
    embeddings (tied, read from the model) plus a bias of this objective's. The
    masked text is the one the model's cross-modal pass reads (``model.text_input``):
    the joined captions, or HERO's subtitles one by one (its local level only).
    """

    name = "mlm"
    model_parts = ("cross",)
    architectures = CROSS_ARCHITECTURES
    masked_pass = "text"  # corrupts the shared masked pass's text (passes.py)

    def __init__(self, model, vocab: TextVocab, mask_prob: float = 0.15):
        super().__init__()
        self.vocab, self.mask_prob = vocab, mask_prob
        self.transform = init_weights(prediction_transform(model.cfg.hidden))
        self.bias = nn.Parameter(torch.zeros(model.word_embeddings.shape[0]))

    def logits(self, model, h: torch.Tensor) -> torch.Tensor:
        return self.transform(h) @ model.word_embeddings.t() + self.bias

    def corrupt(self, ids, mask, gen):
        v = self.vocab
        candidates = mask & (ids != v.cls) & (ids != v.sep) & (ids != v.pad)
        chosen = sample_mask(candidates, self.mask_prob, gen)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        r = uniform(ids.shape, gen, ids.device)
        random_ids = torch.randint(v.size, ids.shape, generator=gen).to(ids.device)
        out = torch.where(chosen & (r < 0.8), torch.full_like(ids, v.mask), ids)
        out = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, out)
        return out, labels

    def forward(self, model, batch, gen, passes=None):
        p = own_passes(self, model, batch, gen, passes).masked()
        labels = p.labels
        at = labels != IGNORE
        logits = self.logits(model, p.out.cross_text[at])
        loss = F.cross_entropy(logits.float(), labels[at])
        return {"mlm_loss": loss, "mlm_acc": (logits.argmax(-1) == labels[at]).float().mean().detach()}


class MaskedVisualWords(nn.Module):
    """VideoBERT: 15% of clips masked, their visual words predicted over the codebook vocabulary."""

    name = "mvm"
    model_parts = ("cross",)
    architectures = CROSS_ARCHITECTURES
    masked_pass = "clips"
    needs_tokens = True

    def __init__(self, model, vocab: TextVocab, mask_prob: float = 0.15):
        super().__init__()
        if model.cfg.visual_vocab <= 0:
            raise ConfigError("mvm needs visual words: quantise the features first")
        self.mask_prob = mask_prob
        self.head = mlp_head(model.cfg.hidden, model.cfg.visual_vocab)

    def forward(self, model, batch, gen, passes=None):
        chosen, states = masked_clip_states(own_passes(self, model, batch, gen, passes))
        target = batch["video_tokens"][chosen]
        logits = self.head(states)
        loss = F.cross_entropy(logits.float(), target)
        return {"mvm_loss": loss, "mvm_acc": (logits.argmax(-1) == target).float().mean().detach()}


class MaskedFrameNCE(nn.Module):
    """Masked clips' predictions scored against the original features of every clip in the batch.

    The target of a masked clip is its own original feature; all other real clips
    in the batch are negatives. Both sides are L2-normalised and divided by a
    temperature, so the loss does not depend on the encoder's feature scale.
    """

    name = "mfm_nce"
    model_parts = ("cross",)
    architectures = CROSS_ARCHITECTURES
    masked_pass = "clips"

    def __init__(self, model, vocab: TextVocab, mask_prob: float = 0.15, temperature: float = 0.1,
                 enhanced_v: float = 0.0):
        super().__init__()
        self.mask_prob, self.temperature = mask_prob, temperature
        self.vocab, self.enhanced_v = vocab, check_probability("mfm_nce", "enhanced_v", enhanced_v)
        self.head = feature_head(model)

    def forward(self, model, batch, gen, passes=None):
        vm = batch["video_mask"]
        chosen, states = masked_clip_states(own_passes(self, model, batch, gen, passes))
        pred = F.normalize(self.head(states).float(), dim=-1)
        candidates = F.normalize(batch["video"][vm].float(), dim=-1)
        # index of each masked clip among the real clips, in the same row-major order as batch["video"][vm]
        target = (torch.cumsum(vm.flatten().long(), 0) - 1)[chosen.flatten()]
        logits = (pred @ candidates.t()).float() / self.temperature
        if "clip_start" in batch:  # overlapping segments repeat a clip: its copy is not a negative
            key = batch["video_key"][:, None].expand_as(vm)
            same = (key[chosen][:, None] == key[vm][None, :]) & (batch["clip_start"][chosen][:, None] == batch["clip_start"][vm][None, :])
            same[torch.arange(len(target), device=target.device), target] = False
            logits = logits.masked_fill(same, float("-inf"))
        loss = F.cross_entropy(logits, target)
        return {"mfm_nce_loss": loss, "mfm_nce_acc": (logits.argmax(-1) == target).float().mean().detach()}


def feature_head(model) -> nn.Sequential:
    """A head predicting a clip's (pre-encoder) feature vector, for mfm_nce and mfm_reg."""
    if model.cfg.feature_dim <= 0:
        raise ConfigError("masked frame modelling needs clip features (feature_dim is 0)")
    return mlp_head(model.cfg.hidden, model.cfg.feature_dim)


class MaskedFrameRegression(nn.Module):
    """Masked clips' original features regressed with a mean squared error."""

    name = "mfm_reg"
    model_parts = ("cross",)
    architectures = CROSS_ARCHITECTURES
    masked_pass = "clips"

    def __init__(self, model, vocab: TextVocab, mask_prob: float = 0.15, enhanced_v: float = 0.0):
        super().__init__()
        self.mask_prob = mask_prob
        self.vocab, self.enhanced_v = vocab, check_probability("mfm_reg", "enhanced_v", enhanced_v)
        self.head = feature_head(model)

    def forward(self, model, batch, gen, passes=None):
        chosen, states = masked_clip_states(own_passes(self, model, batch, gen, passes))
        pred = self.head(states).float()
        return {"mfm_reg_loss": F.mse_loss(pred, batch["video"][chosen].float())}


class FrameOrderModelling(nn.Module):
    """HERO FOM: 15% of clip positions shuffled; each shuffled clip's original position classified.

    As in HERO the shuffle happens between the levels: the local level reads the
    clips in time order, the global level in the shuffled one.
    """

    name = "fom"
    model_parts = ("cross", "temporal")
    architectures = ("hierarchical",)

    def __init__(self, model, vocab: TextVocab, shuffle_prob: float = 0.15):
        super().__init__()
        self.head = mlp_head(model.cfg.hidden, model.cfg.max_frames)  # one class per clip position
        self.shuffle_prob = shuffle_prob

    def forward(self, model, batch, gen, passes=None):  # its own shuffled pass
        vm = batch["video_mask"]
        order, moved = shuffle_clips(vm, self.shuffle_prob, gen)
        out = model(batch, clip_order=order)
        if not moved.any():  # every video in the batch has a single clip: nothing to reorder
            return {"fom_loss": out.clips.sum() * 0.0, "fom_acc": float("nan")}
        logits = self.head(out.clips[moved]).float()
        target = order[moved]
        loss = F.cross_entropy(logits, target)
        return {"fom_loss": loss, "fom_acc": (logits.argmax(-1) == target).float().mean().detach()}


class VideoSubtitleMatching(nn.Module):
    """HERO VSM: one subtitle per video is the query.

    Local: the query's start and end clip, each a softmax over the video's clips
    (scores = temporal-encoder outputs . query vectors). Global: query-video score =
    max over clips of the cosine similarity; hinge with ``margin`` against every
    in-batch negative video (for the query) and negative query (for the video).

    ``context: video`` encodes each video from its clips alone (the global level
    without subtitles, ``encode_video``) instead of with every caption at the local
    level. That is the input ``eval-moments --context video`` scores, and the honest
    training condition where the queries are the video's only text: with
    ``subtitles`` the query's own words sit in its video's input, at its own clips.
    """

    name = "vsm"
    model_parts = ("cross", "temporal")
    architectures = ("hierarchical",)

    def __init__(self, model, vocab: TextVocab, margin: float = 0.1, local_weight: float = 1.0,
                 global_weight: float = 1.0, context: str = "subtitles"):
        super().__init__()
        if context not in VSM_CONTEXTS:
            raise ConfigError(f"vsm: context must be one of {', '.join(VSM_CONTEXTS)}, got {context!r}")
        self.margin, self.local_weight, self.global_weight = margin, local_weight, global_weight
        self.context = context
        H = model.cfg.hidden
        self.query = init_weights(nn.Linear(H, 3 * H))  # start, end and global query vectors from one subtitle

    def forward(self, model, batch, gen, passes=None):  # its own clean pass of both levels
        vm, valid, spans = batch["video_mask"], batch["sub_valid"] & (batch["sub_spans"][..., 0] >= 0), batch["sub_spans"]
        has = valid.any(1)
        # a random valid subtitle per example: argmax of random scores over valid ones
        pick = torch.where(valid, uniform(valid.shape, gen, valid.device), torch.full_like(valid, -1.0, dtype=torch.float)).argmax(1)
        rows = torch.arange(len(pick), device=pick.device)
        q_ids, q_mask = batch["sub_ids"][rows, pick], batch["sub_mask"][rows, pick]
        q = self.query(masked_mean(model.encode_text(q_ids, q_mask), q_mask)).float()
        q_start, q_end, q_glob = q.chunk(3, dim=-1)
        if self.context == "video":
            frames = model.encode_video(vm, video=batch.get("video"), tokens=batch.get("video_tokens")).float()
        else:
            frames = model(batch).clips.float()
        if not has.any():  # no subtitle overlaps any crop in this batch: nothing to match
            zero = frames.sum() * 0.0 + q.sum() * 0.0
            return {"vsm_loss": zero, "vsm_local": float("nan"), "vsm_global": float("nan")}
        neg_inf = torch.finfo(frames.dtype).min
        # .float() after each product: under autocast einsum returns bf16/fp16 whatever its inputs
        start_logits = torch.einsum("bth,bh->bt", frames, q_start).float().masked_fill(~vm, neg_inf)
        end_logits = torch.einsum("bth,bh->bt", frames, q_end).float().masked_fill(~vm, neg_inf)
        span = spans[rows, pick]
        local = (F.cross_entropy(start_logits[has], span[has, 0]) + F.cross_entropy(end_logits[has], span[has, 1])) / 2

        # global: s[i, j] = max_t cos(query_i, clip_t of video j)
        sims = torch.einsum("ih,jth->ijt", F.normalize(q_glob, dim=-1), F.normalize(frames, dim=-1)).float()
        sims = sims.masked_fill(~vm[None, :, :], -2.0).amax(-1)
        pos = sims.diagonal()
        negative = ~same_video(batch) & has[:, None] & has[None, :]
        hinge_v = (self.margin + sims - pos[:, None]).clamp_min(0)  # query i vs other videos j
        hinge_q = (self.margin + sims - pos[None, :]).clamp_min(0)  # video j vs other queries i
        n = negative.sum().clamp_min(1)
        glob = ((hinge_v * negative).sum() + (hinge_q * negative).sum()) / n
        loss = self.local_weight * local + self.global_weight * glob
        return {"vsm_loss": loss, "vsm_local": local.detach(), "vsm_global": glob.detach()}


class JointContrastive(nn.Module):
    """UniVL joint: symmetric InfoNCE between pooled text and video vectors, learnable temperature.

    ``loss: milnce`` instead scores each text against every clip in the batch and
    treats all clips of its own video as positives (MIL-NCE). With ``gather``, in a
    multi-process run every rank's vectors join the negatives.
    """

    name = "joint"
    model_parts = ()  # the text and video encoders and the joint space are always built
    architectures = ARCHITECTURES

    def __init__(self, model, vocab: TextVocab, loss: str = "infonce", gather: bool = True):
        super().__init__()
        if loss not in ("infonce", "milnce"):
            raise ConfigError(f"joint: loss must be infonce or milnce, got {loss!r}")
        self.loss, self.gather = loss, gather

    def forward(self, model, batch, gen, passes=None):
        vm = batch["video_mask"]
        text_h, video_h = own_passes(self, model, batch, gen, passes).sides()
        t = model.joint.text(text_h, batch["text_mask"]).float()
        scale = model.joint.logit_scale.exp().clamp(max=100.0)
        keys, offset = batch["video_key"], 0
        if self.loss == "infonce":
            v = model.joint.video(video_h, vm).float()
            if self.gather:
                t_all, v_all, keys, offset = *gather_with_grad(t, v), *gather_keys(batch["video_key"])
            else:
                t_all, v_all = t, v
            n = len(t)
            idx = torch.arange(n, device=t.device) + offset
            blocked = same_video(batch, keys)[idx]  # (n, N): other examples of the same video
            blocked[torch.arange(n), idx] = False
            logits_t = (scale * (t @ v_all.t()).float()).masked_fill(blocked, float("-inf"))
            logits_v = (scale * (v @ t_all.t()).float()).masked_fill(blocked, float("-inf"))
            loss = (F.cross_entropy(logits_t, idx) + F.cross_entropy(logits_v, idx)) / 2
        else:
            clips = model.joint.clips(video_h).float()  # (B, T, E)
            owner = torch.arange(len(t), device=t.device)[:, None].expand_as(vm)[vm]
            c = clips[vm]  # (M, E) every real clip in the batch
            scores = scale * (t @ c.t()).float()  # (B, M)
            pos = owner[None, :] == torch.arange(len(t), device=t.device)[:, None]
            same = same_video(batch)[:, owner]
            scores = scores.masked_fill(same & ~pos, float("-inf"))
            loss = (torch.logsumexp(scores, 1) - torch.logsumexp(scores.masked_fill(~pos, float("-inf")), 1)).mean()
        candidates = len(v_all) if self.loss == "infonce" else len(c)
        return {"joint_loss": loss, "joint_temperature": (1.0 / scale).detach(), "joint_candidates": candidates}


class VideoTextAlignment(nn.Module):
    """Cross-encoder matching: each text scored with its video and ``negatives`` other in-batch videos
    (and each video with as many other texts); cross-entropy over the candidates."""

    name = "align"
    model_parts = ("align",)
    architectures = ("two_stream", "single_stream")

    def __init__(self, model, vocab: TextVocab, negatives: int = 3):
        super().__init__()
        if negatives < 1:
            raise ConfigError("align: negatives must be >= 1")
        self.negatives = negatives

    def _pick(self, allowed: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(self.negatives, allowed.shape[1])
        r = torch.where(allowed, uniform(allowed.shape, gen, allowed.device), torch.full(allowed.shape, -1.0, device=allowed.device))
        idx = r.topk(k, dim=1).indices
        return idx, allowed.gather(1, idx)

    def forward(self, model, batch, gen, passes=None):
        vm = batch["video_mask"]
        B = len(vm)
        passes = own_passes(self, model, batch, gen, passes)
        allowed = ~same_video(batch)
        neg_v, ok_v = self._pick(allowed, gen)  # for text i: videos neg_v[i]
        neg_t, ok_t = self._pick(allowed, gen)  # for video i: texts neg_t[i]
        rows = torch.arange(B, device=vm.device)[:, None]
        text_idx = torch.cat([rows, rows.expand_as(neg_v), neg_t], 1)  # (B, 1 + 2k)
        video_idx = torch.cat([rows, neg_v, rows.expand_as(neg_t)], 1)
        # two_stream re-pairs the clean sides (shared with joint); single_stream runs each pair
        sides = passes.sides() if model.cfg.architecture == "two_stream" else None
        pooled = model.pair_pooled(batch, text_idx.flatten(), video_idx.flatten(), sides=sides)
        scores = model.align_score(pooled).float().view(B, -1)
        k = neg_v.shape[1]
        pos = scores[:, :1]
        s_v = torch.cat([pos, scores[:, 1 : 1 + k].masked_fill(~ok_v, float("-inf"))], 1)
        s_t = torch.cat([pos, scores[:, 1 + k :].masked_fill(~ok_t, float("-inf"))], 1)
        zero = torch.zeros(B, dtype=torch.long, device=vm.device)
        loss = (F.cross_entropy(s_v, zero) + F.cross_entropy(s_t, zero)) / 2
        acc = ((s_v.argmax(1) == 0) & (s_t.argmax(1) == 0)).float().mean().detach()
        return {"align_loss": loss, "align_acc": acc}


class CaptionReconstruction(nn.Module):
    """The decoder regenerates the caption (teacher forcing) while attending to the cross encoder.

    ``input_mask_prob`` is the share of caption tokens replaced by [MASK] in the
    cross encoder's input: UniVL uses 0.15; 1.0 makes it captioning from video alone.
    ``enhanced_v`` (UniVL's EnhancedV) hides the whole input text of that share of
    examples. ``condition: video`` makes the cross encoder read ``[CLS] [SEP]`` and the
    clean video instead (UniVL's caption fine-tuning without transcript), the input
    ``videolm caption`` generates from (docs/captioning.md).
    """

    name = "caption"
    model_parts = ("decoder",)
    architectures = ("two_stream",)
    masked_pass = "decoder"  # reads the shared masked pass; its own input masking only without mlm

    def __init__(self, model, vocab: TextVocab, input_mask_prob: float = 0.15, enhanced_v: float = 0.0,
                 condition: str = "caption"):
        super().__init__()
        self.vocab, self.input_mask_prob = vocab, input_mask_prob
        self.enhanced_v = check_probability("caption", "enhanced_v", enhanced_v)
        if condition not in CAPTION_CONDITIONS:
            raise ConfigError(f"caption: condition must be one of {', '.join(CAPTION_CONDITIONS)}, got {condition!r}")
        self.condition = condition
        if condition == "video":  # reads no shared masked pass: its own pass over [CLS] [SEP] + the video
            self.masked_pass = None

    def corrupt(self, ids, mask, gen):
        """The cross encoder's input text: ``input_mask_prob`` of the words set to [MASK] (no mlm labels)."""
        v = self.vocab
        maskable = mask & (ids != v.cls) & (ids != v.sep)
        hidden = (uniform(ids.shape, gen, ids.device) < self.input_mask_prob) & maskable
        return ids.masked_fill(hidden, v.mask), None

    def memory(self, model, batch, gen, passes=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross encoder states over [text; video], their mask): what the decoder attends to."""
        tm, vm = batch["text_mask"], batch["video_mask"]
        if self.condition == "video":  # [CLS] [SEP] and the clean video, as `videolm caption` reads them
            v, B, dev = self.vocab, tm.shape[0], tm.device
            tm = torch.ones(B, 2, dtype=torch.bool, device=dev)
            out = model({**batch, "text_ids": torch.tensor([[v.cls, v.sep]], device=dev).expand(B, 2),
                         "text_mask": tm})
        else:
            out = own_passes(self, model, batch, gen, passes).masked().out  # UniVL decodes from its masked pass
        return torch.cat([out.cross_text, out.cross_video], 1), torch.cat([tm, vm], 1)

    def forward(self, model, batch, gen, passes=None):
        ids, tm = batch["text_ids"], batch["text_mask"]
        memory, memory_mask = self.memory(model, batch, gen, passes)
        logits = model.decode(ids[:, :-1], tm[:, :-1], memory, memory_mask).float()
        target = ids[:, 1:].masked_fill(~tm[:, 1:], IGNORE)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
        return {"caption_loss": loss}


CAPTION_CONDITIONS = ("caption", "video")  # what caption's cross encoder reads besides the video
VSM_CONTEXTS = ("subtitles", "video")  # what vsm's video side reads besides the clips

OBJECTIVES = {
    "mlm": MaskedLanguageModelling,
    "mvm": MaskedVisualWords,
    "mfm_nce": MaskedFrameNCE,
    "mfm_reg": MaskedFrameRegression,
    "fom": FrameOrderModelling,
    "vsm": VideoSubtitleMatching,
    "joint": JointContrastive,
    "align": VideoTextAlignment,
    "caption": CaptionReconstruction,
}


def check_probability(objective: str, option: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{objective}: {option} must be a probability in [0, 1], got {value}")
    return value


def check_architecture(names, architecture: str) -> None:
    """Refuse, at config time, a recipe whose objectives cannot run on ``architecture``."""
    bad = [n for n in names if n in OBJECTIVES and architecture not in OBJECTIVES[n].architectures]
    if bad:
        detail = "; ".join(f"{n} runs on {', '.join(OBJECTIVES[n].architectures)}" for n in bad)
        raise ConfigError(f"objective(s) {', '.join(bad)} cannot run on model.architecture {architecture!r} "
                          f"({detail}); see docs/models.md")


def model_parts_for(names) -> tuple[str, ...]:
    """The optional model parts a set of objectives runs (``ModelConfig.parts``)."""
    return tuple(sorted({part for name in names for part in OBJECTIVES[name].model_parts}))


def build_objective(name: str, model, vocab: TextVocab, options: dict) -> nn.Module:
    """The objective ``name`` with its own heads sized for ``model`` (which it does not keep)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    check_architecture([name], model.cfg.architecture)
    try:
        return OBJECTIVES[name](model, vocab, **options)
    except TypeError as exc:
        raise ConfigError(f"objective {name!r}: bad option ({exc})") from None
