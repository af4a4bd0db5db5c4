"""UniVL's released checkpoints (microsoft/UniVL ``univl.pretrained.bin``) as ``two_stream`` weights.

The file is a state dict keyed by UniVL's module names (``bert.``, ``visual.``,
``cross.``, ``decoder.``, ``cls.``, ``cls_visual.``, ``similarity_dense``,
``normalize_video``). Both sides use BERT layers with the same inner names
(``layer.N.attention.self.query`` ...), so the import is a prefix rename
(``RENAMES``), two layer renames in the decoder (UniVL's ``slf_attn``/``enc_attn``
are transformers' ``attention``/``crossattention``), and checks:

* every UniVL key is used, tied to one that is, or in ``DROPPED`` with its reason;
* every key of the videolm model (and of the mlm head) is filled;
* shapes agree, and tied copies (UniVL repeats the word embeddings under four
  names) are really equal.

Anything else is an error that names the keys. Sizes (hidden, layer counts,
feature dimension, vocabulary) are read from the tensors; the head count is not
in the weights (UniVL: 12 everywhere, BERT's 64 dimensions per head).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import ConfigError

# UniVL prefix -> videolm prefix (model keys; "mlm." goes to the mlm objective's head)
RENAMES = (
    ("bert.embeddings.", "text.embeddings."),
    ("bert.encoder.", "text.encoder."),
    ("normalize_video.visual_norm2d.", "video_norm."),
    ("visual.embeddings.", "video_embed."),
    ("visual.encoder.", "video_encoder.encoder."),
    ("cross.embeddings.", "cross_embed."),
    ("cross.encoder.", "cross_encoder.encoder."),
    ("cross.pooler.", "cross_pooler."),
    ("similarity_dense.", "align_head."),
    ("decoder.embeddings.LayerNorm.", "decoder_norm."),
    ("decoder.decoder.", "decoder.encoder."),
    ("decoder.classifier.cls.predictions.transform.", "decoder_head."),
    ("cls.predictions.transform.", "mlm.transform."),
)
SINGLE = {"decoder.classifier.cls.predictions.bias": "caption_bias", "cls.predictions.bias": "mlm.bias"}
DECODER_LAYER = (("slf_attn.att.", "attention.self."), ("slf_attn.output.", "attention.output."),
                 ("enc_attn.att.", "crossattention.self."), ("enc_attn.output.", "crossattention.output."))
# copies of the text encoder's tables (UniVL ties them): checked equal, not imported twice
TIED = {"decoder.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
        "decoder.classifier.cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "decoder.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
        "cls_visual.predictions.weight": "visual.embeddings.word_embeddings.weight"}
DROPPED = {
    "bert.pooler.": "UniVL's text pooler: no UniVL output reads it (retrieval mean-pools the text states)",
    "visual.pooler.": "UniVL's visual pooler: no UniVL output reads it",
    "cls_visual.": "UniVL's MFM head ties its output to the visual input embedding and scores raw dot "
                   "products; videolm's mfm_nce has its own head (cosine, temperature), which starts fresh",
}
POSITION_TABLES = ("video_embed.position_embeddings.weight", "cross_embed.position_embeddings.weight")


def read_univl_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (``torch.load(weights_only=True)``), DataParallel's ``module.`` and old
    LayerNorm names (gamma/beta) normalised."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, a truncated file, not a torch file
        raise ConfigError(f"{path}: cannot be read as a weights-only torch state dict ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict (a mapping of names to tensors)")
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        out[k] = v
    if "bert.embeddings.word_embeddings.weight" not in out:
        raise ConfigError(f"{path}: no bert.embeddings.word_embeddings.weight: not a UniVL checkpoint")
    return out


def _layers(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def univl_sizes(state: dict, heads: int | None = None) -> dict:
    """Sizes of the UniVL model whose weights ``state`` holds."""
    vocab, hidden = state["bert.embeddings.word_embeddings.weight"].shape
    ffn = state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    heads = heads or max(1, hidden // 64)
    if hidden % heads or ffn % hidden:
        raise ConfigError(f"UniVL sizes not understood: hidden {hidden}, {heads} heads, feed-forward {ffn}")
    need = ["normalize_video.visual_norm2d.weight", "visual.embeddings.position_embeddings.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigError(f"not a UniVL checkpoint: missing {', '.join(missing)}")
    return {"vocab": vocab, "hidden": hidden, "heads": heads, "ffn_mult": ffn // hidden,
            "text_layers": _layers(state, "bert.encoder.layer."), "video_layers": _layers(state, "visual.encoder.layer."),
            "cross_layers": _layers(state, "cross.encoder.layer."),
            "decoder_layers": _layers(state, "decoder.decoder.layer."),
            "text_positions": state["bert.embeddings.position_embeddings.weight"].shape[0],
            "type_vocab": state["bert.embeddings.token_type_embeddings.weight"].shape[0],
            "video_positions": state["visual.embeddings.position_embeddings.weight"].shape[0],
            "cross_positions": (state["cross.embeddings.position_embeddings.weight"].shape[0]
                                if "cross.embeddings.position_embeddings.weight" in state else 0),
            "feature_dim": state["normalize_video.visual_norm2d.weight"].shape[0]}


def _rename(key: str) -> str | None:
    if key in SINGLE:
        return SINGLE[key]
    for old, new in RENAMES:
        if key.startswith(old):
            rest = key[len(old):]
            if old == "decoder.decoder.":
                for a, b in DECODER_LAYER:
                    rest = re.sub(r"^(layer\.\d+\.)" + re.escape(a), r"\g<1>" + b, rest)
            return new + rest
    return None


def map_univl_state(state: dict, max_text_len: int, max_frames: int) -> tuple[dict, dict, list[str]]:
    """(videolm model state, mlm head state, report lines) from a UniVL state dict.

    Position tables are cut to what the model reads: clips at ``max_frames`` rows;
    the cross table at ``max_text_len + max_frames`` (UniVL places clip t at
    ``max_words + t``; videolm at ``max_text_len + t``, so ``max_text_len`` must be
    the ``max_words`` UniVL was trained with).
    """
    model, mlm, unknown, report = {}, {}, [], []
    for key, value in state.items():
        if key in TIED:
            source = state.get(TIED[key])
            if source is None or source.shape != value.shape or not torch.equal(source, value):
                raise ConfigError(f"UniVL key {key} should be a copy of {TIED[key]} (UniVL ties them) but differs")
            continue
        dropped = next((why for p, why in DROPPED.items() if key.startswith(p)), None)
        if dropped is not None:
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
        elif new.startswith("mlm."):
            mlm[new[len("mlm."):]] = value
        else:
            model[new] = value
    if unknown:
        raise ConfigError(f"{len(unknown)} UniVL key(s) videolm does not know: {', '.join(sorted(unknown)[:20])}")
    for p, why in DROPPED.items():
        n = sum(k.startswith(p) for k in state)
        if n:
            report.append(f"not imported: {p}* ({n} tensors): {why}")
    rows = {POSITION_TABLES[0]: max_frames, POSITION_TABLES[1]: max_text_len + max_frames}
    for key, n in rows.items():
        if key in model:
            if model[key].shape[0] < n:
                raise ConfigError(f"{key}: the checkpoint has {model[key].shape[0]} positions, fewer than the "
                                  f"{n} that max_text_len={max_text_len}, max_frames={max_frames} need")
            if model[key].shape[0] > n:
                report.append(f"{key}: first {n} of {model[key].shape[0]} positions kept (the model reads no more)")
                model[key] = model[key][:n].clone()
    return model, mlm, report


def check_state_fits(module: torch.nn.Module, state: dict, what: str) -> None:
    """Every key of ``module`` filled by ``state`` with the same shape, and nothing left over."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in set(want) & set(state)
                   if state[k].shape != want[k].shape)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:20])}")
    if extra:
        problems.append(f"no place in videolm's model: {', '.join(extra[:20])}")
    if wrong:
        problems.append(f"shape mismatch (checkpoint vs videolm): {', '.join(wrong[:20])}")
    if problems:
        raise ConfigError(f"{what}: " + "; ".join(problems))
