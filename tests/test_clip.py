"""CLIP on both sides: the text tower (``text_init: clip:DIR``), the clip features, zero-shot retrieval and the
CLIP4Clip recipes, all against ``transformers.CLIPModel`` itself, with a tiny random CLIP saved to a temp dir.

No CLIP can be downloaded here, so the tokenizer is a hand-made BPE: every byte as a symbol (and with ``</w>``),
merges that spell the synthetic captions' words, CLIP's two special tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videolm.cli import main
from videolm.errors import ConfigError
from videolm.extract.config import SamplingSpec
from videolm.extract.decode import decode_clips
from videolm.features.shards import FeatureStore
from videolm.manifests.manifest import load_manifest
from videolm.manifests.synthetic import synthesize
from videolm.model.inputs import CaptionTokens, tokenize
from videolm.model.text import default_text_dir, load_tokenizer, resolve_text_dir
from videolm.model.video_text import ModelConfig, build_model
from videolm.pretrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("a", "the", "red", "blue", "green", "digit", "moves", "up", "down", "left", "right", "and", "then",
         "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero")
CAPTIONS = ["a red digit moves up", "the blue seven moves left and then right!", "two", "zebra 42 ... ok"]
DIM = 16  # CLIP's projection width here (512 for ViT-B/32)
FPS, FRAMES_PER_CLIP = 2.0, 2  # two frames a clip: the stored feature is their mean


def write_bpe(d: Path) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for w in WORDS:  # merge each word left to right; its last symbol carries the end-of-word mark
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.append(pieces[0])
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    write_bpe(d)
    tok = CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    tok.save_pretrained(str(d))
    # text width = projection width, so seqTransf can start from the text layers (CLIP4Clip's init)
    text = dict(vocab_size=len(tok), hidden_size=DIM, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=DIM))
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # not the default, so the test sees it was read from the file
    model.save_pretrained(str(d))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def reference(clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()


def features_of(output) -> torch.Tensor:
    """get_*_features: a tensor in transformers 4, an output whose pooler_output is the projection in 5."""
    return output if torch.is_tensor(output) else output.pooler_output


@pytest.fixture(scope="module")
def data(tmp_path_factory, clip_dir):
    d = tmp_path_factory.mktemp("clipdata")
    synthesize(d / "synth", 6, seed=5, split="test", progress=False)
    manifest = d / "synth" / "manifest.jsonl"
    assert main(["extract", "--manifest", str(manifest), "--out", str(d / "f"), "--encoder", "clip", "--weights",
                 str(clip_dir), "--fps", str(FPS), "--frames-per-clip", str(FRAMES_PER_CLIP), "--workers", "0",
                 "--quiet"]) == 0
    return manifest, d / "f"


def dual(clip_dir, **changes) -> torch.nn.Module:
    cfg = ModelConfig(architecture="dual", text_init=f"clip:{clip_dir}", video_layers=0, embed_dim=0,
                      feature_dim=DIM, max_text_len=32, max_frames=12, heads=2, dropout=0.0)
    return build_model(dataclasses.replace(cfg, **changes)).eval()


def test_text_embeddings_are_clips_own(clip_dir, reference):
    model = dual(clip_dir)
    tok = load_tokenizer(resolve_text_dir(model.cfg.text_init))
    assert type(tok).__name__ == "CLIPTokenizer" and tok.cls_token_id is None
    ids, mask = tokenize(tok, CAPTIONS, 32)
    last = ids[torch.arange(len(ids)), mask.sum(1) - 1]
    assert (ids[:, 0] == tok.bos_token_id).all() and (last == tok.eos_token_id).all()
    # the collator's cached path gives the same tensors as tokenize (CLIP's start / end of text around the ids)
    cache = CaptionTokens(tok, 32)
    packed = cache.pack([[i] for i in cache.ids(CAPTIONS)], 32)
    assert torch.equal(packed[0], ids) and torch.equal(packed[1], mask)
    with torch.no_grad():
        states = model.encode_text(ids, mask)
        ours = states[torch.arange(len(ids)), mask.sum(1) - 1]  # the end-of-text row, before normalising
        enc = tok(CAPTIONS, padding=True, return_tensors="pt")
        ref = features_of(reference.get_text_features(**enc))
        diff = (ours - ref).abs().max().item()
        unit = (model.joint.text(states, mask) - F.normalize(ref, dim=-1)).abs().max().item()
    print(f"text: max |videolm - get_text_features| = {diff:.2e} (normalised: {unit:.2e})")
    assert diff < 1e-5 and unit < 1e-5
    assert model.joint.logit_scale.item() == pytest.approx(3.0)  # CLIP's learned temperature


def test_clip_features_are_get_image_features(clip_dir, reference, data):
    """extract's CLIP encoder is get_image_features, averaged over a clip's frames; the shard keeps it as float16."""
    from transformers import CLIPImageProcessor

    from videolm.extract.encoders import build_encoder

    manifest, features = data
    entry = load_manifest(manifest)[0]
    spec = SamplingSpec(fps=FPS, frames_per_clip=FRAMES_PER_CLIP, clip_stride=1.0, short_side=32, crop=32)
    clips = decode_clips(entry.path, spec).frames  # (n, 2, 32, 32, 3), decoded as extract decodes
    processor = CLIPImageProcessor.from_pretrained(str(clip_dir), local_files_only=True)
    # frames come decoded at the model's size (extract's sampling), so the processor's resize and crop are no-ops
    pixels = processor(images=list(clips.reshape(-1, 32, 32, 3)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = features_of(reference.get_image_features(pixel_values=pixels))
    ref = ref.reshape(len(clips), FRAMES_PER_CLIP, DIM).mean(1).numpy()
    encoded = build_encoder("clip", str(clip_dir)).encode(clips)  # the float32 vectors extract writes
    store = FeatureStore(features)
    try:
        stored = store.get(entry.video_id).features
    finally:
        store.close()
    diff, stored_diff = float(np.abs(encoded - ref).max()), float(np.abs(stored - ref).max())
    print(f"image: max |clip encoder - get_image_features (mean over frames)| = {diff:.2e}; "
          f"shard (float16) = {stored_diff:.2e}")
    assert encoded.shape == ref.shape and diff < 1e-5
    np.testing.assert_array_equal(stored, encoded.astype(np.float16))  # same frames; the shard rounds to float16
    assert stored_diff <= np.abs(ref).max() * 2.0 ** -11 + 1e-5


def brute_force_top(reference, tok, texts, videos):
    """Each text's gallery order, from normalised numpy vectors: text by CLIP, video by mean of unit clips."""
    enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        t = features_of(reference.get_text_features(**enc)).numpy().astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    v = np.stack([(f / np.linalg.norm(f, axis=1, keepdims=True)).mean(0) for f in videos]).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.argsort(-(t @ v.T), axis=1, kind="stable")


