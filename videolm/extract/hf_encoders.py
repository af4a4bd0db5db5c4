"""CLIP (frame-level) and VideoMAE (clip-level) encoders from local Hugging Face model directories.

Both load with ``local_files_only=True``: the user points ``--weights`` at a
directory made by ``save_pretrained`` / ``huggingface-cli download``, and
nothing is fetched from the Hub. Preprocessing is done here in torch rather than
with the transformers image processors, because clips arrive already decoded,
resized and batched as one uint8 array; re-running PIL per frame would cost more
than the model on CPU.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .config import SamplingSpec
from .encoders import EncoderError, check_clips, resolve_device

# OpenAI CLIP's pixel statistics, used when the model directory has no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# VideoMAE was trained with ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_model_dir(weights: str | None, encoder: str, example: str) -> str:
    if not weights:
        raise EncoderError(
            f"the {encoder!r} encoder needs a local Hugging Face model directory; pass "
            f"--weights /path/to/{example} (a folder with config.json and the weights; nothing is downloaded)"
        )
    if not os.path.isdir(weights):
        raise EncoderError(f"{encoder} weights must be a local model directory, but {weights} is not a directory")
    if not os.path.isfile(os.path.join(weights, "config.json")):
        raise EncoderError(f"{weights} has no config.json; is it a Hugging Face {encoder} model directory?")
    return weights


def _pixel_stats(model_dir: str, default_mean, default_std) -> tuple[tuple, tuple]:
    """image_mean / image_std from the directory's processor config, else the given defaults.

    A fine-tuned checkpoint may ship its own statistics; using the wrong ones
    shifts every input and quietly degrades the features.
    """
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "r", encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as exc:
            raise EncoderError(f"could not read {path}: {exc}") from None
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return default_mean, default_std


def _load(cls, model_dir: str, encoder: str, device: torch.device, **config):
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32, **config)
    except Exception as exc:  # missing weight files, wrong model type, corrupt safetensors ...
        raise EncoderError(f"could not load {encoder} model from {model_dir}: {exc}") from None
    return model.to(device).eval()


def _resize_center_crop(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(N, 3, H, W) float -> (N, 3, size, size): short side to ``size``, then centre crop.

    A no-op when the sampler already produced size x size frames (the default
    sampling below asks for exactly that).
    """
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
            if mode == "bicubic":
                x = x.clamp_(0.0, 1.0)  # bicubic overshoots; keep the [0, 1] range the stats assume
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def uniform_indices(t: int, n: int) -> np.ndarray:
    """``n`` frame indices spread evenly over ``t`` frames (segment centres); repeats when t < n."""
    return np.minimum(((np.arange(n) + 0.5) * t / n).astype(np.int64), t - 1)


# --------------------------------------------------------------------------- CLIP
class CLIPFrameEncoder:
    """CLIP image tower per frame; ``image_embeds`` (projection_dim) averaged over the clip's frames.

    ``image_embeds`` is ``CLIPModel.get_image_features``: the class token after
    ``post_layernorm`` through ``visual_projection``, not normalised (the mean is of
    raw projections; the ``dual`` model and zero-shot retrieval normalise per clip).
    Equal to ``get_image_features`` on ``CLIPImageProcessor``'s pixels for frames
    decoded at the model's size (``tests/test_clip.py``).

    Averaging frame embeddings is the usual zero-temporal-modelling baseline
    (e.g. CLIP4Clip's mean-pooling variant); temporal structure is left to the
    downstream model, which sees one such vector per second.
    """

    name = "clip"

    def __init__(self, model, mean, std, device: torch.device, frame_batch: int = 256):
        self.model = model
        self.device = device
        self.mean, self.std = mean, std
        self.image_size = int(model.config.image_size)
        self.dim = int(model.config.projection_dim)
        self.frame_batch = frame_batch  # frames per forward pass
        # CLIP is an image model, so one frame per second gives one feature per
        # second at the lowest cost (CLIP4Clip also samples 1 fps). Decoding
        # straight to the model's input size makes the resize here a no-op.
        self.default_sampling = SamplingSpec(
            fps=1.0, frames_per_clip=1, clip_stride=1.0, short_side=self.image_size, crop=self.image_size
        )

    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> np.ndarray:
        check_clips(clips)
        b, t, h, w, _ = clips.shape
        frames = clips.reshape(b * t, h, w, 3)
        out = []
        for start in range(0, b * t, self.frame_batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[start : start + self.frame_batch])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = _normalise(_resize_center_crop(x, self.image_size, "bicubic"), self.mean, self.std)
            out.append(self.model(pixel_values=x).image_embeds.float())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = torch.cat(out).reshape(b, t, self.dim).mean(dim=1)
        return emb.cpu().numpy().astype(np.float32, copy=False)


