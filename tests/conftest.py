import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"


def shared_videos() -> list[Path]:
    return sorted(SHARED_VIDEOS.glob("*.mp4")) if SHARED_VIDEOS.is_dir() else []


requires_shared = pytest.mark.skipif(
    not shared_videos(), reason=f"real test videos not found in {SHARED_VIDEOS} (only present on the team's machines)"
)


def write_test_video(path, n_frames=30, fps=25, size=(96, 64), codec="libx264", with_audio=False, pts=None, options=None):
    """A small video whose frame k shows a bright square at x = 2k; `pts` (in 1/1000 s) makes it VFR."""
    import av

    w, h = size
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if pts is not None:
            s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream("aac", rate=16000) if with_audio else None
        for k in range(n_frames):
            img = np.full((h, w, 3), 40, np.uint8)
            x = (2 * k) % (w - 8)
            img[h // 2 - 4 : h // 2 + 4, x : x + 8] = 230
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[k], Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            _mux_silence(c, a, seconds=n_frames / fps)
    return Path(path)


def _mux_silence(container, stream, seconds):
    import av

    samples = int(16000 * seconds)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    for p in stream.encode(frame):
        container.mux(p)
    for p in stream.encode():
        container.mux(p)


def write_audio_only(path, seconds=1.0):
    import av

    with av.open(str(path), "w") as c:
        _mux_silence(c, c.add_stream("aac", rate=16000), seconds)
    return Path(path)


@pytest.fixture
def tiny_video(tmp_path):
    return write_test_video(tmp_path / "tiny.mp4")
