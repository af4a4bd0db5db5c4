"""Decode videos into fixed-rate clips with real timestamps.

Two interchangeable backends, ``av`` (PyAV) and ``decord``, share one planner:

1. read every frame's presentation time from the container (PyAV demuxes packets
   without decoding them; decord reads its frame index), relative to the first
   frame, so a 19.62 fps or variable-frame-rate file keeps its real time line.
   Frames an mp4 edit list cuts (``ffmpeg -ss T -c copy`` keeps the GOP before T
   and marks its frames discarded) are decoded for reference but not presented,
   as ffmpeg does; decord indexes them as frames, so such files are read with
   PyAV whichever backend was asked for;
2. ``plan_clips`` turns those times into clips: clip ``i`` starts at
   ``i * clip_stride`` and samples ``frames_per_clip`` times ``1 / fps`` apart;
   each sample shows the frame on screen at that moment (the last frame whose
   start is <= the sample time). A clip is kept when all its samples fall inside
   the video; a video shorter than one clip still gives one clip, padded with
   its last frame;
3. frames are decoded in windows of clips and only the sampled frames are
   converted to RGB and resized. With PyAV, a frame no clip samples is not even
   decoded when the codec marks it as one no other frame refers to (H.264/HEVC
   non-reference B-frames): the decoder is told to drop it (``skip_frame``), set
   packet by packet, so every sampled frame is still bit-identical to a full
   decode. ``mode="sparse"`` drops every non-reference frame, sampled or not, and
   a sample that lands on one shows the last decoded frame before it instead:
   faster on streams with B-frames, the same on streams without them.

Only a window of clips is ever held in memory, so long videos stay bounded.
Every failure becomes a ``DecodeError`` that names the file and the reason.
A path may name a member of an uncompressed tar (``x.tar#member``): it is read in
place through the process's open tar (``manifests/tar_members.py``), never unpacked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .config import SamplingSpec
from ..errors import VideolmError
from ..manifests.tar_members import TarMemberError, open_member, split_member

BACKENDS = ("av", "decord")
DECODE_MODES = ("exact", "sparse")


class DecodeError(VideolmError, RuntimeError):
    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class ClipBatch:
    frames: np.ndarray  # uint8 (n, T, H, W, 3)
    starts: np.ndarray  # float64 (n,) seconds
    ends: np.ndarray  # float64 (n,) seconds
    duration: float  # the whole video's duration (end of its last frame), seconds


@dataclass
class ClipPlan:
    starts: np.ndarray  # (n_clips,) clip start times, seconds
    ends: np.ndarray  # (n_clips,) clip end times, clamped to the video's end
    frame_index: np.ndarray  # (n_clips, T) index into the presentation-ordered frames
    duration: float  # end of the last frame, seconds


def plan_clips(frame_times: np.ndarray, spec: SamplingSpec) -> ClipPlan:
    """Map sampling times onto frames. ``frame_times``: sorted start times, first = 0."""
    n = len(frame_times)
    if n == 0:
        raise ValueError("no frames")
    if n > 1:
        # The last frame lasts as long as a typical frame; containers often give no
        # usable duration for it, and both backends must agree on the video's end.
        duration = float(frame_times[-1] + np.median(np.diff(frame_times)))
    else:
        duration = 1.0 / spec.fps
    offsets = np.arange(spec.frames_per_clip) / spec.fps
    last_offset = offsets[-1]
    # Clip i is kept when its last sample starts before the end of the video.
    n_clips = int(np.floor((duration - last_offset - 1e-9) / spec.clip_stride)) + 1 if duration > last_offset else 0
    n_clips = max(n_clips, 1)
    starts = np.arange(n_clips) * spec.clip_stride
    times = starts[:, None] + offsets[None, :]
    # A tiny epsilon keeps a sample that lands exactly on a frame boundary (common with
    # integer fps) on that frame despite float rounding of the timestamps.
    idx = np.searchsorted(frame_times, times + 1e-6, side="right") - 1
    idx = np.clip(idx, 0, n - 1)
    ends = np.minimum(starts + spec.clip_seconds, duration)
    return ClipPlan(starts=starts, ends=ends, frame_index=idx, duration=duration)


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Resized (width, height) with the short side set, keeping aspect, even sizes."""
    if short_side is None:
        return width, height
    scale = short_side / min(width, height)
    w, h = max(2, int(round(width * scale))), max(2, int(round(height * scale)))
    if width <= height:
        w = short_side
    else:
        h = short_side
    return w, h


