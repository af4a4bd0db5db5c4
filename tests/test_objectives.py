"""Pretraining objectives: mask rates, targets on hand-made batches, finite losses, tiny-model overfitting.

Everything runs on a tiny randomly initialised model (``text_init: none``, hidden 32,
one layer per stack, dropout 0) and batches collated from hand-made examples with
the real WordPiece tokenizer, so the ids, special tokens and padding are the ones
training sees.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videolm.pretrain import objectives
from videolm.pretrain.collate import Collator
from videolm.errors import ConfigError
from videolm.model.inputs import VISUAL_MASK_ID
from videolm.model.video_text import ARCHITECTURES, ModelConfig, build_model
from videolm.pretrain.objectives import (IGNORE, OBJECTIVES, MaskedLanguageModelling, TextVocab, build_objective,
                                sample_mask, shuffle_clips)
from videolm.model.text import load_tokenizer

FEATURE_DIM = 8
VISUAL_WORDS = 8  # codebook size; model ids are words + 5 special ids
TINY = ModelConfig(hidden=32, heads=2, text_init="none", text_layers=1, video_layers=1, cross_layers=1,
                   temporal_layers=1, decoder_layers=1, max_frames=16, max_text_len=24, embed_dim=16,
                   feature_dim=FEATURE_DIM, visual_vocab=VISUAL_WORDS + 5, dropout=0.0)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tensors here are tiny: fanning every op out over threads costs more than it saves,
    # and on a busy 2-core machine it made each training step ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def vocab(tok):
    return TextVocab.from_tokenizer(tok)


@pytest.fixture(scope="module")
def collate(tok):
    return Collator(tok)


@pytest.fixture(scope="module")
def _base_model():
    # Building re-reads the tokenizer for the vocab size (~1 s); build once, copy per test.
    torch.manual_seed(0)
    return build_model(TINY)


@pytest.fixture
def model(_base_model):
    return copy.deepcopy(_base_model)


@pytest.fixture(scope="module")
def _models():
    torch.manual_seed(0)
    return {a: build_model(dataclasses.replace(TINY, architecture=a)) for a in ARCHITECTURES}


@pytest.fixture
def hier_model(_models):
    """HERO's layout: fom and vsm run on it only."""
    return copy.deepcopy(_models["hierarchical"])


# ---------------------------------------------------------------------------------------------- helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def example(video_id, features, texts, spans, tokens=None, rng=None):
    n = len(features)
    rng = rng or np.random.default_rng(0)
    return dict(video_id=video_id, features=np.asarray(features, np.float32),
                tokens=rng.integers(0, VISUAL_WORDS, n) if tokens is None else np.asarray(tokens),
                clip_starts=np.arange(n, dtype=float), clip_ends=np.arange(n) + 1.0, texts=list(texts),
                text_spans=np.array(spans, dtype=np.int64).reshape(-1, 2),
                # caption times from the spans (one clip per second); an off-clip caption lies past the clips
                text_times=np.array([(a, b + 1.0) if a >= 0 else (n + 5.0, n + 6.0) for a, b in spans],
                                    dtype=np.float32).reshape(-1, 2))


def handmade_batch(collate, shared_video=False):
    """Four videos of 3-6 clips (so rows are padded), captions of different lengths.

    Features are random normal, so every clip is distinct from every other in direction:
    a target can be identified by exact equality with the original feature.
    """
    rng = np.random.default_rng(1)
    lengths = [3, 6, 4, 5]
    texts = [["red dog runs", "blue cat"], ["a man walks left", "then up"], ["one two", "three four five six"],
             ["green bird", "sings"]]
    spans = [[[0, 0], [1, 2]], [[0, 2], [3, 5]], [[-1, -1], [1, 3]], [[0, 3], [4, 4]]]  # row 2: one caption off-clip
    ids = ["vA", "vA" if shared_video else "vB", "vC", "vD"]
    return collate([example(ids[i], rng.normal(size=(lengths[i], FEATURE_DIM)), texts[i], spans[i], rng=rng)
                    for i in range(4)])


def total_loss(out: dict) -> torch.Tensor:
    return sum(v for k, v in out.items() if k.endswith("_loss"))