def _clip_vision_config(model_dir: str) -> dict:
    """``config=`` for a whole CLIPModel directory: its projection width sits at the top level of config.json,
    and the vision sub-config may hold only the default (512), which would re-initialise ``visual_projection``."""
    from transformers import CLIPVisionConfig

    try:
        with open(os.path.join(model_dir, "config.json"), "r", encoding="utf-8") as f:
            top = json.load(f)
    except (OSError, ValueError) as exc:
        raise EncoderError(f"could not read {model_dir}/config.json: {exc}") from None
    if top.get("model_type") != "clip" or not top.get("projection_dim"):
        return {}
    cfg = CLIPVisionConfig.from_pretrained(model_dir, local_files_only=True)
    cfg.projection_dim = int(top["projection_dim"])
    return {"config": cfg}


def build_clip_encoder(weights: str | None, device: str) -> CLIPFrameEncoder:
    from transformers import CLIPVisionModelWithProjection

    model_dir = _check_model_dir(weights, "clip", "clip-vit-base-patch32")
    dev = resolve_device(device)
    model = _load(CLIPVisionModelWithProjection, model_dir, "clip", dev, **_clip_vision_config(model_dir))
    mean, std = _pixel_stats(model_dir, CLIP_MEAN, CLIP_STD)
    return CLIPFrameEncoder(model, mean, std, dev)


# ----------------------------------------------------------------------- VideoMAE
class VideoMAEEncoder:
    """VideoMAE encoder over a whole clip; mean of last_hidden_state over all tokens (hidden_size).

    Token mean-pooling is what VideoMAE's own classification head uses (with
    ``use_mean_pooling``); for a fine-tuned checkpoint the head's fc_norm is not
    applied, since only the backbone is loaded.
    """

    name = "videomae"

    def __init__(self, model, mean, std, device: torch.device, clip_batch: int = 8):
        self.model = model
        self.device = device
        self.mean, self.std = mean, std
        cfg = model.config
        # The sinusoidal position table is built for exactly num_frames x
        # image_size, so inputs are resampled / resized to that grid.
        self.num_frames = int(cfg.num_frames)
        self.image_size = int(cfg.image_size)
        self.dim = int(cfg.hidden_size)
        self.clip_batch = clip_batch
        # VideoMAE's Kinetics recipes take 16 frames with sampling_rate 4 from
        # ~30 fps video (MCG-NJU/VideoMAE scripts/kinetics/*/finetune.sh), a
        # window of about 2 s. We keep that span (fps = num_frames / 2) and move
        # the window 1 s at a time, so there is still one feature per second.
        self.default_sampling = SamplingSpec(
            fps=self.num_frames / 2.0,
            frames_per_clip=self.num_frames,
            clip_stride=1.0,
            short_side=self.image_size,
            crop=self.image_size,
        )

    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> np.ndarray:
        check_clips(clips)
        b, t, h, w, _ = clips.shape
        if t != self.num_frames:
            clips = clips[:, uniform_indices(t, self.num_frames)]
        n = self.num_frames
        out = []
        for start in range(0, b, self.clip_batch):
            chunk = clips[start : start + self.clip_batch]
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
            cb = x.shape[0]
            x = x.reshape(cb * n, h, w, 3).permute(0, 3, 1, 2).float().div_(255.0)
            x = _normalise(_resize_center_crop(x, self.image_size, "bilinear"), self.mean, self.std)
            x = x.reshape(cb, n, 3, self.image_size, self.image_size)  # VideoMAE wants (B, T, C, H, W)
            hidden = self.model(pixel_values=x).last_hidden_state
            out.append(hidden.mean(dim=1).float())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(out).cpu().numpy().astype(np.float32, copy=False)


def build_videomae_encoder(weights: str | None, device: str) -> VideoMAEEncoder:
    from transformers import VideoMAEModel

    model_dir = _check_model_dir(weights, "videomae", "videomae-base")
    dev = resolve_device(device)
    model = _load(VideoMAEModel, model_dir, "videomae", dev)
    mean, std = _pixel_stats(model_dir, IMAGENET_MEAN, IMAGENET_STD)
    return VideoMAEEncoder(model, mean, std, dev)