def centre_crop(frames: np.ndarray, crop: int | None) -> np.ndarray:
    if crop is None:
        return frames
    h, w = frames.shape[-3], frames.shape[-2]
    top, left = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    return frames[..., top : top + crop, left : left + crop, :]


def _source(path: str):
    """What the decoders open: the path itself, or a view onto a tar member (manifests/tar_members.py)."""
    if split_member(path) is None:
        _check_file(path)
        return path
    try:
        member = open_member(path)
    except TarMemberError as exc:
        raise DecodeError(path, str(exc)) from None
    if member.size == 0:
        raise DecodeError(path, "tar member is empty (0 bytes)")
    return member


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DecodeError(path, "file does not exist")
    if os.path.isdir(path):
        raise DecodeError(path, "is a directory, not a video file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:  # pipes and devices report size 0
        raise DecodeError(path, "file is empty (0 bytes)")


def _open_av(path: str):
    """Open with PyAV and return (container, video_stream) or raise a clear DecodeError."""
    import av

    source = _source(path)
    try:
        container = av.open(source, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise DecodeError(
            path, f"cannot open as a video container (corrupt, truncated, or not a video file): {exc.strerror or exc}"
        ) from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise DecodeError(path, f"no video stream (streams present: {', '.join(kinds)}); audio-only file?")
    return container, container.streams.video[0]


@dataclass
class _Probe:
    times: np.ndarray | None  # presentation times, seconds, first frame = 0; None: packets carry no pts
    pts: np.ndarray | None  # the matching raw pts, sorted
    width: int
    height: int
    time_base: float
    rate: float | None = None  # the stream's nominal frame rate, used only when frames have no timestamps
    discarded: int = 0  # packets an edit list leaves out of the presented time line


def _av_probe(path: str) -> _Probe:
    """Frame times by demuxing packets (no decoding), plus the frame size; one open."""
    import av

    container, stream = _open_av(path)
    try:
        ctx = stream.codec_context  # None when the header's codec parameters are damaged
        width, height = (ctx.width, ctx.height) if ctx is not None else (0, 0)
        if not width or not height:
            raise DecodeError(path, "video stream has no frame size")
        tb = float(stream.time_base)
        rate = float(stream.guessed_rate or stream.average_rate or 0) or None
        pts, discarded = [], 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream flush packet
                if packet.is_discard:  # before an edit list's start: decoded for reference, never shown
                    discarded += 1
                    continue
                if packet.pts is None:
                    return _Probe(None, None, width, height, tb, rate)  # caller decodes for timestamps
                pts.append(packet.pts)
        except av.error.FFmpegError as exc:
            read_error = str(exc)  # judged below: a few lost packets are tolerable, a cut-off file is not
        else:
            read_error = None
        declared_frames = stream.frames or 0
        declared_seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    finally:
        container.close()
    if not pts:
        raise DecodeError(path, "video stream has no frames" + (f" ({read_error})" if read_error else ""))
    pts_arr = np.unique(np.asarray(pts, dtype=np.int64))
    times = (pts_arr - pts_arr[0]) * tb
    # the header counts the edit list's discarded frames among its frames, not in its duration
    _check_declared_length(path, times, declared_frames - discarded, declared_seconds, read_error)
    return _Probe(times, pts_arr, width, height, tb, rate, discarded)


def _check_declared_length(path: str, times: np.ndarray, declared_frames: int, declared_seconds: float,
                           read_error: str | None) -> None:
    """Raise DecodeError when the frames that could be read (at ``times``) disagree with the container's header."""
    # The container's index says how long the video should be; a file cut short by a
    # failed download or copy still opens, so compare what could actually be read.
    missing = declared_frames - len(times)
    short_by = declared_seconds - float(times[-1])
    if (declared_frames and missing > max(2, 0.05 * declared_frames)) or (
        declared_seconds and not declared_frames and short_by > max(1.0, 0.05 * declared_seconds)
    ):
        raise DecodeError(
            path,
            f"truncated or damaged: the container declares {declared_frames or '?'} frames / "
            f"{declared_seconds:.2f} s but only {len(times)} frames ({times[-1]:.2f} s) could be read"
            + (f" ({read_error})" if read_error else ""),
        )
    # A damaged index (one flipped bit in a timestamp table) can put a frame hours past
    # the declared end: the planner would pad that span with tens of thousands of clips
    # of one frame, and since clips keep coming the stall limit never fires.
    if declared_seconds and float(times[-1]) - declared_seconds > max(1.0, 0.05 * declared_seconds):
        raise DecodeError(
            path,
            f"damaged timestamps: frames run to {times[-1]:.2f} s but the container declares "
            f"{declared_seconds:.2f} s",
        )


def _iter_decoded(path: str, threads: int, keep_pts: set[int] | None = None, sparse: bool = False):
    """Yield decoded video frames in presentation order, skipping undecodable packets.

    ``keep_pts``: the frames wanted; any other frame the codec marks as
    non-reference is dropped by the decoder, since no frame depends on it.
    ``sparse``: drop every non-reference frame.
    """
    import av

    container, stream = _open_av(path)
    stream.thread_type = "AUTO" if threads != 1 else "SLICE"
    if threads > 0:
        stream.codec_context.thread_count = threads
    ctx = stream.codec_context
    if sparse:
        ctx.skip_frame = "NONREF"
    setting = "DEFAULT"
    errors = packets = 0
    try:
        for packet in container.demux(stream):
            packets += 1
            if keep_pts is not None and not sparse:
                # Read per packet (frame threads copy it when the packet is submitted),
                # so a wanted frame is always decoded in full.
                want = "DEFAULT" if packet.pts is None or packet.pts in keep_pts else "NONREF"
                if want != setting:
                    ctx.skip_frame = setting = want
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                errors += 1  # a damaged packet: the decoder conceals it, we keep going
                continue
            yield from frames
    except av.error.FFmpegError as exc:
        if packets == 0:
            raise DecodeError(path, f"cannot read video packets: {exc}") from None
    finally:
        container.close()
    if packets and errors > packets // 2:
        raise DecodeError(path, f"{errors} of {packets} video packets could not be decoded")


class _AvBackend:
    def __init__(self, path: str, spec: SamplingSpec, threads: int, probe: _Probe | None = None,
                 mode: str = "exact", skip_unsampled: bool = True):
        from av.video.reformatter import VideoReformatter

        self.path, self.spec, self.threads = path, spec, threads
        self.sparse, self.skip_unsampled = mode == "sparse", skip_unsampled
        probe = probe or _av_probe(path)
        self.width, self.height, self.tb = probe.width, probe.height, probe.time_base
        self.by_count = False
        if probe.times is None:
            # Packets without timestamps (raw streams): take times from a decode pass.
            raw = self._times_by_decoding(probe.rate)
            self.times, self.time_zero, self.first_pts, self.index_of = raw - raw[0], raw[0], None, {}
        else:
            self.times, self.first_pts = probe.times, int(probe.pts[0])
            self.time_zero = self.first_pts * self.tb
            self.index_of = {int(p): k for k, p in enumerate(probe.pts)}
        self.pts = None if probe.times is None else probe.pts
        # One reformatter for the whole video: building a scaler per frame cost ~0.7 ms
        # per sampled frame, more than decoding it.
        self._reformatter = VideoReformatter()

    def _to_rgb(self, frame, size: tuple[int, int]) -> np.ndarray:
        from av.video.reformatter import Interpolation

        # BILINEAR is what decord's scale filter uses: with it the backends agree to <0.2/255.
        rgb = self._reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24",
                                         interpolation=Interpolation.BILINEAR)
        return rgb.to_ndarray()

    def _times_by_decoding(self, rate: float | None) -> np.ndarray:
        times, n = [], 0
        for f in _iter_decoded(self.path, self.threads):
            n += 1
            if f.time is not None:
                times.append(f.time)
        if n == 0:
            raise DecodeError(self.path, "no decodable video frames")
        if len(times) == n:
            return np.unique(np.asarray(times, dtype=np.float64))
        # A raw elementary stream carries no timestamps at all: the nominal rate is the
        # only clock there is, and frames are then matched by their count.
        if not rate:
            raise DecodeError(self.path, "frames carry no timestamps and the stream declares no frame rate")
        self.by_count = True
        return np.arange(n) / rate

    def frames(self, plan: ClipPlan, window: int) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        """Yield (first clip of window, {frame index: rgb}) per window of clips."""
        size = output_size(self.width, self.height, self.spec.short_side)
        n_clips = len(plan.starts)
        # Overlapping clips in the next window may sample frames between this window's
        # samples, so every frame any clip samples is converted (once) as it passes.
        wanted_sorted = np.unique(plan.frame_index)
        wanted = set(wanted_sorted.tolist())
        keep_pts = None
        if self.skip_unsampled and self.pts is not None and not self.by_count:
            keep_pts = {int(self.pts[i]) for i in wanted}
        w0, got, last_rgb, last_idx, prev = 0, {}, None, -1, None
        top = int(plan.frame_index[:window].max())
        decoded = _iter_decoded(self.path, self.threads, keep_pts, self.sparse)
        for count, frame in enumerate(decoded):
            k = self._frame_index(frame, count)
            if k < 0 or k <= last_idx:
                continue
            if self.sparse and prev is not None:
                # Samples on frames the decoder dropped show the last frame it kept.
                skipped = wanted_sorted[np.searchsorted(wanted_sorted, last_idx, "right"):
                                        np.searchsorted(wanted_sorted, k, "left")]
                if len(skipped):
                    rgb = got.get(last_idx)
                    rgb = self._to_rgb(prev, size) if rgb is None else rgb
                    got.update((int(i), rgb) for i in skipped)
                    last_rgb = rgb
            last_idx, prev = k, frame
            if k in wanted:
                last_rgb = got[k] = self._to_rgb(frame, size)
            while k >= top:
                yield w0, _fill(got, plan.frame_index[w0 : w0 + window], last_rgb)
                w0 += window
                if w0 >= n_clips:
                    return
                lo = int(plan.frame_index[w0 : w0 + window].min())
                got = {i: v for i, v in got.items() if i >= lo}
                top = int(plan.frame_index[w0 : w0 + window].max())
        tail = wanted_sorted[wanted_sorted > last_idx]
        if self.sparse and prev is not None and len(tail):  # the last samples fell on dropped frames
            last_rgb = got[last_idx] if last_idx in got else self._to_rgb(prev, size)
            got.update((int(i), last_rgb) for i in tail)
        if last_rgb is None:
            raise DecodeError(self.path, "no decodable video frames")
        while w0 < n_clips:  # the stream ended early (truncated file): pad with the last frame
            yield w0, _fill(got, plan.frame_index[w0 : w0 + window], last_rgb)
            w0 += window

    def _frame_index(self, frame, count: int) -> int:
        """Position of a decoded frame on the planned time line; -1 when it has no time."""
        if self.by_count:
            return count
        # Matched by timestamp, not by count: a damaged packet may drop a frame.
        k = self.index_of.get(frame.pts, -1) if frame.pts is not None else -1
        if k >= 0:
            return k
        t = self._frame_time(frame)
        if t is None:
            return -1
        return int(np.searchsorted(self.times, t + 1e-6, side="right") - 1)

    def _frame_time(self, frame) -> float | None:
        """Seconds since the first frame, on the same clock as ``self.times``."""
        if frame.pts is not None and self.first_pts is not None:
            return (frame.pts - self.first_pts) * self.tb
        if frame.time is not None:
            return frame.time - self.time_zero
        return None


def _fill(got: dict[int, np.ndarray], needed: np.ndarray, fallback: np.ndarray | None) -> dict[int, np.ndarray]:
    """Frames a damaged stream never delivered are replaced by the nearest earlier one."""
    out, prev = {}, None
    for i in np.unique(needed).tolist():
        if i in got:
            prev = got[i]
        elif prev is None:
            prev = fallback
        out[i] = prev
    return out


def _open_decord(path: str, spec: SamplingSpec, threads: int):
    """The decord backend, or PyAV's for a file with an edit list.

    Probe with PyAV first: decord can spin forever or abort the process on files
    that are not video at all or are cut short, so those are rejected before decord
    sees them (demuxing without decoding is cheap). decord counts an edit list's
    discarded frames as frames, with their (negative) times, while its decoder
    delivers only the presented ones, so its frame numbers stop matching the
    pictures: such files go to PyAV, which gives ffmpeg's presented frames.
    """
    probe = _av_probe(path)
    if probe.discarded:
        return _AvBackend(path, spec, threads, probe)
    return _DecordBackend(path, spec, threads, probe)


class _DecordBackend:
    def __init__(self, path: str, spec: SamplingSpec, threads: int, probe: _Probe):
        import decord

        w, h = output_size(probe.width, probe.height, spec.short_side)
        try:
            # decord reads a file-like source (a tar member) whole into memory before decoding it
            self.reader = decord.VideoReader(_source(path), width=w, height=h, num_threads=threads)
        except decord.DECORDError as exc:
            raise DecodeError(path, f"decord cannot open the video: {str(exc).splitlines()[0]}") from None
        n = len(self.reader)
        if n == 0:
            raise DecodeError(path, "video stream has no frames")
        ts = np.asarray(self.reader.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
        self.times = ts - ts[0]
        self.path = path

    def frames(self, plan: ClipPlan, window: int) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        import decord

        for w0 in range(0, len(plan.starts), window):
            idx = np.unique(plan.frame_index[w0 : w0 + window])
            try:
                batch = self.reader.get_batch(idx.tolist()).asnumpy()
            except decord.DECORDError as exc:
                raise DecodeError(self.path, f"decord failed to decode frames: {str(exc).splitlines()[0]}") from None
            yield w0, dict(zip(idx.tolist(), batch))
        del self.reader  # decord holds decoder buffers per reader; free them promptly


def iter_clips(
    path: str | os.PathLike,
    spec: SamplingSpec,
    backend: str = "av",
    window: int = 16,
    threads: int = 0,
    mode: str = "exact",
) -> Iterator[ClipBatch]:
    """Yield clips of ``path`` in windows of at most ``window`` clips.

    ``threads``: decoder threads (0 = let the decoder choose). ``mode``: ``exact``
    (every sample shows the frame on screen at its time) or ``sparse`` (PyAV only:
    non-reference frames are never decoded; see the module docstring).
    Raises ``DecodeError`` for missing, empty, corrupt or audio-only files.
    """
    path = str(path)
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}")
    if mode == "sparse" and backend != "av":
        raise ValueError("sparse decoding needs the av backend: decord cannot skip frames")
    if backend == "av":
        impl = _AvBackend(path, spec, threads, mode=mode)
    elif backend == "decord":
        impl = _open_decord(path, spec, threads)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    plan = plan_clips(impl.times, spec)
    for w0, frames in impl.frames(plan, window):
        idx = plan.frame_index[w0 : w0 + window]
        clips = np.stack([np.stack([frames[i] for i in row]) for row in idx])
        yield ClipBatch(
            frames=centre_crop(clips, spec.crop),
            starts=plan.starts[w0 : w0 + window].copy(),
            ends=plan.ends[w0 : w0 + window].copy(),
            duration=plan.duration,
        )


def decode_clips(path: str | os.PathLike, spec: SamplingSpec, backend: str = "av") -> ClipBatch:
    """All clips of a (short) video at once: convenient for tests and small files."""
    batches = list(iter_clips(path, spec, backend))
    return ClipBatch(
        frames=np.concatenate([b.frames for b in batches]),
        starts=np.concatenate([b.starts for b in batches]),
        ends=np.concatenate([b.ends for b in batches]),
        duration=batches[0].duration,
    )
