"""S3D-G video network with the parameter layout of the HowTo100M MIL-NCE checkpoint.

The checkpoint is ``s3d_howto100m.pth`` from antoine77340/S3D_HowTo100M (Miech et
al., "End-to-End Learning of Visual Representations from Uncurated Instructional
Videos", CVPR 2020). It is the network UniVL's S3D features come from. This is an
independent implementation of the same architecture: the *attribute names* below
are fixed by the checkpoint's state-dict keys, so renaming any of them breaks
loading. Layout (all BatchNorm3d entries also carry running_mean / running_var /
num_batches_tracked):

    conv1.conv1.weight             (64, 24, 2, 4, 4)   space-to-depth stem, no bias
    conv1.bn1.*                    (64,)
    conv_2b.conv1.weight           (64, 64, 1, 1, 1)
    conv_2c.conv1.weight           (192, 64, 1, 3, 3)  separable: spatial ...
    conv_2c.conv2.weight           (192, 192, 3, 1, 1) ... then temporal
    conv_2c.bn1.*, conv_2c.bn2.*   (192,)
    gating.fc.weight / .bias       (192, 192) / (192,)
    mixed_{3b,3c,4b..4f,5b,5c}.    conv_b0, conv_b1_a, conv_b1_b (separable),
                                   conv_b2_a, conv_b2_b (separable), conv_b3_b,
                                   gating_b0..gating_b3 (.fc)
    fc.weight / fc.bias            (512, 1024) / (512,)  joint text-video space
    text_module.*                  word embedding + MLP; ignored here

The text module is not built: we only encode video, and its vocabulary file
(s3d_dict.npy) would be one more thing to ship.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SamplingSpec
from .encoders import EncoderError, check_clips, resolve_device

MIXED_5C_DIM = 1024
EMBEDDING_DIM = 512
MIN_FRAMES = 8  # after the stem (/2) and two temporal pools (/2, /2) one step must remain


class STConv3d(nn.Module):
    """Conv3d (no bias) + BN + ReLU; with ``separable`` a (1,k,k) spatial conv then a (k,1,1) temporal one.

    Factorising the 3x3x3 kernels is what makes S3D "separable"; the checkpoint
    stores the two halves as conv1/bn1 and conv2/bn2.
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, separable: bool = False):
        super().__init__()
        kt, kh, kw = kernel
        self.separable = separable and kt > 1
        if self.separable:
            self.conv1 = nn.Conv3d(cin, cout, (1, kh, kw), stride=(1, stride, stride), padding=(0, padding, padding), bias=False)
            self.bn1 = nn.BatchNorm3d(cout)
            self.conv2 = nn.Conv3d(cout, cout, (kt, 1, 1), stride=(stride, 1, 1), padding=(padding, 0, 0), bias=False)
            self.bn2 = nn.BatchNorm3d(cout)
        else:
            self.conv1 = nn.Conv3d(cin, cout, tuple(kernel), stride=stride, padding=padding, bias=False)
            self.bn1 = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.separable:
            x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return x


