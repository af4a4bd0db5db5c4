"""Encoders that need weights (s3d, clip, videomae), exercised with random weights.

No real checkpoints are downloaded: S3D is built with random parameters and
saved in the layout of the public ``s3d_howto100m.pth``; CLIP and VideoMAE use
tiny random configs written with ``save_pretrained``. What is checked is the
plumbing (key names, loading, shapes, errors), not feature quality.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from videolm.extract.encoders import EncoderError, build_encoder
from videolm.extract.s3d import S3DEncoder, S3DG

# Keys and shapes as they appear in s3d_howto100m.pth (antoine77340/S3D_HowTo100M,
# s3dg.py). A wrong name or width here means the real checkpoint would not load.
S3D_CHECKPOINT_SHAPES = {
    "conv1.conv1.weight": (64, 24, 2, 4, 4),  # space-to-depth stem: 8 * 3 input channels
    "conv1.bn1.running_var": (64,),
    "conv_2b.conv1.weight": (64, 64, 1, 1, 1),
    "conv_2c.conv1.weight": (192, 64, 1, 3, 3),  # separable: spatial half
    "conv_2c.conv2.weight": (192, 192, 3, 1, 1),  # separable: temporal half
    "conv_2c.bn2.weight": (192,),
    "gating.fc.weight": (192, 192),
    "gating.fc.bias": (192,),
    "mixed_3b.conv_b0.conv1.weight": (64, 192, 1, 1, 1),
    "mixed_3b.gating_b3.fc.weight": (32, 32),
    "mixed_3c.conv_b1_b.conv1.weight": (192, 128, 1, 3, 3),
    "mixed_4f.conv_b2_b.conv1.weight": (128, 32, 1, 3, 3),
    "mixed_5b.conv_b0.conv1.weight": (256, 832, 1, 1, 1),
    "mixed_5c.conv_b0.conv1.weight": (384, 832, 1, 1, 1),
    "mixed_5c.conv_b1_b.conv2.weight": (384, 384, 3, 1, 1),
    "mixed_5c.conv_b3_b.conv1.weight": (128, 832, 1, 1, 1),
    "mixed_5c.gating_b0.fc.weight": (384, 384),
    "fc.weight": (512, 1024),
    "fc.bias": (512,),
}
# The text tower's keys; present in the real file, ignored by the video encoder.
S3D_TEXT_KEYS = {
    "text_module.word_embd.weight": (66250, 300),
    "text_module.fc1.weight": (2048, 300),
    "text_module.fc1.bias": (2048,),
    "text_module.fc2.weight": (512, 2048),
    "text_module.fc2.bias": (512,),
}


def _clips(b, t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def s3d_net():
    torch.manual_seed(0)
    net = S3DG().eval()
    # Non-trivial BN statistics, so a load that skipped buffers would change outputs.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def s3d_checkpoint(s3d_net, tmp_path_factory):
    """The random network saved like the public file, text-module keys included (small stand-ins)."""
    state = dict(s3d_net.state_dict())
    for k, shape in S3D_TEXT_KEYS.items():
        state[k] = torch.zeros(8, *shape[1:]) if k.endswith("word_embd.weight") else torch.zeros(shape)
    path = tmp_path_factory.mktemp("s3d") / "s3d_howto100m.pth"
    torch.save(state, path)
    return path


def test_s3d_state_dict_matches_checkpoint_layout(s3d_net):
    state = s3d_net.state_dict()
    for key, shape in S3D_CHECKPOINT_SHAPES.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    tops = {k.split(".")[0] for k in state}
    assert tops == {
        "conv1", "conv_2b", "conv_2c", "gating", "mixed_3b", "mixed_3c", "mixed_4b", "mixed_4c",
        "mixed_4d", "mixed_4e", "mixed_4f", "mixed_5b", "mixed_5c", "fc",
    }
    # 1x1 convs and the stem are not separable, so they have no second conv.
    assert "conv_2b.conv2.weight" not in state and "conv1.conv2.weight" not in state
    assert all("text_module" not in k for k in state)
    # 532 video entries: the real file has these plus 5 text_module keys.
    assert len(state) == 532


def test_s3d_load_matches_and_shapes(s3d_net, s3d_checkpoint):
    clips = _clips(2, 8, 64, 64)
    enc = build_encoder("s3d", weights=str(s3d_checkpoint))
    assert enc.name == "s3d" and enc.dim == 1024
    assert enc.default_sampling.fps == 16 and enc.default_sampling.frames_per_clip == 16
    got = enc.encode(clips)
    assert got.shape == (2, 1024) and got.dtype == np.float32
    ref = S3DEncoder(s3d_net, output="mixed_5c").encode(clips)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got, enc.encode(clips))  # deterministic (eval mode)

    emb = S3DEncoder(enc.net, output="embedding")
    assert emb.dim == 512
    e = emb.encode(clips)
    assert e.shape == (2, 512) and e.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_allclose(e, enc.net.fc(torch.from_numpy(got)).numpy(), rtol=1e-4, atol=1e-5)


def test_s3d_wrapped_checkpoint_and_odd_sizes(s3d_net, tmp_path):
    # DataParallel-style checkpoint: {'state_dict': {'module.<key>': ...}}.
    wrapped = {"state_dict": {"module." + k: v for k, v in s3d_net.state_dict().items()}}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    enc = build_encoder("s3d", weights=str(path))
    # Short (T < 8) and odd-sized clips are padded rather than rejected.
    out = enc.encode(_clips(1, 5, 33, 47, seed=1))
    assert out.shape == (1, 1024) and np.isfinite(out).all()


def test_s3d_errors(s3d_net, tmp_path):
    with pytest.raises(EncoderError, match="--weights /path/to/s3d_howto100m.pth"):
        build_encoder("s3d")
    with pytest.raises(EncoderError, match="not found"):
        build_encoder("s3d", weights=str(tmp_path / "nope.pth"))

    partial = {k: v for k, v in s3d_net.state_dict().items() if not k.startswith("mixed_5c")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(EncoderError, match=r"missing.*mixed_5c") as exc:
        build_encoder("s3d", weights=str(tmp_path / "partial.pth"))
    assert "partial.pth" in str(exc.value)

    bad = dict(s3d_net.state_dict())
    bad["fc.weight"] = torch.zeros(400, 1024)  # e.g. a Kinetics classifier head
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match=r"shape.*fc\.weight") as exc:
        build_encoder("s3d", weights=str(tmp_path / "bad.pth"))
    assert "bad.pth" in str(exc.value)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="could not read"):
        build_encoder("s3d", weights=str(tmp_path / "junk.pth"))


# --------------------------------------------------------------------------- HF
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=24,
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory):
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    cfg = VideoMAEConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=16, tubelet_size=2, num_frames=4,
    )
    path = tmp_path_factory.mktemp("videomae")
    VideoMAEModel(cfg).save_pretrained(path)
    return path


def test_clip_encoder(clip_dir):
    enc = build_encoder("clip", weights=str(clip_dir))
    assert enc.name == "clip" and enc.dim == 24
    assert enc.default_sampling.crop == 32
    clips = _clips(3, 2, 40, 48)  # not the model's size: resized and centre-cropped
    out = enc.encode(clips)
    assert out.shape == (3, 24) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, enc.encode(clips))
    # Frame-level: a clip's feature is the mean of its frames' features.
    per_frame = enc.encode(clips.reshape(6, 1, 40, 48, 3)).reshape(3, 2, 24).mean(1)
    np.testing.assert_allclose(out, per_frame, rtol=1e-4, atol=1e-5)


def test_clip_reads_preprocessor_stats(clip_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "clip_stats"
    shutil.copytree(clip_dir, d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    enc = build_encoder("clip", weights=str(d))
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)


def test_videomae_encoder(videomae_dir):
    enc = build_encoder("videomae", weights=str(videomae_dir))
    assert enc.name == "videomae" and enc.dim == 32
    assert enc.default_sampling.frames_per_clip == 4
    clips = _clips(2, 4, 32, 32)
    out = enc.encode(clips)
    assert out.shape == (2, 32) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, enc.encode(clips))
    # Other frame counts are resampled to the model's num_frames.
    assert enc.encode(_clips(2, 7, 36, 40)).shape == (2, 32)
    assert enc.encode(_clips(1, 1, 32, 32)).shape == (1, 32)


@pytest.mark.parametrize("name", ["clip", "videomae"])
def test_hf_errors(name, tmp_path):
    with pytest.raises(EncoderError, match="local Hugging Face model directory"):
        build_encoder(name)
    with pytest.raises(EncoderError, match="not a directory"):
        build_encoder(name, weights=str(tmp_path / "missing"))
    with pytest.raises(EncoderError, match="config.json"):
        build_encoder(name, weights=str(tmp_path))
