"""The embedded synthetic dataset: determinism, manifest shape, stream timing, and
that the pixels really show what the captions say."""

from __future__ import annotations

import re
from pathlib import Path

import av
import numpy as np
import pytest

from videolm.manifests.manifest import load_manifest
from videolm.manifests.synthetic import (
    DIRECTIONS,
    FRAME_RATES,
    PALETTE,
    SIZES,
    Event,
    VideoSpec,
    caption_for,
    make_spec,
    render_background,
    render_frames,
    render_video,
    synthesize,
)

CAPTION_RE = re.compile(r"^a (?P<colour>\w+) (?P<digit>\d) moves (?P<direction>left|right|up|down)$")
N = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "seed0"
    return synthesize(out, N, seed=0, progress=False)


def _decode(path):
    """All frames as RGB arrays plus the stream facts the pipeline relies on."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(s)]
        info = dict(rate=s.average_rate, width=s.codec_context.width, height=s.codec_context.height,
                    duration=float(s.duration * s.time_base))
    return frames, info


def _frame_at(frames, t):
    return min(frames, key=lambda tf: abs(tf[0] - t))[1]


def _foreground(frame, bg, threshold=60):
    diff = np.abs(frame.astype(np.int16) - bg.astype(np.int16)).max(axis=2)
    return diff > threshold


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    assert len(xs) > 20, "digit not visible"
    return xs.mean(), ys.mean()


def _check_motion(frames, bg, start, end, direction, size):
    span = end - start
    x0, y0 = _centroid(_foreground(_frame_at(frames, start + 0.1 * span), bg))
    x1, y1 = _centroid(_foreground(_frame_at(frames, end - 0.1 * span), bg))
    dx, dy = x1 - x0, y1 - y0
    along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx)}[direction]
    # The digit travels >= 70% of the free range; handwriting changes the centroid a little.
    assert along > 0.1 * min(size), (direction, dx, dy)
    assert abs(across) < along / 2, (direction, dx, dy)


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset, tmp_path):
    again = synthesize(tmp_path / "again", N, seed=0, progress=False)
    other = synthesize(tmp_path / "other", N, seed=1, progress=False)
    assert again.read_text() == dataset.read_text()
    for a, b in zip(load_manifest(dataset), load_manifest(again)):
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    ours, theirs = load_manifest(dataset), load_manifest(other)
    assert {e.video_id for e in ours}.isdisjoint(e.video_id for e in theirs)
    assert all(Path(a.path).read_bytes() != Path(b.path).read_bytes() for a, b in zip(ours, theirs))
    assert [e.captions for e in ours] != [e.captions for e in theirs]
    # Video i depends on (seed, i) only, not on how many videos were asked for.
    fewer = load_manifest(synthesize(tmp_path / "fewer", 1, seed=0, progress=False))
    assert Path(fewer[0].path).read_bytes() == Path(ours[0].path).read_bytes()
    # ... nor on how many processes rendered it
    parallel = synthesize(tmp_path / "parallel", N, seed=0, progress=False, workers=2)
    assert parallel.read_text() == dataset.read_text()
    assert all(Path(a.path).read_bytes() == Path(b.path).read_bytes()
               for a, b in zip(ours, load_manifest(parallel)))
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.tmp"))


def test_manifest_validates_and_captions_are_timed_events(dataset):
    entries = load_manifest(dataset)
    assert len(entries) == N
    assert (dataset.parent / "videos").is_dir()
    assert '"path": "videos/' in dataset.read_text()  # relative to the manifest
    for i, e in enumerate(entries):
        assert e.split == "train" and 4.0 <= e.duration <= 20.0
        assert 2 <= len(e.captions) <= 4
        prev_end = 0.0
        for c in e.captions:
            assert c.kind == "caption"
            assert prev_end <= c.start < c.end <= e.duration
            assert c.end - c.start >= 1.5  # every event holds at least one full 1 s clip
            prev_end = c.end
        # The captions are exactly the rendered events, in order.
        spec = make_spec(0, i, "train")
        assert [(c.start, c.end, c.text) for c in e.captions] == [
            (ev.start, ev.end, caption_for(ev)) for ev in spec.events
        ]
        for c, ev in zip(e.captions, spec.events):
            m = CAPTION_RE.match(c.text)
            assert m, c.text
            assert (m["colour"], int(m["digit"]), m["direction"]) == (ev.colour, ev.digit, ev.direction)


def test_streams_match_manifest(dataset):
    for e in load_manifest(dataset):
        frames, info = _decode(e.path)
        fps = float(info["rate"])
        assert fps in FRAME_RATES
        assert (info["width"], info["height"]) in SIZES
        assert abs(len(frames) - e.duration * fps) <= 1
        assert abs(info["duration"] - e.duration) <= 1 / fps + 1e-6
        times = [t for t, _ in frames]
        assert times[0] == pytest.approx(0.0, abs=1e-6)
        assert np.allclose(np.diff(times), 1 / fps, atol=1e-3)  # constant frame rate after reordering


def test_digits_move_as_captioned_and_have_the_named_colour(dataset):
    for i, e in enumerate(load_manifest(dataset)):
        spec = make_spec(0, i, "train")
        bg = render_background(spec)
        frames, info = _decode(e.path)
        for c in e.captions:
            m = CAPTION_RE.match(c.text)
            _check_motion(frames, bg, c.start, c.end, m["direction"], spec.size)
            # Solid stroke pixels are closest to the named colour (not to another palette entry).
            mid = _frame_at(frames, (c.start + c.end) / 2)
            strong = _foreground(mid, bg, threshold=110)
            mean = mid[strong].astype(float).mean(axis=0)
            nearest = min(PALETTE, key=lambda k: np.linalg.norm(mean - np.asarray(PALETTE[k])))
            assert nearest == m["colour"], (c.text, mean)
        # Outside events only the background is on screen.
        gaps = [t for t, _ in frames if not any(c.start - 0.05 <= t < c.end + 0.05 for c in e.captions)]
        for t in gaps[:3]:
            assert not _foreground(_frame_at(frames, t), bg).any()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_custom_spec_renders_requested_motion(direction):
    ev = Event(digit=7, colour="green", direction=direction, start=0.5, end=2.5)
    spec = VideoSpec(events=(ev,), fps=25, size=(160, 120), duration=3.0, background="plain")
    frames = [(n / spec.fps, f) for n, f in enumerate(render_frames(spec))]
    assert len(frames) == 75
    _check_motion(frames, render_background(spec), ev.start, ev.end, direction, spec.size)
    assert not _foreground(frames[0][1], render_background(spec)).any()  # before the event


def test_mpeg4_fallback_decodes(tmp_path):
    ev = Event(digit=3, colour="red", direction="up", start=0.0, end=1.6)
    spec = VideoSpec(events=(ev,), fps=30, size=(176, 132), duration=2.0, background="texture", seed=3)
    path = render_video(spec, tmp_path / "v.mp4", codec="mpeg4")
    frames, info = _decode(path)
    assert len(frames) == 60 and float(info["rate"]) == 30 and (info["width"], info["height"]) == (176, 132)
    _check_motion(frames, render_background(spec), ev.start, ev.end, "up", spec.size)


def test_specs_vary_and_heldout_splits_use_unseen_handwriting():
    train = [make_spec(0, i, "train") for i in range(300)]
    test = [make_spec(1, i, "test") for i in range(300)]
    keys = [tuple(caption_for(e) for e in s.events) for s in train]
    assert len(set(keys)) >= 0.99 * len(keys)  # combinations rarely repeat
    assert not set(keys) & {tuple(caption_for(e) for e in s.events) for s in test}
    events = [e for s in train for e in s.events]
    assert {e.digit for e in events} == set(range(10))
    assert {e.colour for e in events} == set(PALETTE)
    assert {e.direction for e in events} == set(DIRECTIONS)
    assert {s.fps for s in train} == set(FRAME_RATES) and {s.size for s in train} == set(SIZES)
    assert all(4.0 <= s.duration <= 20.0 for s in train)
    assert 10 < np.mean([s.duration for s in train]) < 14
    # Train and held-out videos never share a handwriting sample.
    assert not {e.sample for e in events} & {e.sample for s in test for e in s.events}


def test_event_validation():
    with pytest.raises(ValueError, match="colour"):
        Event(digit=1, colour="teal", direction="left", start=0, end=2)
    with pytest.raises(ValueError, match="direction"):
        Event(digit=1, colour="red", direction="sideways", start=0, end=2)
    with pytest.raises(ValueError, match="start < end"):
        Event(digit=1, colour="red", direction="left", start=2, end=2)
    with pytest.raises(ValueError, match="split"):
        synthesize("/nonexistent", 1, seed=0, split="dev", progress=False)
