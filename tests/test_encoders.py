import numpy as np
import pytest

from videolm.extract.encoders import ENCODERS, PIXELS_DIM, EncoderError, build_encoder


def moving_square(direction, t=4, size=64, colour=(230, 60, 60)):
    clip = np.full((t, size, size, 3), 30, np.uint8)
    dx, dy = {"left": (-3, 0), "right": (3, 0), "up": (0, -3), "down": (0, 3)}[direction]
    for k in range(t):
        x, y = 24 + dx * k, 24 + dy * k
        clip[k, y : y + 14, x : x + 14] = colour
    return clip


def test_plain_dict_of_encoders():
    assert set(ENCODERS) == {"pixels", "s3d", "clip", "videomae"}


def test_pixels_shape_dtype_and_batch_independence():
    enc = build_encoder("pixels")
    clips = np.stack([moving_square(d) for d in ("left", "right", "up", "down")])
    out = enc.encode(clips)
    assert out.shape == (4, PIXELS_DIM) and out.dtype == np.float32 and enc.dim == PIXELS_DIM
    np.testing.assert_array_equal(enc.encode(clips[1:2])[0], out[1])  # no cross-sample mixing


def test_pixels_flow_reads_motion_direction():
    out = build_encoder("pixels").encode(np.stack([moving_square(d) for d in ("left", "right", "up", "down")]))
    u, v = out[:, -2], out[:, -1]
    # LK underestimates 1.5-pixel steps on a 32x32 grid; the sign and axis are what matter
    assert u[0] < -0.2 and u[1] > 0.2 and abs(v[0]) < 0.05 and abs(v[1]) < 0.05
    assert v[2] < -0.2 and v[3] > 0.2 and abs(u[2]) < 0.05 and abs(u[3]) < 0.05


def test_pixels_thumbnail_and_colour():
    red = build_encoder("pixels").encode(moving_square("left", colour=(230, 40, 40))[None])[0]
    blue = build_encoder("pixels").encode(moving_square("left", colour=(40, 40, 230))[None])[0]
    colour_r, colour_b = red[256:304].reshape(3, 16).T, blue[256:304].reshape(3, 16).T  # channel-major
    assert colour_r[:, 0].max() > colour_r[:, 2].max() and colour_b[:, 2].max() > colour_b[:, 0].max()
    assert red[:256].max() > red[:256].min()  # the thumbnail sees the square


def test_single_frame_clip_has_no_motion():
    out = build_encoder("pixels").encode(moving_square("left", t=1)[None])
    assert np.all(out[0, 304:] == 0)


def test_bad_input_and_unknown_names():
    enc = build_encoder("pixels")
    with pytest.raises(EncoderError, match="uint8"):
        enc.encode(np.zeros((1, 2, 8, 8, 3), np.float32))
    with pytest.raises(EncoderError, match="unknown encoder"):
        build_encoder("resnet")
    with pytest.raises(EncoderError, match="weight-free"):
        build_encoder("pixels", weights="/x")


def test_cuda_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(EncoderError, match="CUDA is not available"):
        build_encoder("pixels", device="cuda")
