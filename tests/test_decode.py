import numpy as np
import pytest

from conftest import requires_shared, shared_videos, write_audio_only, write_test_video
from videolm.extract.config import SamplingSpec
from videolm.extract.decode import DecodeError, decode_clips, iter_clips, output_size, plan_clips

BACKENDS = ["av", "decord"]


def test_plan_uses_timestamps_not_nominal_rate():
    # 19.62 fps: frame k starts at k / 19.62 s
    times = np.arange(355) / 19.62
    plan = plan_clips(times, SamplingSpec(fps=4, frames_per_clip=4, clip_stride=1.0))
    assert plan.duration == pytest.approx(355 / 19.62)
    assert len(plan.starts) == 18  # all samples of clip 17 (17.0 .. 17.75 s) lie before 18.09 s
    # each sample shows the frame on screen at that time
    sample_times = plan.starts[:, None] + np.arange(4) / 4
    expected = np.floor(sample_times * 19.62 + 1e-6).astype(int)
    np.testing.assert_array_equal(plan.frame_index, expected)


def test_plan_short_video_gives_one_padded_clip():
    plan = plan_clips(np.arange(5) / 25.0, SamplingSpec(fps=4, frames_per_clip=8, clip_stride=1.0))
    assert len(plan.starts) == 1
    assert plan.frame_index[0].tolist() == [0, 4, 4, 4, 4, 4, 4, 4]
    assert plan.ends[0] == pytest.approx(0.2)


def test_output_size_keeps_aspect():
    assert output_size(320, 240, 64) == (85, 64)
    assert output_size(240, 320, 64) == (64, 85)
    assert output_size(320, 240, None) == (320, 240)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vfr_clip_times_follow_the_stream(tmp_path, backend):
    # frames alternate 30 ms and 70 ms apart: a constant-rate assumption would drift
    gaps = [0.03, 0.07] * 20
    pts = np.round(np.concatenate([[0], np.cumsum(gaps)])[:40] * 1000).astype(int).tolist()
    path = write_test_video(tmp_path / "vfr.mp4", n_frames=40, pts=pts)
    spec = SamplingSpec(fps=10, frames_per_clip=5, clip_stride=0.5, short_side=None)
    clips = decode_clips(path, spec, backend)
    # last frame starts at 1.93 s and lasts the median gap (0.03 s: 20 short gaps, 19 long)
    assert clips.duration == pytest.approx(1.96, abs=1e-3)
    np.testing.assert_allclose(clips.starts, [0.0, 0.5, 1.0, 1.5])
    # frame shown at t: the square sits at x = 2k where k is the frame on screen
    frame_starts = np.array(pts) / 1000
    for c, start in enumerate(clips.starts):
        for j in range(5):
            k = np.searchsorted(frame_starts, start + j / 10 + 1e-6, side="right") - 1
            row = clips.frames[c, j, 32].mean(axis=1)  # middle row, grey
            x = int(np.argmax(row > 150))
            assert abs(x - 2 * k) <= 1, (c, j, x, k)


@requires_shared
@pytest.mark.parametrize("spec", [SamplingSpec(), SamplingSpec(fps=3, frames_per_clip=6, clip_stride=0.5,
                                                               short_side=112, crop=112)])
def test_backends_agree_on_real_videos(spec):
    for path in shared_videos():
        a = decode_clips(path, spec, "av")
        d = decode_clips(path, spec, "decord")
        np.testing.assert_allclose(a.starts, d.starts)
        np.testing.assert_allclose(a.ends, d.ends, atol=1e-5)
        assert a.frames.shape == d.frames.shape
        diff = np.abs(a.frames.astype(int) - d.frames.astype(int))
        assert diff.mean() < 0.5, f"{path.name}: mean pixel difference {diff.mean():.3f}"


@requires_shared
def test_real_19_62_fps_video_time_line():
    path = next(p for p in shared_videos() if "GGSY1Qvo990" in p.name)
    clips = decode_clips(path, SamplingSpec(fps=2, frames_per_clip=2, clip_stride=1.0), "av")
    # 355 frames at 981/50 fps end at 18.09 s (a 20 fps assumption would say 17.75 s)
    assert clips.duration == pytest.approx(355 * 50 / 981, abs=1e-3)
    assert len(clips.starts) == 18 and clips.ends[-1] == pytest.approx(18.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_bound_memory_and_match_whole(tmp_path, backend):
    path = write_test_video(tmp_path / "v.mp4", n_frames=100, fps=25)
    spec = SamplingSpec(fps=5, frames_per_clip=5, clip_stride=0.4, short_side=None)
    batches = list(iter_clips(path, spec, backend=backend, window=3))
    assert max(len(b.starts) for b in batches) == 3
    whole = decode_clips(path, spec, backend)
    np.testing.assert_array_equal(np.concatenate([b.frames for b in batches]), whole.frames)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_raise_clear_errors(tmp_path, backend):
    spec = SamplingSpec()
    real = write_test_video(tmp_path / "ok.mp4", n_frames=50)
    cases = {
        "missing": (tmp_path / "nope.mp4", "does not exist"),
        "empty": (tmp_path / "empty.mp4", "empty"),
        "garbage": (tmp_path / "garbage.mp4", "cannot open"),
        "audio": (write_audio_only(tmp_path / "audio.mp4"), "no video stream"),
        "truncated": (tmp_path / "cut.mp4", "truncated"),
        "cut_before_index": (tmp_path / "cut2.mp4", "truncated"),
    }
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    # index first (faststart): the file opens, but a third of the frames is missing
    indexed = write_test_video(tmp_path / "faststart.mp4", n_frames=50, options={"movflags": "faststart"}).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(indexed[: len(indexed) // 3])
    # index last (the default): cutting the file loses the index itself
    data = real.read_bytes()
    (tmp_path / "cut2.mp4").write_bytes(data[: len(data) // 2])
    for name, (path, reason) in cases.items():
        with pytest.raises(DecodeError) as err:
            decode_clips(path, spec, backend)
        assert reason in str(err.value), (name, str(err.value))
        assert str(path) in str(err.value)


def test_raw_stream_without_timestamps_uses_the_nominal_rate(tmp_path):
    path = write_test_video(tmp_path / "raw.h264", n_frames=50, fps=25)  # no container: no pts at all
    clips = decode_clips(path, SamplingSpec(fps=4, frames_per_clip=4, short_side=None), "av")
    assert clips.duration == pytest.approx(2.0) and clips.starts.tolist() == [0.0, 1.0]
    for c, start in enumerate(clips.starts):
        for j in range(4):
            k = int((start + j / 4) * 25 + 1e-6)
            x = int(np.argmax(clips.frames[c, j, 32].mean(axis=1) > 150))
            assert abs(x - 2 * k) <= 1
    with pytest.raises(DecodeError, match="decord cannot open"):
        decode_clips(path, SamplingSpec(), "decord")
