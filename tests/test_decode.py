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


def stream_copy_cut(src, dst, start_s: float) -> int:
    """What ``ffmpeg -ss T -i src -c copy dst`` (and clipping tools that cut without re-encoding) write.

    The packets from the last keyframe at or before T are copied unchanged and shifted
    so that T is time 0; the frames before T get negative times, and the mp4 muxer
    covers them with an edit list (they stay in the file as references for the frames
    after T). Returns how many packets the edit list hides.
    """
    import av

    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        cut = int(round(start_s / stream.time_base))
        packets = [p for p in inp.demux(stream) if p.dts is not None]
        key = max(p.pts for p in packets if p.is_keyframe and p.pts <= cut)
        with av.open(str(dst), "w") as out:
            copy = out.add_stream_from_template(stream)
            hidden = 0
            for p in packets:
                if p.pts < key:
                    continue
                hidden += p.pts < cut
                p.pts, p.dts, p.stream = p.pts - cut, p.dts - cut, copy
                out.mux(p)
    return hidden


def _presented_frames(path):
    """(times, rgb frames) as a plain PyAV decode presents them (ffmpeg applies the edit list)."""
    import av

    with av.open(str(path)) as c:
        frames = [(float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    return np.array([t for t, _ in frames]), [f for _, f in frames]


@pytest.mark.parametrize("backend", ["av", "decord"])
def test_edit_list_from_a_stream_copy_cut_is_honoured(tmp_path, backend):
    # 4 s at 25 fps, one keyframe (x264 with B-frames), cut at 1.5 s: 38 frames stay in the file
    # for reference only. Both backends used to reject it ("damaged timestamps: frames run to 4.0 s
    # but the container declares 2.5 s").
    src = write_test_video(tmp_path / "src.mp4", n_frames=100, fps=25)  # libx264 defaults: GOP 250, B-frames
    cut = tmp_path / "cut.mp4"
    hidden = stream_copy_cut(src, cut, 1.5)
    assert hidden >= 30
    times, frames = _presented_frames(cut)
    assert len(times) == 100 - hidden and times[0] == 0.0

    spec = SamplingSpec(fps=4, frames_per_clip=4, clip_stride=0.5, short_side=None, crop=None)
    got = decode_clips(cut, spec, backend)
    assert got.duration == pytest.approx(times[-1] + 0.04)
    assert len(got.starts) == 4  # clips of 1 s every 0.5 s inside 2.5 s: starts 0, 0.5, 1.0, 1.5
    for i, start in enumerate(got.starts):
        for j in range(spec.frames_per_clip):
            shown = int(np.searchsorted(times, start + j / spec.fps + 1e-9, side="right") - 1)
            np.testing.assert_array_equal(got.frames[i, j], frames[shown])
    # the uncut file still plans by its own, longer time line
    assert len(decode_clips(src, spec, backend).starts) == 7