def test_zero_shot_eval_is_a_brute_force_ranking(clip_dir, reference, data, tmp_path, capsys):
    manifest, features = data
    out = tmp_path / "zs.json"
    assert main(["eval-retrieval", "--zero-shot", "clip", "--weights", str(clip_dir), "--features", str(features),
                 "--manifest", str(manifest), "--split", "test", "--out", str(out), "--bootstrap", "20",
                 "--quiet"]) == 0
    report = json.loads(out.read_text())
    sha = hashlib.sha256((clip_dir / "model.safetensors").read_bytes()).hexdigest()
    assert report["model"]["kind"] == "zero_shot" and report["model"]["sha256"] == sha
    assert report["model"]["weights"] == str(clip_dir.resolve())
    rows = [json.loads(line) for line in out.with_suffix(".rankings.jsonl").read_text().splitlines()]
    t2v = [r for r in rows if r["direction"] == "t2v"]
    store = FeatureStore(features)
    try:
        gallery = [e.video_id for e in load_manifest(manifest, "test")]
        order = brute_force_top(reference, load_tokenizer(clip_dir), [r["text"] for r in t2v],
                                [store.get(v).features for v in gallery])
    finally:
        store.close()
    for row, ranked in zip(t2v, order):
        assert [c["id"] for c in row["top"]] == [gallery[i] for i in ranked[: len(row["top"])]], row["query"]
        assert row["rank"] == 1 + list(ranked).index(gallery.index(row["target"][0]))
    assert len(t2v) == report["n_queries"]["t2v"] == 6