class SelfGating(nn.Module):
    """The "G" of S3D-G: scale each channel by a sigmoid of its own global average."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))
        return x * w[:, :, None, None, None]


class InceptionBlock(nn.Module):
    """Four gated branches: 1x1, 1x1->3x3 (sep), 1x1->3x3 (sep), maxpool->1x1; concatenated."""

    def __init__(self, cin: int, b0: int, b1a: int, b1b: int, b2a: int, b2b: int, b3: int):
        super().__init__()
        self.conv_b0 = STConv3d(cin, b0, (1, 1, 1))
        self.conv_b1_a = STConv3d(cin, b1a, (1, 1, 1))
        self.conv_b1_b = STConv3d(b1a, b1b, (3, 3, 3), padding=1, separable=True)
        self.conv_b2_a = STConv3d(cin, b2a, (1, 1, 1))
        self.conv_b2_b = STConv3d(b2a, b2b, (3, 3, 3), padding=1, separable=True)
        self.conv_b3_b = STConv3d(cin, b3, (1, 1, 1))
        self.gating_b0 = SelfGating(b0)
        self.gating_b1 = SelfGating(b1b)
        self.gating_b2 = SelfGating(b2b)
        self.gating_b3 = SelfGating(b3)
        self.output_dim = b0 + b1b + b2b + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.gating_b0(self.conv_b0(x))
        b1 = self.gating_b1(self.conv_b1_b(self.conv_b1_a(x)))
        b2 = self.gating_b2(self.conv_b2_b(self.conv_b2_a(x)))
        # Stride-1 pool padded with -inf (PyTorch's MaxPool padding), as in the checkpoint's code.
        b3 = self.gating_b3(self.conv_b3_b(F.max_pool3d(x, 3, stride=1, padding=1)))
        return torch.cat([b0, b1, b2, b3], dim=1)


def _tf_same_maxpool(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """Max pool emulating the TF graph the weights were trained in.

    The port pads each axis by max(k - s, 0) split low/high (extra on the high
    side) with zeros, then pools with ceil_mode. The padding is static (it does
    not depend on input size), which differs from true TF "SAME" for some sizes;
    we reproduce the port, because that is what the released features used.
    Zero padding is harmless here: every input follows a ReLU.
    """
    pads = []
    for k, s in zip(reversed(kernel), reversed(stride)):  # F.pad wants (W, H, T) order
        total = max(k - s, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool3d(F.pad(x, pads), kernel, stride, ceil_mode=True)


class S3DG(nn.Module):
    """S3D-G video tower. Input (B, 3, T, H, W) in [0, 1]; T, H, W even."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        # Space-to-depth stem: 2x2x2 blocks of RGB become 24 channels, so a
        # (2, 4, 4) conv at stride 1 stands in for the TF (3, 7, 7)/2 one.
        self.conv1 = STConv3d(24, 64, (2, 4, 4), stride=1, padding=(1, 2, 2))
        self.conv_2b = STConv3d(64, 64, (1, 1, 1))
        self.conv_2c = STConv3d(64, 192, (3, 3, 3), padding=1, separable=True)
        self.gating = SelfGating(192)
        self.mixed_3b = InceptionBlock(192, 64, 96, 128, 16, 32, 32)
        self.mixed_3c = InceptionBlock(self.mixed_3b.output_dim, 128, 128, 192, 32, 96, 64)
        self.mixed_4b = InceptionBlock(self.mixed_3c.output_dim, 192, 96, 208, 16, 48, 64)
        self.mixed_4c = InceptionBlock(self.mixed_4b.output_dim, 160, 112, 224, 24, 64, 64)
        self.mixed_4d = InceptionBlock(self.mixed_4c.output_dim, 128, 128, 256, 24, 64, 64)
        self.mixed_4e = InceptionBlock(self.mixed_4d.output_dim, 112, 144, 288, 32, 64, 64)
        self.mixed_4f = InceptionBlock(self.mixed_4e.output_dim, 256, 160, 320, 32, 128, 128)
        self.mixed_5b = InceptionBlock(self.mixed_4f.output_dim, 256, 160, 320, 32, 128, 128)
        self.mixed_5c = InceptionBlock(self.mixed_5b.output_dim, 384, 192, 384, 48, 128, 128)
        assert self.mixed_5c.output_dim == MIXED_5C_DIM
        self.fc = nn.Linear(MIXED_5C_DIM, embedding_dim)

    @staticmethod
    def space_to_depth(x: torch.Tensor) -> torch.Tensor:
        # The channel order (dt, dh, dw, rgb) must match the one the stem's
        # weights were converted with, or conv1 sees scrambled inputs.
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // 2, 2, h // 2, 2, w // 2, 2)
        x = x.permute(0, 3, 5, 7, 1, 2, 4, 6)
        return x.reshape(b, 8 * c, t // 2, h // 2, w // 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, 1024) globally averaged mixed_5c."""
        x = self.conv1(self.space_to_depth(x))
        x = x[:, :, 1:, 1:, 1:]  # the symmetric conv padding plus this crop equals TF "SAME"
        x = _tf_same_maxpool(x, (1, 3, 3), (1, 2, 2))
        x = self.gating(self.conv_2c(self.conv_2b(x)))
        x = _tf_same_maxpool(x, (1, 3, 3), (1, 2, 2))
        x = self.mixed_3c(self.mixed_3b(x))
        x = _tf_same_maxpool(x, (3, 3, 3), (2, 2, 2))
        for block in (self.mixed_4b, self.mixed_4c, self.mixed_4d, self.mixed_4e, self.mixed_4f):
            x = block(x)
        x = _tf_same_maxpool(x, (2, 2, 2), (2, 2, 2))
        x = self.mixed_5c(self.mixed_5b(x))
        return x.mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.forward_features(x)
        return {"mixed_5c": feats, "video_embedding": self.fc(feats)}


# ----------------------------------------------------------------------- loading
def _unwrap_state_dict(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise EncoderError(f"{path}: expected an S3D state dict (mapping of parameter names to tensors), got {type(obj).__name__}")
    # DataParallel / DDP checkpoints prefix every key with "module.".
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_s3d_weights(net: S3DG, path: str) -> None:
    """Load the video part of an S3D checkpoint into ``net``; extra keys (text module) are ignored.

    Every video parameter and BN buffer must be present with the right shape;
    a partial load would silently produce features from random layers.
    """
    if not os.path.isfile(path):
        raise EncoderError(f"S3D weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-torch files
        raise EncoderError(f"could not read S3D weights from {path}: {exc}") from None
    state = _unwrap_state_dict(obj, path)
    expected = net.state_dict()
    # num_batches_tracked only matters for training-time BN momentum; old or
    # converted checkpoints may lack it.
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in state]
    if missing:
        raise EncoderError(
            f"{path}: {len(missing)} S3D video key(s) missing, e.g. {', '.join(missing[:5])}"
            " (is this s3d_howto100m.pth?)"
        )
    bad = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise EncoderError(f"{path}: {len(bad)} S3D weight shape mismatch(es), e.g. {'; '.join(bad[:5])}")
    net.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)


# ----------------------------------------------------------------------- encoder
class S3DEncoder:
    """S3D-G HowTo100M features for (B, T, H, W, 3) uint8 clips.

    ``output="mixed_5c"`` (default) gives the 1024-d globally averaged mixed_5c
    activations, the feature UniVL trains on. ``output="embedding"`` gives the
    512-d ``fc`` projection into the MIL-NCE joint text-video space, for
    zero-shot comparisons with the checkpoint's text tower. Neither is L2
    normalised here.
    """

    name = "s3d"
    # UniVL's features come from ArrowLuo/VideoFeatureExtractor (linked from the
    # UniVL dataloaders README), whose extract.py uses, for type "s3dg",
    # framerate 16, size 224 (short side scaled to 224, then centre crop 224)
    # and cuts the 16 fps stream into non-overlapping 16-frame chunks: one
    # feature per second. Frames are only divided by 255 (no mean/std), which
    # matches the S3D_HowTo100M README's "normalized to [0, 1]".
    default_sampling = SamplingSpec(fps=16.0, frames_per_clip=16, clip_stride=1.0, short_side=224, crop=224)

    def __init__(self, net: S3DG, device: str = "cpu", output: str = "mixed_5c", batch_size: int = 16):
        if output not in ("mixed_5c", "embedding"):
            raise EncoderError(f"S3D output must be 'mixed_5c' or 'embedding', got {output!r}")
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.output = output
        self.dim = MIXED_5C_DIM if output == "mixed_5c" else net.fc.out_features
        self.batch_size = batch_size  # clips per forward; bounds activation memory at 224px

    def _to_input(self, clips: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(clips)).to(self.device)
        x = x.permute(0, 4, 1, 2, 3).float().div_(255.0)  # (B, 3, T, H, W) in [0, 1]
        t = x.shape[2]
        if t < MIN_FRAMES:
            # Too short for the temporal pools: stretch by repeating frames evenly.
            idx = torch.div(torch.arange(MIN_FRAMES) * t, MIN_FRAMES, rounding_mode="floor").to(self.device)
            x = x.index_select(2, idx)
        # Space-to-depth needs even T, H, W: repeat the last frame / row / column.
        pad = [0, x.shape[4] % 2, 0, x.shape[3] % 2, 0, x.shape[2] % 2]
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        return x

    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> np.ndarray:
        check_clips(clips)
        out = []
        for start in range(0, clips.shape[0], self.batch_size):
            x = self._to_input(clips[start : start + self.batch_size])
            feats = self.net.forward_features(x)
            if self.output == "embedding":
                feats = self.net.fc(feats)
            out.append(feats.float().cpu())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)


def build_s3d_encoder(weights: str | None, device: str, output: str = "mixed_5c") -> S3DEncoder:
    if not weights:
        raise EncoderError(
            "the 's3d' encoder needs the HowTo100M S3D checkpoint; pass "
            "--weights /path/to/s3d_howto100m.pth (nothing is downloaded automatically)"
        )
    net = S3DG()
    load_s3d_weights(net, weights)
    return S3DEncoder(net, device=device, output=output)
