"""Frozen clip encoders: uint8 clips (B, T, H, W, 3) -> float32 features (B, dim).

Every encoder is a small object with ``name``, ``dim``, ``default_sampling`` and
``encode(clips)``; ``ENCODERS`` maps a name to a builder
``build(weights, device) -> encoder``. Builders for networks that need weights
(``s3d``, ``clip``, ``videomae``) import their heavy modules only when called and
fail with ``EncoderError`` if no local weights path was given: nothing downloads.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .config import SamplingSpec
from ..errors import VideolmError


class EncoderError(VideolmError, RuntimeError):
    pass


class Encoder(Protocol):
    name: str
    dim: int
    default_sampling: SamplingSpec

    def encode(self, clips: np.ndarray) -> np.ndarray: ...


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def check_clips(clips: np.ndarray) -> None:
    if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise EncoderError(f"expected uint8 clips of shape (B, T, H, W, 3), got {clips.dtype} {clips.shape}")


# --------------------------------------------------------------------------- pixels
# Weight-free default. Layout of the 330-d vector (documented in docs/formats.md):
#   [0:256)   grey 16x16 thumbnail of the clip's middle frame, in [0, 1]
#   [256:304) colour thumbnail averaged over the clip, channel-major (3, 4, 4), in [0, 1]
#   [304:320) mean |frame difference| per cell of a 4x4 grid (motion energy)
#   [320:328) global optical flow (u, v) per cell of a 2x2 grid, from a least-squares
#             Lucas-Kanade fit on 32x32 grey frames, in pixels/frame of that grid
#   [328:330) global optical flow (u, v) over the whole frame
# Thumbnails say what is on screen (digit shape, colour); difference and flow say
# where it moves, which a mean-pooled appearance feature cannot.
PIXELS_DIM = 330
_FLOW_RES = 32


def _area_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) by area averaging (aspect is not kept)."""
    return F.adaptive_avg_pool2d(x, (size, size))


def _lucas_kanade(prev: torch.Tensor, nxt: torch.Tensor, cells: int) -> torch.Tensor:
    """Least-squares global flow per grid cell. prev/nxt: (N, H, W) -> (N, cells, cells, 2)."""
    ix = (torch.roll(prev, -1, 2) - torch.roll(prev, 1, 2)) / 2
    iy = (torch.roll(prev, -1, 1) - torch.roll(prev, 1, 1)) / 2
    it = nxt - prev
    # Drop the wrapped border produced by roll.
    ix, iy, it = (t[:, 1:-1, 1:-1] for t in (ix, iy, it))

    def cellsum(t):
        return F.adaptive_avg_pool2d(t.unsqueeze(1), (cells, cells)).squeeze(1)

    sxx, syy, sxy = cellsum(ix * ix), cellsum(iy * iy), cellsum(ix * iy)
    sxt, syt = cellsum(ix * it), cellsum(iy * it)
    det = sxx * syy - sxy * sxy
    eps = 1e-6  # textureless cells (flat background) have det ~ 0: their flow is 0
    u = (-syy * sxt + sxy * syt) / (det + eps)
    v = (sxy * sxt - sxx * syt) / (det + eps)
    flow = torch.stack([u, v], dim=-1)
    return flow.clamp(-4.0, 4.0)


class PixelsEncoder:
    name = "pixels"
    dim = PIXELS_DIM
    default_sampling = SamplingSpec(fps=4.0, frames_per_clip=4, clip_stride=1.0, short_side=64, crop=None)

    def __init__(self, device: str = "cpu"):
        self.device = resolve_device(device)

    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> np.ndarray:
        check_clips(clips)
        b, t, h, w, _ = clips.shape
        x = torch.from_numpy(np.ascontiguousarray(clips)).to(self.device)
        x = x.permute(0, 1, 4, 2, 3).float().div_(255.0).reshape(b * t, 3, h, w)
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

        mid = grey.reshape(b, t, 1, h, w)[:, t // 2]
        thumb = _area_resize(mid, 16).reshape(b, 256)
        colour = _area_resize(x, 4).reshape(b, t, 48).mean(1)

        small = _area_resize(grey, _FLOW_RES).reshape(b, t, _FLOW_RES, _FLOW_RES)
        if t > 1:
            prev, nxt = small[:, :-1].reshape(-1, _FLOW_RES, _FLOW_RES), small[:, 1:].reshape(-1, _FLOW_RES, _FLOW_RES)
            diff = _area_resize((nxt - prev).abs().unsqueeze(1), 4).reshape(b, t - 1, 16).mean(1)
            flow4 = _lucas_kanade(prev, nxt, 2).reshape(b, t - 1, 8).mean(1)
            flow1 = _lucas_kanade(prev, nxt, 1).reshape(b, t - 1, 2).mean(1)
        else:  # a single frame has no motion
            diff = torch.zeros(b, 16, device=x.device)
            flow4 = torch.zeros(b, 8, device=x.device)
            flow1 = torch.zeros(b, 2, device=x.device)
        out = torch.cat([thumb, colour, diff * 4.0, flow4, flow1], dim=1)
        return out.float().cpu().numpy()


def build_pixels(weights: str | None, device: str) -> PixelsEncoder:
    if weights:
        raise EncoderError("the 'pixels' encoder is weight-free; do not pass --weights")
    return PixelsEncoder(device)


def build_s3d(weights: str | None, device: str):
    from .s3d import build_s3d_encoder

    return build_s3d_encoder(weights, device)


def build_clip(weights: str | None, device: str):
    from .hf_encoders import build_clip_encoder

    return build_clip_encoder(weights, device)


def build_videomae(weights: str | None, device: str):
    from .hf_encoders import build_videomae_encoder

    return build_videomae_encoder(weights, device)


ENCODERS: dict[str, Callable[[str | None, str], Encoder]] = {
    "pixels": build_pixels,
    "s3d": build_s3d,
    "clip": build_clip,
    "videomae": build_videomae,
}


def build_encoder(name: str, weights: str | None = None, device: str = "cpu") -> Encoder:
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](weights, device)