def test_clear_errors_for_other_directories_and_features(clip_dir, data, tmp_path):
    from videolm.retrieval.evaluate import EvalConfig
    from videolm.retrieval.zero_shot import run_zero_shot

    manifest, features = data
    with pytest.raises(ConfigError, match="model_type 'bert'.*not a CLIP model"):
        dual(default_text_dir())
    with pytest.raises(ConfigError, match="needs model.architecture 'dual'"):
        ModelConfig(text_init=f"clip:{clip_dir}")
    with pytest.raises(ConfigError, match="not a CLIP model"):
        run_zero_shot("clip", default_text_dir(), features, manifest, EvalConfig(split="test"))
    pixels = tmp_path / "pixels"
    assert main(["extract", "--manifest", str(manifest), "--out", str(pixels), "--workers", "0", "--quiet"]) == 0
    with pytest.raises(ConfigError, match="encoder 'pixels'.*--encoder clip"):
        run_zero_shot("clip", clip_dir, pixels, manifest, EvalConfig(split="test"))
    other = tmp_path / "other_clip"
    shutil.copytree(clip_dir, other)
    (other / "model.safetensors").write_bytes((clip_dir / "model.safetensors").read_bytes() + b" ")
    with pytest.raises(ConfigError, match="the same CLIP"):
        run_zero_shot("clip", other, features, manifest, EvalConfig(split="test"))
    assert main(["eval-retrieval", "--zero-shot", "clip", "--features", str(features), "--manifest",
                 str(manifest)]) == 2  # no --weights


@pytest.mark.parametrize("recipe", ["clip4clip_meanp.yaml", "clip4clip_seqtransf.yaml"])
def test_clip4clip_recipes_train_and_evaluate(recipe, clip_dir, data, tmp_path):
    from videolm.pretrain.checkpoint import load_pretrained
    from videolm.pretrain.run import build_run
    from videolm.pretrain.trainer import run_pretrain

    manifest, features = data
    over = [f"model.text_init=clip:{clip_dir}", "model.video_layers=2" if "seq" in recipe else "model.heads=8",
            "batch_size=2", "max_steps=2", "warmup_steps=1", "checkpoint_every=2", "num_workers=0", "device=cpu",
            "threads=1", "log_every=1", "train.split=test"]
    cfg = load_recipe(ROOT / "pipelines" / recipe, over)
    assert cfg.model.architecture == "dual" and cfg.train.text_lr_scale == 1e-3 and cfg.model.max_text_len == 32
    run = tmp_path / "run"
    summary = run_pretrain(cfg, features, manifest, run, progress=False)
    assert summary["steps"] == 2
    model, tok, saved = load_pretrained(run)
    assert type(tok).__name__ == "CLIPTokenizer"  # CLIP's tokenizer travels with the checkpoint
    if "seq" in recipe:  # seqTransf starts from CLIP's first text layers, as CLIP4Clip does
        fresh = dual(clip_dir, video_layers=2)
        for ours, theirs in zip(fresh.frames.layers, fresh.text.text_model.encoder.layers):
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    store = FeatureStore(features)
    try:
        built = build_run(saved, store, load_manifest(manifest, "test"), "cpu")
        lrs = {g["lr"] for g in built.optimizer.param_groups}
        assert min(lrs) == pytest.approx(1e-4 * 1e-3)  # the text tower at lr * coef_lr (warmup of 1 step)
    finally:
        store.close()
    assert main(["eval-retrieval", "--checkpoint", str(run), "--features", str(features), "--manifest",
                 str(manifest), "--split", "test", "--out", str(tmp_path / "r.json"), "--bootstrap", "10",
                 "--quiet"]) == 0


def test_dual_padding_does_not_leak(clip_dir):
    """Garbage in padded tokens and clips changes neither side's vector (meanP and seqTransf)."""
    g = torch.Generator().manual_seed(0)
    tok = load_tokenizer(clip_dir)
    ids, mask = tokenize(tok, CAPTIONS[:3], 32)
    video, vm = torch.randn(3, 5, DIM, generator=g), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4]).bool()
    for layers in (0, 2):
        model = dual(clip_dir, video_layers=layers)
        with torch.no_grad():
            t = model.joint.text(model.encode_text(ids, mask), mask)
            v = model.joint.video(model.encode_video(vm, video), vm)
            wide_ids = torch.cat([ids, torch.randint(0, 500, (3, 4), generator=g)], 1)
            wide_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
            noisy = video.masked_fill(~vm[..., None], 0) + 50 * torch.randn(3, 5, DIM, generator=g) * ~vm[..., None]
            torch.testing.assert_close(model.joint.text(model.encode_text(wide_ids, wide_mask), wide_mask), t)
            torch.testing.assert_close(model.joint.video(model.encode_video(vm, noisy), vm), v)
    with pytest.raises(ValueError, match="cross"):
        model({"text_ids": ids, "text_mask": mask, "video": video, "video_mask": vm})
