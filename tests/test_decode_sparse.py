"""Decoding only what is sampled: exact mode must not change a single pixel, sparse
mode may only move a sample back onto the nearest decoded frame."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import requires_shared, shared_videos, write_test_video
from videolm.config import from_dict
from videolm.errors import ConfigError
from videolm.extract.config import ExtractConfig, SamplingSpec
from videolm.extract.decode import _AvBackend, _iter_decoded, decode_clips, iter_clips, plan_clips

# libx264's defaults (3 B-frames, b-pyramid): about half the frames are non-reference.
SPECS = [
    SamplingSpec(fps=4, frames_per_clip=4, clip_stride=1.0, short_side=None),  # pixels' default rates
    SamplingSpec(fps=1, frames_per_clip=1, clip_stride=1.0, short_side=None),  # clip's: one frame a second
    SamplingSpec(fps=7, frames_per_clip=3, clip_stride=0.3, short_side=32),  # overlapping clips, resized
]


@pytest.fixture(scope="module")
def bframe_video(tmp_path_factory):
    # frame k shows a square at x = 2k, never wrapping, so every frame is distinct
    return write_test_video(tmp_path_factory.mktemp("bf") / "bf.mp4", n_frames=90, fps=30, size=(192, 64))


def _count_nonref(path) -> tuple[int, int]:
    full = sum(1 for _ in _iter_decoded(str(path), 0))
    kept = sum(1 for _ in _iter_decoded(str(path), 0, sparse=True))
    return full, kept


def _clips_without_skipping(path, spec):
    """The reference: every frame decoded, the sampled ones converted."""
    impl = _AvBackend(str(path), spec, 0, skip_unsampled=False)
    plan = plan_clips(impl.times, spec)
    frames = {}
    for _, got in impl.frames(plan, 16):
        frames.update(got)
    return np.stack([np.stack([frames[i] for i in row]) for row in plan.frame_index]), plan


def test_the_test_video_has_non_reference_frames(bframe_video):
    full, kept = _count_nonref(bframe_video)
    assert full == 90 and kept < 70, (full, kept)  # otherwise the tests below test nothing


@pytest.mark.parametrize("spec", SPECS)
def test_exact_mode_skips_unsampled_frames_without_changing_a_pixel(bframe_video, spec):
    reference, plan = _clips_without_skipping(bframe_video, spec)
    got = decode_clips(bframe_video, spec, "av")
    np.testing.assert_array_equal(got.frames, reference)
    np.testing.assert_allclose(got.starts, plan.starts)
    # and the decoder really was told to drop frames nobody samples
    impl = _AvBackend(str(bframe_video), spec, 0)
    keep = {int(impl.pts[i]) for i in np.unique(plan.frame_index)}
    delivered = [f.pts for f in _iter_decoded(str(bframe_video), 0, keep_pts=keep)]
    assert keep <= set(delivered) and len(delivered) < 90


@requires_shared
def test_exact_mode_matches_a_full_decode_on_real_videos():
    spec = SamplingSpec(fps=4, frames_per_clip=4, clip_stride=1.0, short_side=64)
    for path in shared_videos():
        reference, _ = _clips_without_skipping(path, spec)
        np.testing.assert_array_equal(decode_clips(path, spec, "av").frames, reference)


def _presented(path) -> list[np.ndarray]:
    return [f.to_ndarray(format="rgb24") for f in _iter_decoded(str(path), 0)]


@pytest.mark.parametrize("spec", SPECS[:2])
def test_sparse_mode_moves_samples_back_to_the_last_decoded_frame(bframe_video, spec):
    presented = _presented(bframe_video)
    kept = {f.pts for f in _iter_decoded(str(bframe_video), 0, sparse=True)}
    impl = _AvBackend(str(bframe_video), spec, 0)
    plan = plan_clips(impl.times, spec)
    kept_index = np.array(sorted(impl.index_of[p] for p in kept))
    got = np.concatenate([b.frames for b in iter_clips(bframe_video, spec, "av", mode="sparse")])
    assert got.shape[:2] == plan.frame_index.shape
    moved = 0
    for c, row in enumerate(plan.frame_index):
        for j, exact in enumerate(row):
            # the decoded frame on screen last at or before the exact one
            expect = kept_index[np.searchsorted(kept_index, exact, side="right") - 1]
            if spec.short_side is None:
                np.testing.assert_array_equal(got[c, j], presented[expect])
            moved += int(expect != exact)
            assert exact - expect <= 3, "a shift larger than x264's B-frame run"
    if spec is SPECS[0]:
        assert moved > 0  # at 4 samples a second some land on dropped frames


@requires_shared
def test_sparse_equals_exact_on_streams_without_b_frames():
    spec = SamplingSpec()
    for path in shared_videos():
        full, kept = _count_nonref(path)
        exact = decode_clips(path, spec, "av")
        sparse = np.concatenate([b.frames for b in iter_clips(path, spec, "av", mode="sparse")])
        if full == kept:  # only P-frames: nothing is skippable
            np.testing.assert_array_equal(sparse, exact.frames)


def test_sparse_mode_needs_pyav_and_is_part_of_the_directory_key():
    with pytest.raises(ConfigError, match="sparse needs backend: av"):
        ExtractConfig(backend="decord", decode="sparse")
    with pytest.raises(ConfigError, match="decode must be"):
        from_dict(ExtractConfig, {"decode": "fast"})
    with pytest.raises(ValueError, match="needs the av backend"):
        next(iter_clips("x.mp4", SamplingSpec(), "decord", mode="sparse"))


def test_sparse_extract_refuses_to_mix_with_exact_shards(tmp_path, bframe_video):
    from videolm.extract.job import ExtractError, run_extract
    from videolm.manifests.manifest import VideoEntry, write_manifest

    manifest = write_manifest([VideoEntry("bf", str(bframe_video), "train", None, ())], tmp_path / "m.jsonl")
    out = tmp_path / "feats"
    run_extract(manifest, out, ExtractConfig(workers=0), progress=False)
    with pytest.raises(ExtractError, match="differs in: decode"):
        run_extract(manifest, out, ExtractConfig(workers=0, decode="sparse"), progress=False)
    sparse = run_extract(manifest, tmp_path / "sparse", ExtractConfig(workers=1, decode="sparse"), progress=False)
    assert sparse.videos_failed == 0 and sparse.clips > 0


def test_decoder_processes_do_not_import_torch():
    # Decoder workers are spawned: they import the CLI module and the decoder only.
    code = ("import sys, videolm.cli, videolm.extract.workers; "
            "bad = [m for m in ('torch', 'h5py', 'transformers') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"imported: {done.stdout.strip()} {done.stderr[-300:]}"