def record_calls(monkeypatch, obj, name):
    """Wrap ``obj.name`` so that every call's arguments (by parameter name) are recorded."""
    orig = getattr(obj, name)
    sig = inspect.signature(orig)
    calls = []

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return orig(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def record_outputs(monkeypatch, obj, name):
    """Wrap ``obj.name`` so that every call's return value is recorded."""
    orig = getattr(obj, name)
    outputs = []

    def wrapper(*args, **kwargs):
        outputs.append(orig(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(obj, name, wrapper)
    return outputs


class RecordingF:
    """Stands in for ``torch.nn.functional`` inside objectives.py and records loss targets."""

    def __init__(self):
        self.ce, self.mse = [], []

    def __getattr__(self, name):
        return getattr(F, name)

    def cross_entropy(self, input, target, *args, **kwargs):
        self.ce.append((input.detach().clone(), target.detach().clone()))
        return F.cross_entropy(input, target, *args, **kwargs)

    def mse_loss(self, input, target, *args, **kwargs):
        self.mse.append((input.detach().clone(), target.detach().clone()))
        return F.mse_loss(input, target, *args, **kwargs)


@pytest.fixture
def rec_f(monkeypatch):
    rec = RecordingF()
    monkeypatch.setattr(objectives, "F", rec)
    return rec


# ---------------------------------------------------------------------------------------------- mask rates


def _text_batch(vocab, B=64, L=128, seed=0):
    """[CLS] body [SEP] [PAD]...: every row has its own length, bodies hold no special ids."""
    g = gen(seed)
    ids = torch.randint(1000, vocab.size, (B, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L  # one unpadded row
    mask = torch.arange(L)[None, :] < lengths[:, None]
    ids[:, 0] = vocab.cls
    ids[torch.arange(B), lengths - 1] = vocab.sep
    ids[~mask] = vocab.pad
    return ids, mask


def test_mlm_corruption_rates_and_80_10_10_split(model, vocab):
    mlm = MaskedLanguageModelling(model, vocab)
    ids, mask = _text_batch(vocab)
    out, labels = mlm.corrupt(ids, mask, gen(0))
    chosen = labels != IGNORE
    candidates = mask & (ids != vocab.cls) & (ids != vocab.sep)

    # ~15% of the real, non-special tokens (about 7,000 candidates: 1.5 points is > 3 sigma)
    rate = chosen.sum().item() / candidates.sum().item()
    assert abs(rate - 0.15) < 0.015, rate
    # never a special token or a padded position
    assert not (chosen & ~candidates).any()
    for special in (vocab.cls, vocab.sep, vocab.pad):
        assert not chosen[ids == special].any()
    # labels are the original ids; untouched positions keep their id
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])

    # of the chosen: ~80% [MASK], ~10% a random id, ~10% left as they were (~1,000 chosen)
    n = chosen.sum().item()
    as_mask = (out[chosen] == vocab.mask).float().sum().item() / n
    kept = (out[chosen] == ids[chosen]).float().sum().item() / n
    randomised = ((out[chosen] != vocab.mask) & (out[chosen] != ids[chosen])).float().sum().item() / n
    assert abs(as_mask - 0.8) < 0.05, as_mask
    assert abs(kept - 0.1) < 0.04, kept
    assert abs(randomised - 0.1) < 0.04, randomised
    assert (out[chosen] < vocab.size).all() and (out >= 0).all()


def test_mlm_corruption_is_reproducible_from_the_generator(model, vocab):
    # A resumed run must draw the same masks: everything comes from `gen`.
    mlm = MaskedLanguageModelling(model, vocab)
    ids, mask = _text_batch(vocab, B=4, L=32)
    a, b = mlm.corrupt(ids, mask, gen(7)), mlm.corrupt(ids, mask, gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sample_mask_rate_over_valid_positions_only():
    g = gen(0)
    valid = torch.rand(64, 128, generator=g) < 0.6
    for prob in (0.15, 0.5):
        chosen = sample_mask(valid, prob, gen(1))
        assert not (chosen & ~valid).any()
        rate = chosen.sum().item() / valid.sum().item()
        assert abs(rate - prob) < 0.015, (prob, rate)


def test_sample_mask_picks_one_when_the_rate_gives_none():
    valid = torch.zeros(3, 5, dtype=torch.bool)
    valid[1, 2] = valid[2, 0] = True
    for seed in range(5):
        chosen = sample_mask(valid, 1e-9, gen(seed))
        assert chosen.sum() == 1 and not (chosen & ~valid).any()
    # nothing valid: nothing chosen, and no error
    assert not sample_mask(torch.zeros(2, 4, dtype=torch.bool), 0.5, gen(0)).any()


def test_shuffle_clips_moves_15_percent_and_every_moved_clip_changes_place():
    lengths = torch.tensor([0, 1, 2, 3, 7, 20, 64, 128] + [100] * 24)
    T = 128
    valid = torch.arange(T)[None, :] < lengths[:, None]
    order, moved = shuffle_clips(valid, 0.15, gen(0))

    assert not (moved & ~valid).any(), "a padded position was shuffled"
    positions = torch.arange(T).expand_as(order)
    assert torch.equal(order[~moved], positions[~moved]), "unmoved positions must keep their own clip"
    assert (order[moved] != positions[moved]).all(), "a 'moved' position got its own clip back"
    for b, n in enumerate(lengths.tolist()):
        expected = 0 if n < 2 else max(2, round(0.15 * n))
        assert moved[b].sum().item() == expected, (n, moved[b].sum().item())
        # the moved clips are a permutation of the moved positions: nothing duplicated or lost
        assert sorted(order[b, moved[b]].tolist()) == sorted(moved[b].nonzero().squeeze(1).tolist())
    long_rows = lengths >= 20
    rate = moved[long_rows].sum().item() / valid[long_rows].sum().item()
    assert abs(rate - 0.15) < 0.015, rate


# ---------------------------------------------------------------------------------------------- targets


def test_mlm_predicts_the_original_ids_of_its_corrupted_positions(model, vocab, collate, monkeypatch, rec_f):
    batch = handmade_batch(collate)
    mlm = build_objective("mlm", model, vocab, {"mask_prob": 0.4})
    expected_ids, labels = mlm.corrupt(batch["text_ids"], batch["text_mask"], gen(3))
    fwd = record_calls(monkeypatch, model, "forward")
    mlm(model, batch, gen(3))
    assert torch.equal(fwd[0]["inputs"]["text_ids"], expected_ids)  # the call draws the same corruption as corrupt()
    (logits, target), = rec_f.ce
    chosen = labels != IGNORE
    assert torch.equal(target, batch["text_ids"][chosen])
    assert logits.shape == (chosen.sum().item(), vocab.size)


def test_mvm_masks_visual_words_and_predicts_the_originals(model, vocab, collate, monkeypatch, rec_f):
    batch = handmade_batch(collate)
    vm, original = batch["video_mask"], batch["video_tokens"]
    fwd = record_calls(monkeypatch, model, "forward")
    build_objective("mvm", model, vocab, {"mask_prob": 0.4})(model, batch, gen(0))
    tokens_in, video_in = fwd[0]["inputs"]["video_tokens"], fwd[0]["inputs"]["video"]
    chosen = tokens_in != original
    assert chosen.sum() >= 2 and not (chosen & ~vm).any()
    assert (tokens_in[chosen] == VISUAL_MASK_ID).all()
    # the same clips lose their features (a features model must not see what it predicts)
    assert (video_in[chosen] == 0).all()
    assert torch.equal(video_in[~chosen], batch["video"][~chosen])
    (logits, target), = rec_f.ce
    assert torch.equal(target, original[chosen])
    assert (target >= 5).all()  # real visual words, never [PAD] or [MASK]
    assert logits.shape == (chosen.sum().item(), TINY.visual_vocab)


def test_mfm_nce_target_is_the_masked_clips_own_feature(model, vocab, collate, monkeypatch, rec_f):
    batch = handmade_batch(collate)
    vm = batch["video_mask"]
    fwd = record_calls(monkeypatch, model, "forward")
    build_objective("mfm_nce", model, vocab, {"mask_prob": 0.5})(model, batch, gen(2))
    video_in = fwd[0]["inputs"]["video"]
    chosen = (video_in != batch["video"]).any(-1)
    assert chosen.sum() >= 3 and len(chosen.any(1).nonzero()) >= 2, "want masked clips in several rows"
    assert not (chosen & ~vm).any() and (video_in[chosen] == 0).all()

    (logits, target), = rec_f.ce
    candidates = batch["video"][vm]  # every real clip of the batch, row-major
    assert logits.shape == (chosen.sum().item(), vm.sum().item())
    # row-major order of the masked clips, as the objective's predictions are
    for k, (b, t) in enumerate(chosen.nonzero().tolist()):
        assert torch.equal(candidates[target[k]], batch["video"][b, t]), (b, t)


def test_mfm_nce_does_not_use_a_repeated_clip_as_a_negative(model, vocab, collate, monkeypatch, rec_f):
    # Overlapping segments of one video repeat clips (same video, same start time): a masked
    # clip's copy in another row is neither its target nor a negative.
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(6, FEATURE_DIM))
    seg_a = example("vA", feats[:4], ["first half"], [[0, 3]], rng=rng)
    seg_b = example("vA", feats[2:], ["second half"], [[0, 3]], rng=rng)
    seg_b["clip_starts"], seg_b["clip_ends"] = np.arange(2, 6, dtype=float), np.arange(3, 7, dtype=float)
    other = example("vB", rng.normal(size=(3, FEATURE_DIM)), ["other video"], [[0, 2]], rng=rng)
    batch = collate([seg_a, seg_b, other])
    vm = batch["video_mask"]
    fwd = record_calls(monkeypatch, model, "forward")
    build_objective("mfm_nce", model, vocab, {"mask_prob": 0.6})(model, batch, gen(0))
    chosen = (fwd[0]["inputs"]["video"] != batch["video"]).any(-1)
    (logits, target), = rec_f.ce
    flat = [(b, t) for b, t in vm.nonzero().tolist()]  # candidate order
    copies = {(0, 2): (1, 0), (0, 3): (1, 1), (1, 0): (0, 2), (1, 1): (0, 3)}
    assert any(tuple(x) in copies for x in chosen.nonzero().tolist()), "want a masked clip that has a copy"
    for k, (b, t) in enumerate(chosen.nonzero().tolist()):
        assert flat[target[k]] == (b, t) and torch.isfinite(logits[k, target[k]])
        blocked = {flat.index(copies[(b, t)])} if (b, t) in copies else set()
        for j in range(len(flat)):
            assert torch.isinf(logits[k, j]) == (j in blocked), ((b, t), flat[j])


def test_mfm_reg_regresses_the_masked_clips_original_features(model, vocab, collate, monkeypatch, rec_f):
    batch = handmade_batch(collate)
    fwd = record_calls(monkeypatch, model, "forward")
    build_objective("mfm_reg", model, vocab, {"mask_prob": 0.5})(model, batch, gen(2))
    chosen = (fwd[0]["inputs"]["video"] != batch["video"]).any(-1)
    assert chosen.sum() >= 2
    (pred, target), = rec_f.mse
    assert torch.equal(target, batch["video"][chosen])
    assert pred.shape == target.shape


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fom_target_is_each_moved_clips_original_position(hier_model, vocab, collate, monkeypatch, rec_f, seed):
    model = hier_model
    batch = handmade_batch(collate)
    vm = batch["video_mask"]
    fwd = record_calls(monkeypatch, model, "forward")
    build_objective("fom", model, vocab, {})(model, batch, gen(seed))
    # HERO shuffles between the levels: the batch goes in as it is, the global level gets the order
    assert fwd[0]["inputs"]["video"] is batch["video"]
    order = fwd[0]["clip_order"]

    expected = []
    for b in range(len(vm)):
        n = int(vm[b].sum())
        assert torch.equal(order[b, n:], torch.arange(n, vm.shape[1])), "padding was shuffled in"
        sources = order[b, :n].tolist()
        assert sorted(sources) == list(range(n)), "clips duplicated or lost"
        moved = [(t, s) for t, s in enumerate(sources) if s != t]
        assert len(moved) >= 2
        expected += [s for _, s in moved]
    (logits, target), = rec_f.ce
    assert target.tolist() == expected
    assert logits.shape == (len(expected), TINY.max_frames)


def test_vsm_targets_are_the_picked_subtitles_span(hier_model, vocab, collate, monkeypatch, rec_f):
    model = hier_model
    batch = handmade_batch(collate)
    vm, spans = batch["video_mask"], batch["sub_spans"]
    has = (batch["sub_valid"] & (spans[..., 0] >= 0)).any(1)
    picked_rows0 = set()
    calls = record_calls(monkeypatch, model, "encode_text")
    for seed in range(8):
        rec_f.ce.clear()
        calls.clear()
        build_objective("vsm", model, vocab, {})(model, batch, gen(seed))
        q_ids = calls[0]["ids"]  # the query is encoded first, before the caption/video pass
        picks = []
        for b in range(len(vm)):
            match = [j for j in range(batch["sub_ids"].shape[1]) if torch.equal(batch["sub_ids"][b, j], q_ids[b])]
            assert len(match) == 1
            j = match[0]
            assert batch["sub_valid"][b, j] and spans[b, j, 0] >= 0, "picked a padding or off-clip subtitle"
            picks.append(j)
        picked_rows0.add(picks[0])
        picks = torch.tensor(picks)
        rows = torch.arange(len(vm))
        (start_logits, start), (end_logits, end) = rec_f.ce
        assert torch.equal(start, spans[rows, picks, 0][has])
        assert torch.equal(end, spans[rows, picks, 1][has])
        # padded clips can never be the predicted start or end
        assert (start_logits[~vm[has]] == torch.finfo(start_logits.dtype).min).all()
        assert (end_logits[~vm[has]] == torch.finfo(end_logits.dtype).min).all()
    assert picked_rows0 == {0, 1}, "the query subtitle should vary with the generator"


def test_caption_target_is_the_caption_shifted_by_one(model, vocab, collate, monkeypatch, rec_f):
    batch = handmade_batch(collate)
    ids, tm, vm = batch["text_ids"], batch["text_mask"], batch["video_mask"]
    fwd = record_calls(monkeypatch, model, "forward")
    dec = record_calls(monkeypatch, model, "decode")
    build_objective("caption", model, vocab, {"input_mask_prob": 0.5})(model, batch, gen(0))

    # teacher forcing: the decoder reads tokens 0..L-2 and predicts 1..L-1, padding ignored
    assert torch.equal(dec[0]["ids"], ids[:, :-1]) and torch.equal(dec[0]["mask"], tm[:, :-1])
    assert torch.equal(dec[0]["memory_mask"], torch.cat([tm, vm], 1))
    (logits, target), = rec_f.ce
    expected = ids[:, 1:].masked_fill(~tm[:, 1:], IGNORE)
    assert torch.equal(target, expected.reshape(-1))
    assert (expected == vocab.sep).sum() == len(ids)  # every caption ends by predicting [SEP]
    assert logits.shape == (ids.numel() - len(ids), vocab.size)

    # the cross encoder's copy has some caption tokens replaced by [MASK], never specials or padding
    hidden = fwd[0]["inputs"]["text_ids"] != ids
    assert hidden.any()
    assert (fwd[0]["inputs"]["text_ids"][hidden] == vocab.mask).all()
    maskable = tm & (ids != vocab.cls) & (ids != vocab.sep)
    assert not (hidden & ~maskable).any()


def _joint_manual(model, batch, loss="infonce"):
    """The joint loss computed directly, with other examples of the same video excluded."""
    with torch.no_grad():
        tm, vm = batch["text_mask"], batch["video_mask"]
        text_h = model.encode_text(batch["text_ids"], tm)
        video_h = model.encode_video(vm, batch["video"])
        t = model.joint.text(text_h, tm)
        scale = model.joint.logit_scale.exp()
        keys = batch["video_key"]
        B = len(keys)
        if loss == "infonce":
            v = model.joint.video(video_h, vm)
            total = 0.0
            for i in range(B):
                keep = [j for j in range(B) if j == i or keys[j] != keys[i]]
                lt = scale * t[i] @ v[keep].t()
                lv = scale * v[i] @ t[keep].t()
                target = keep.index(i)
                total += (-lt.log_softmax(0)[target] - lv.log_softmax(0)[target]) / 2
            return total / B
        clips = model.joint.clips(video_h)
        total = 0.0
        for i in range(B):
            own = clips[i][vm[i]]
            others = [clips[j][vm[j]] for j in range(B) if keys[j] != keys[i]]
            scores_pos = scale * own @ t[i]
            scores_all = scale * torch.cat([own, *others]) @ t[i]
            total += torch.logsumexp(scores_all, 0) - torch.logsumexp(scores_pos, 0)
        return total / B


@pytest.mark.parametrize("loss", ["infonce", "milnce"])
def test_joint_never_uses_the_same_video_as_a_negative(model, vocab, collate, loss):
    batch = handmade_batch(collate, shared_video=True)
    assert batch["video_key"][0] == batch["video_key"][1] != batch["video_key"][2]
    model.eval()
    got = build_objective("joint", model, vocab, {"loss": loss})(model, batch, gen(0))["joint_loss"].item()
    assert got == pytest.approx(_joint_manual(model, batch, loss).item(), rel=1e-5, abs=1e-6)
    # the exclusion matters here: the same batch with distinct video ids gives another loss
    distinct = handmade_batch(collate, shared_video=False)
    naive = build_objective("joint", model, vocab, {"loss": loss})(model, distinct, gen(0))["joint_loss"].item()
    assert abs(naive - got) > 1e-4


def test_align_never_uses_the_same_video_as_a_negative(model, vocab, collate, monkeypatch):
    batch = handmade_batch(collate, shared_video=True)
    keys = batch["video_key"]
    B = len(keys)
    obj = build_objective("align", model, vocab, {"negatives": 3})  # 3 > the 2 allowed ones of rows 0 and 1
    picks = []
    orig_pick = obj._pick

    def pick(allowed, g):
        idx, ok = orig_pick(allowed, g)
        picks.append((idx, ok))
        return idx, ok

    monkeypatch.setattr(obj, "_pick", pick)
    cross = record_calls(monkeypatch, model, "cross")
    scores = record_outputs(monkeypatch, model, "align_score")
    model.eval()
    got = obj(model, batch, gen(0))["align_loss"]

    (neg_v, ok_v), (neg_t, ok_t) = picks
    k = neg_v.shape[1]
    assert k == 3
    for idx, ok in picks:
        # a pick is usable exactly when it comes from another video
        assert torch.equal(ok, keys[idx] != keys[:, None])
        assert not ok[0].all() and not ok[1].all(), "rows 0 and 1 have only two usable negatives"

    # the pairs sent through the cross encoder: (i, i), (i, neg_v), (neg_t, i), in that order
    with torch.no_grad():
        text_h = model.encode_text(batch["text_ids"], batch["text_mask"])
        video_h = model.encode_video(batch["video_mask"], batch["video"])
    text_rows = [[j for j in range(B) if torch.equal(x, text_h[j])][0] for x in cross[0]["text_h"]]
    video_rows = [[j for j in range(B) if torch.equal(x, video_h[j])][0] for x in cross[0]["video_h"]]
    for i in range(B):
        pairs = list(zip(text_rows, video_rows))[i * (1 + 2 * k) : (i + 1) * (1 + 2 * k)]
        assert pairs[0] == (i, i)
        assert pairs[1 : 1 + k] == [(i, j) for j in neg_v[i].tolist()]
        assert pairs[1 + k :] == [(j, i) for j in neg_t[i].tolist()]

    # the loss scores each positive only against the usable negatives
    s = scores[0].detach().view(B, -1)
    manual = 0.0
    for i in range(B):
        s_v = torch.cat([s[i, :1], s[i, 1 : 1 + k][ok_v[i]]])
        s_t = torch.cat([s[i, :1], s[i, 1 + k :][ok_t[i]]])
        manual += (-s_v.log_softmax(0)[0] - s_t.log_softmax(0)[0]) / 2
    assert got.item() == pytest.approx((manual / B).item(), rel=1e-5)


def test_vsm_global_hinge_skips_pairs_from_the_same_video(hier_model, vocab, collate, monkeypatch):
    model = hier_model
    batch = handmade_batch(collate, shared_video=True)
    keys, vm = batch["video_key"], batch["video_mask"]
    # margin 1 makes every hinge term positive, so an included same-video pair would show
    obj = build_objective("vsm", model, vocab, {"margin": 1.0})
    queries = record_outputs(monkeypatch, obj.query, "forward")
    outputs = record_outputs(monkeypatch, model, "forward")
    model.eval()
    got = obj(model, batch, gen(0))["vsm_global"]

    with torch.no_grad():
        q_glob = F.normalize(queries[0].float().chunk(3, dim=-1)[2], dim=-1)
        frames = F.normalize(outputs[0].clips.float(), dim=-1)
        B = len(keys)
        sims = torch.stack([torch.stack([(frames[j][vm[j]] @ q_glob[i]).max() for j in range(B)]) for i in range(B)])
        has = (batch["sub_valid"] & (batch["sub_spans"][..., 0] >= 0)).any(1)
        def hinge(pairs):
            terms = [(1.0 + sims[i, j] - sims[i, i]).clamp_min(0) + (1.0 + sims[i, j] - sims[j, j]).clamp_min(0)
                     for i, j in pairs]
            return (sum(terms) / len(pairs)).item()
        allowed = [(i, j) for i in range(B) for j in range(B) if keys[i] != keys[j] and has[i] and has[j]]
        naive = [(i, j) for i in range(B) for j in range(B) if i != j]
    assert (0, 1) not in allowed and len(allowed) == 10
    assert got == pytest.approx(hinge(allowed), rel=1e-5)
    assert abs(hinge(naive) - got) > 1e-3  # the exclusion makes a difference on this batch


# ---------------------------------------------------------------------------------------------- finite losses


def padded_batch(collate):
    """Awkward but legal: 1..7 clips, captions of 1..9 words, one example with no subtitle on its
    clips, one with no subtitle at all, two examples from the same video."""
    rng = np.random.default_rng(5)
    specs = [("v0", 1, ["hi"], [[0, 0]]),
             ("v1", 7, ["a long caption with many more words than others", "ok"], [[0, 4], [5, 6]]),
             ("v1", 3, ["same video again"], [[0, 2]]),
             ("v2", 5, ["off the clips"], [[-1, -1]]),
             ("v3", 2, [], []),
             ("v4", 4, ["four clips here", "and here", "and a third"], [[0, 1], [2, 2], [3, 3]])]
    return collate([example(v, rng.normal(size=(n, FEATURE_DIM)), t, s, rng=rng) for v, n, t, s in specs])


# every objective on every architecture it runs on
SUPPORTED = [(name, a) for name, cls in OBJECTIVES.items() for a in ARCHITECTURES if a in cls.architectures]
OBJECTIVE_VARIANTS = [(n, a, {}) for n, a in SUPPORTED] + [("joint", "two_stream", {"loss": "milnce"}),
                                                           ("mfm_nce", "two_stream", {"enhanced_v": 0.5}),
                                                           ("caption", "two_stream", {"enhanced_v": 0.5})]


@pytest.mark.parametrize("name,architecture,options", OBJECTIVE_VARIANTS,
                         ids=["-".join([n, a, *map(str, o.values())]) for n, a, o in OBJECTIVE_VARIANTS])
def test_loss_and_gradients_are_finite_on_a_padded_batch(_models, vocab, collate, name, architecture, options):
    model = copy.deepcopy(_models[architecture])
    batch = padded_batch(collate)
    assert not batch["video_mask"].all() and not batch["text_mask"].all()
    for seed in range(3):
        model.zero_grad()
        obj = build_objective(name, model, vocab, options)
        out = obj(model, batch, gen(seed))
        loss = total_loss(out)
        assert loss.dim() == 0 and torch.isfinite(loss), (name, seed, out)
        loss.backward()
        grads = [p.grad for p in [*model.parameters(), *obj.parameters()] if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        for k, v in out.items():
            if not k.endswith("_loss"):  # logged values: detached 0-dim tensors or plain numbers
                assert not (torch.is_tensor(v) and v.requires_grad), k
                assert np.isfinite(float(v)), (k, v)


def test_degenerate_batches_give_a_zero_loss_not_nan(hier_model, vocab, collate):
    model = hier_model
    # Nothing to reorder (single-clip videos) or to match (no subtitle on any clip): the step
    # must go on with a zero, differentiable loss rather than stop on a NaN.
    rng = np.random.default_rng(0)
    single = collate([example(f"v{i}", rng.normal(size=(1, FEATURE_DIM)), ["one clip"], [[0, 0]], rng=rng)
                      for i in range(3)])
    off_clip = collate([example(f"v{i}", rng.normal(size=(3, FEATURE_DIM)), ["not on a clip"], [[-1, -1]], rng=rng)
                        for i in range(3)])
    for name, batch in (("fom", single), ("vsm", off_clip)):
        loss = total_loss(build_objective(name, model, vocab, {})(model, batch, gen(0)))
        assert loss.item() == 0.0, name
        loss.backward()


def test_mvm_on_a_visual_words_model(vocab, collate, monkeypatch):
    # VideoBERT input: the model reads visual words, and masked clips must read [MASK].
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, video_input="tokens")
    model = build_model(cfg)
    batch = handmade_batch(collate)
    embedded = record_calls(monkeypatch, model.video_embed, "forward")
    out = build_objective("mvm", model, vocab, {})(model, batch, gen(0))
    assert torch.isfinite(out["mvm_loss"])
    seen = embedded[0]["x"]
    changed = seen != batch["video_tokens"]
    assert changed.any() and (seen[changed] == VISUAL_MASK_ID).all()


def test_objectives_refuse_architectures_they_cannot_run_on(_models, vocab):
    # fom and vsm need HERO's global level, caption UniVL's decoder, align a pair score
    for name, arch in (("fom", "two_stream"), ("vsm", "single_stream"), ("caption", "hierarchical"),
                       ("align", "hierarchical")):
        with pytest.raises(ConfigError, match=f"{name}.*cannot run on model.architecture '{arch}'"):
            build_objective(name, _models[arch], vocab, {})
    from videolm.pretrain.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match="fom.*two_stream"):  # refused when the recipe is read, not mid-run
        recipe_from_dict({"model": {"architecture": "two_stream"}, "objectives": {"joint": {}, "fom": {}}})
    with pytest.raises(ConfigError, match="enhanced_v"):
        build_objective("mfm_nce", _models["two_stream"], vocab, {"enhanced_v": 1.5})


def test_enhanced_v_hides_whole_texts_of_some_examples(model, vocab, collate, monkeypatch):
    # UniVL's EnhancedV: an example's text is masked entirely or not at all; specials and padding stay
    batch = handmade_batch(collate)
    ids, tm = batch["text_ids"], batch["text_mask"]
    fwd = record_calls(monkeypatch, model, "forward")
    obj = build_objective("mfm_nce", model, vocab, {"enhanced_v": 0.5})
    whole = set()
    for seed in range(12):
        fwd.clear()
        obj(model, batch, gen(seed))
        seen = fwd[0]["inputs"]["text_ids"]
        words = tm & (ids != vocab.cls) & (ids != vocab.sep)
        for b in range(len(ids)):
            hidden = seen[b] != ids[b]
            assert not hidden.any() or (hidden == words[b]).all(), "a text must be hidden whole or not at all"
            assert (seen[b][hidden] == vocab.mask).all() and torch.equal(seen[b][~words[b]], ids[b][~words[b]])
            whole.add(bool(hidden.any()))
    assert whole == {True, False}
    fwd.clear()
    build_objective("mfm_nce", model, vocab, {})(model, batch, gen(0))
    assert torch.equal(fwd[0]["inputs"]["text_ids"], ids)  # off by default


def test_build_objective_rejects_bad_names_and_options(model, vocab):
    with pytest.raises(ConfigError, match="unknown objective"):
        build_objective("nope", model, vocab, {})
    with pytest.raises(ConfigError, match="bad option"):
        build_objective("mlm", model, vocab, {"mask_rate": 0.2})
    with pytest.raises(ConfigError):
        build_objective("joint", model, vocab, {"loss": "triplet"})
    with pytest.raises(ConfigError):
        build_objective("align", model, vocab, {"negatives": 0})


# ---------------------------------------------------------------------------------------------- overfitting


def overfit_batch(collate):
    """Four videos (3-6 clips) with captions drawn from disjoint word sets, so pairs are learnable."""
    rng = np.random.default_rng(0)
    words = [["red", "blue", "green"], ["left", "right", "up"], ["down", "one", "two"], ["three", "four", "five"]]
    examples = []
    for i in range(4):
        n = 3 + i
        texts = [" ".join(rng.choice(words[i], 2 + i % 3)), " ".join(rng.choice(words[i], 2))]
        examples.append(example(f"v{i}", rng.normal(size=(n, FEATURE_DIM)), texts, [[0, 0], [1, n - 1]], rng=rng))
    return collate(examples)


# Steps at lr 3e-3 (tuned on this batch, about twice what each needs to halve its loss):
# the regression/NCE/visual-word and cross-encoder matching objectives learn slowest.
OVERFIT_STEPS = {"mlm": 60, "mvm": 120, "mfm_nce": 120, "mfm_reg": 150, "fom": 50, "vsm": 50,
                 "joint": 30, "align": 120, "caption": 60}
# UniVL's post-LN cross encoder with its tanh pooler overshoots at 3e-3 on the matching loss (1.39 -> 2.66
# in 120 steps) and halves it at 1e-3, a rate BERT-style stacks are usually trained at or below
OVERFIT_LR = {("align", "two_stream"): 1e-3}
SEEDS = range(4)  # masks cycle over these, so the model sees each masked view many times


def _mean_loss(obj, model, batch):
    with torch.no_grad():
        return float(np.mean([total_loss(obj(model, batch, gen(s))).item() for s in SEEDS]))


def test_every_objective_has_an_overfit_budget():
    assert set(OVERFIT_STEPS) == set(OBJECTIVES)
    assert {a for _, a in SUPPORTED} == set(ARCHITECTURES)  # and every architecture trains something


@pytest.mark.parametrize("name,architecture", SUPPORTED, ids=[f"{n}-{a}" for n, a in SUPPORTED])
def test_tiny_model_overfits_each_objective_alone(_models, vocab, collate, name, architecture):
    model = copy.deepcopy(_models[architecture])
    batch = overfit_batch(collate)
    obj = build_objective(name, model, vocab, {})
    # Same settings as the trainer apart from the schedule: AdamW and gradient clipping at 1.
    # Without clipping, align (a cross-encoder ITM loss) sometimes collapses back to ln(4).
    params = [*model.parameters(), *obj.parameters()]  # the objective's own head trains too
    opt = torch.optim.AdamW(params, lr=OVERFIT_LR.get((name, architecture), 3e-3))
    start = _mean_loss(obj, model, batch)  # same masks before and after: a like-for-like comparison
    for step in range(OVERFIT_STEPS[name]):
        loss = total_loss(obj(model, batch, gen(SEEDS[step % len(SEEDS)])))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    end = _mean_loss(obj, model, batch)
    assert end < 0.5 * start, f"{name}: loss {start:.3f} -> {end:.3f} after {OVERFIT_STEPS[name]} steps"


# ---------------------------------------------------------------------------------------------- shared passes


def _runner(model, vocab, names, options=None):
    from videolm.pretrain.run import ObjectiveRunner

    objs = {n: build_objective(n, model, vocab, (options or {}).get(n, {})) for n in names}
    return ObjectiveRunner(model, torch.nn.ModuleDict(objs)).eval()


UNIVL_STAGE2 = ["joint", "mlm", "mfm_nce", "align", "caption"]


def test_univl_stage2_runs_each_encoder_twice_per_micro_batch(model, vocab, collate, monkeypatch):
    # UniVL's own count: a clean pass (joint, and align's pairs) and one masked pass (mlm, mfm, caption)
    batch = handmade_batch(collate)
    runner = _runner(model, vocab, UNIVL_STAGE2)
    text = record_calls(monkeypatch, model, "encode_text")
    video = record_calls(monkeypatch, model, "encode_video")
    cross = record_calls(monkeypatch, model, "cross")
    out = runner(batch, UNIVL_STAGE2, gen(0))
    assert set(out) == set(UNIVL_STAGE2) and all(torch.isfinite(v[f"{k}_loss"]) for k, v in out.items())
    assert len(text) == 2 and len(video) == 2  # was 5 and 5: one pass per objective
    assert len(cross) == 2  # the masked pass, and align's pairs of the clean states
    masked = [c for c in text if not torch.equal(c["ids"], batch["text_ids"])]
    assert len(masked) == 1  # the masked pass corrupts the text once, for every reader


def test_sharing_the_clean_pass_gives_the_same_losses(model, vocab, collate):
    batch = handmade_batch(collate)
    shared = _runner(model, vocab, ["joint", "align"])(batch, ["joint", "align"], gen(4))
    for name in ("joint", "align"):  # each alone, from the same generator state
        alone = _runner(model, vocab, [name])(batch, [name], gen(4))[name]
        assert alone[f"{name}_loss"].item() == pytest.approx(shared[name][f"{name}_loss"].item(), abs=1e-6)


def test_the_shared_masked_pass_draws_text_then_clips(model, vocab, collate, monkeypatch):
    # mlm and mfm_nce together read one pass: mlm's corruption (drawn first, exactly as mlm alone draws
    # it) and mfm's hidden clips (drawn next) are both in it, as in UniVL
    from videolm.pretrain import passes as passes_module

    batch = handmade_batch(collate)
    runner = _runner(model, vocab, ["mlm", "mfm_nce"], {"mlm": {"mask_prob": 0.4}, "mfm_nce": {"mask_prob": 0.5}})
    seen = record_outputs(monkeypatch, passes_module.SharedPasses, "_run_masked")
    out = runner(batch, ["mlm", "mfm_nce"], gen(3))
    (p,) = seen
    g = gen(3)
    ids, labels = runner.objectives["mlm"].corrupt(batch["text_ids"], batch["text_mask"], g)
    chosen = sample_mask(batch["video_mask"], 0.5, g)
    assert torch.equal(p.inputs["text_ids"], ids) and torch.equal(p.labels, labels)
    assert torch.equal(p.chosen, chosen) and (p.inputs["video"][chosen] == 0).all()
    # each loss is read from that one pass
    with torch.no_grad():
        again = model(p.inputs)
        mlm = runner.objectives["mlm"]
        at = labels != IGNORE
        manual = F.cross_entropy(mlm.logits(model, again.cross_text[at]).float(), labels[at])
    assert out["mlm"]["mlm_loss"].item() == pytest.approx(manual.item(), rel=1e-5)
    # alone, mlm draws the same corruption and no clip is hidden
    seen.clear()
    runner(batch, ["mlm"], gen(3))
    assert torch.equal(seen[0].inputs["text_ids"], ids) and seen[0].chosen is None
    assert torch.equal(seen[0].inputs["video"], batch["video"])
