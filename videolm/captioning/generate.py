"""Caption generation with the two_stream (UniVL) decoder: batched greedy and beam search.

Conditioning is what the ``caption`` objective trains with (``condition: video``,
UniVL's caption fine-tuning): the cross encoder reads a text and the clean video,
and the decoder attends to its states over both. The text is ``[CLS] [SEP]``
(captioning from the video alone) or, with a transcript, the subtitles of the
item (UniVL's "with transcript" setting). The decoder starts from ``[CLS]`` and a
caption ends at ``[SEP]``, as the objective's teacher-forced input and target do.

Decoding recomputes the decoder over the whole prefix at every step (no key/value
cache): captions are short, and the step is then exactly the training forward;
only the last position goes through the vocabulary projection.
``[PAD]``, ``[CLS]`` and ``[MASK]`` are never generated.

Beam search keeps ``beam_size`` hypotheses per item. A hypothesis that emitted
``[SEP]`` is finished: its only continuation is ``[PAD]`` at no cost, so it stays
in the beam with its score while it ranks among the best. Hypotheses are ranked by
their summed log-probability divided by ``length ** length_penalty`` (length
counts the tokens generated, ``[SEP]`` included; 0 ranks by the sum, 1 by the mean
per token), at every step and at the end. With ``beam_size: 1`` every candidate
of a step has the same length, so the ranking is the greedy argmax: beam 1 gives
greedy's captions (a test checks it). ``no_repeat_ngram: n`` forbids any token
that would repeat an n-gram already in the hypothesis (0: off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class GenerateConfig:
    beam_size: int = 1  # 1: greedy
    max_len: int = 20  # tokens generated at most, [SEP] included
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0

    def __post_init__(self):
        if self.beam_size < 1 or self.max_len < 1 or self.no_repeat_ngram < 0:
            raise ConfigError("caption: beam_size and max_len must be >= 1, no_repeat_ngram >= 0")
        if self.length_penalty < 0:
            raise ConfigError(f"caption: length_penalty must be >= 0, got {self.length_penalty}")


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        t = tokenizer
        return cls(t.cls_token_id, t.sep_token_id, t.pad_token_id, t.mask_token_id)

    @property
    def banned(self) -> list[int]:
        return [self.pad, self.cls, self.mask]


def caption_memory(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(memory, memory_mask): the cross encoder over ``[text; video]`` of ``inputs``, as the objective reads it."""
    out = model(inputs)
    return (torch.cat([out.cross_text, out.cross_video], 1),
            torch.cat([inputs["text_mask"], inputs["video_mask"]], 1))


def ban_repeats(prefix: torch.Tensor, logp: torch.Tensor, n: int) -> None:
    """Set to -inf, in place, every token that would complete an n-gram already in the row's prefix."""
    rows = prefix[:, 1:].tolist()  # generated tokens, [CLS] left out
    for r, toks in enumerate(rows):
        if len(toks) < n:
            continue
        tail = toks[len(toks) - n + 1 :] if n > 1 else []
        banned = {toks[i + n - 1] for i in range(len(toks) - n + 1) if toks[i : i + n - 1] == tail}
        if banned:
            logp[r, list(banned)] = float("-inf")


def next_logprobs(model, prefix: torch.Tensor, memory, memory_mask, special: SpecialIds,
                  cfg: GenerateConfig) -> torch.Tensor:
    """(N, vocab) log-probabilities of the next token after each prefix, bans applied."""
    mask = torch.ones_like(prefix, dtype=torch.bool)
    logits = model.decode(prefix, mask, memory, memory_mask, last_only=True)[:, -1].float()
    logits[:, special.banned] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    if cfg.no_repeat_ngram:
        ban_repeats(prefix, logp, cfg.no_repeat_ngram)
    return logp


def finished_tokens(prefix: torch.Tensor, special: SpecialIds) -> list[list[int]]:
    """Each row's generated tokens up to (without) its first [SEP]."""
    out = []
    for row in prefix[:, 1:].tolist():
        out.append(row[: row.index(special.sep)] if special.sep in row else row)
    return out


@torch.inference_mode()
def greedy(model, memory, memory_mask, special: SpecialIds, cfg: GenerateConfig) -> list[list[int]]:
    B = memory.shape[0]
    prefix = torch.full((B, 1), special.cls, dtype=torch.long, device=memory.device)
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for _ in range(cfg.max_len):
        tok = next_logprobs(model, prefix, memory, memory_mask, special, cfg).argmax(-1)
        tok = tok.masked_fill(done, special.pad)
        prefix = torch.cat([prefix, tok[:, None]], 1)
        done |= tok == special.sep
        if bool(done.all()):
            break
    return finished_tokens(prefix, special)


def _penalised(scores: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    return scores / lengths.clamp(min=1).to(scores.dtype) ** alpha


@torch.inference_mode()
def beam_search(model, memory, memory_mask, special: SpecialIds, cfg: GenerateConfig) -> list[list[int]]:
    B, K, dev = memory.shape[0], cfg.beam_size, memory.device
    memory, memory_mask = memory.repeat_interleave(K, 0), memory_mask.repeat_interleave(K, 0)
    prefix = torch.full((B * K, 1), special.cls, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live hypothesis to start with
    lengths = torch.zeros(B, K, dtype=torch.long, device=dev)
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    for t in range(cfg.max_len):
        logp = next_logprobs(model, prefix, memory, memory_mask, special, cfg).view(B, K, -1)
        V = logp.shape[-1]
        frozen = torch.full((V,), float("-inf"), device=dev)
        frozen[special.pad] = 0.0  # a finished hypothesis only continues with [PAD], at no cost
        logp = torch.where(done[..., None], frozen, logp)
        total = scores[..., None] + logp
        new_len = torch.where(done, lengths, torch.full_like(lengths, t + 1))
        rank = _penalised(total, new_len[..., None], cfg.length_penalty)
        flat = rank.view(B, -1).topk(K, dim=1).indices
        beam, tok = flat // V, flat % V
        scores = total.view(B, -1).gather(1, flat)
        lengths, done = new_len.gather(1, beam), done.gather(1, beam) | (tok == special.sep)
        kept = prefix.view(B, K, -1).gather(1, beam[..., None].expand(-1, -1, prefix.shape[1]))
        prefix = torch.cat([kept, tok[..., None]], -1).view(B * K, -1)
        if bool(done.all()):
            break
    best = _penalised(scores, lengths, cfg.length_penalty).argmax(1)
    rows = prefix.view(B, K, -1)[torch.arange(B, device=dev), best]
    return finished_tokens(rows, special)


class Captioner:
    """Generates captions for batches of model inputs (text = the condition, video = the item's clips)."""

    def __init__(self, model, tokenizer, cfg: GenerateConfig):
        if "decoder" not in model.parts:
            raise ConfigError("this model has no caption decoder: its recipe did not train the caption objective")
        if cfg.max_len > model.cfg.max_text_len:
            raise ConfigError(f"caption: max_len {cfg.max_len} exceeds the model's max_text_len "
                              f"{model.cfg.max_text_len} (the decoder's position table)")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.special = SpecialIds.of(tokenizer)

    def token_ids(self, inputs: dict) -> list[list[int]]:
        memory, memory_mask = caption_memory(self.model, inputs)
        search = greedy if self.cfg.beam_size == 1 else beam_search
        return search(self.model, memory, memory_mask, self.special, self.cfg)

    @torch.inference_mode()
    def captions(self, inputs: dict) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.token_ids(inputs)]
