"""Decoder worker processes with per-video stall limits.

Decoding runs in separate processes for two reasons: it overlaps with encoding in
the parent, and a decoder that hangs (decord spins forever on some broken files)
or crashes (a segfault inside a C library) takes down only its worker. The
parent kills a worker that sends nothing for ``timeout`` seconds, records the
video as failed and starts a fresh worker, so one bad file never stops the job.

A worker is also retired after ``recycle_after`` videos and replaced by a fresh
process: memory that a C library keeps per file (decord readers are known to
leak; in one of our 1,000-video runs the PyAV workers grew 22% between the 100th
and the 1,000th video) then cannot accumulate over a long job. Starting a spawned process costs the
parent only the launch; the new worker imports while the old one finishes.

Protocol on each worker's pipe (worker -> parent):
    ("clips", video_id, ClipBatch)      zero or more, in time order
    ("done", video_id, duration)        the video decoded completely
    ("error", video_id, message)        DecodeError or any other exception
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from .config import SamplingSpec
from .decode import DecodeError, iter_clips


def decode_video(conn: Connection, video_id: str, path: str, spec: SamplingSpec, backend: str, threads: int,
                 mode: str = "exact"):
    """Decode one video and stream its clips over ``conn`` (used in and out of workers)."""
    try:
        duration = 0.0
        for batch in iter_clips(path, spec, backend=backend, threads=threads, mode=mode):
            conn.send(("clips", video_id, batch))
            duration = batch.duration
        conn.send(("done", video_id, duration))
    except DecodeError as exc:
        conn.send(("error", video_id, exc.reason))
    except Exception as exc:  # a library bug on one file must not end the job
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        conn.send(("error", video_id, f"{type(exc).__name__}: {exc} ({tb})"))


def _worker_main(conn: Connection):
    while True:
        task = conn.recv()
        if task is None:
            return
        decode_video(conn, *task)


RECYCLE_AFTER = 100  # videos per decoder process


@dataclass
class _Worker:
    process: mp.Process
    conn: Connection
    video_id: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    videos: int = 0  # videos finished by this process


class DecoderPool:
    """``submit`` videos, then ``poll`` for messages; at most one video per worker."""

    def __init__(self, num_workers: int, backend: str, threads: int, timeout: float,
                 recycle_after: int = RECYCLE_AFTER, mode: str = "exact"):
        self.backend, self.threads, self.timeout, self.mode = backend, threads, timeout, mode
        self.recycle_after = recycle_after  # 0: never
        self.started = 0  # processes started, replacements included
        self._retired: list[_Worker] = []  # told to exit, not yet joined
        # spawn, not fork: the parent holds torch threads and open HDF5 files that a
        # forked child would inherit in an undefined state.
        self._ctx = mp.get_context("spawn")
        self._workers = [self._start() for _ in range(num_workers)]

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        proc.start()
        child.close()
        self.started += 1
        return _Worker(process=proc, conn=parent)

    @property
    def idle(self) -> int:
        return sum(w.video_id is None for w in self._workers)

    @property
    def busy(self) -> int:
        return len(self._workers) - self.idle

    def submit(self, video_id: str, path: str, spec: SamplingSpec) -> None:
        worker = next(w for w in self._workers if w.video_id is None)
        worker.video_id = video_id
        worker.last_seen = time.monotonic()
        worker.conn.send((video_id, path, spec, self.backend, self.threads, self.mode))

    def poll(self, wait_s: float) -> list[tuple]:
        """Messages ready within ``wait_s`` seconds; hung or dead workers become errors."""
        busy = [w for w in self._workers if w.video_id is not None]
        if not busy:
            return []
        ready = wait([w.conn for w in busy], timeout=wait_s)
        out = []
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w.video_id is None:
                continue
            if w.conn in ready:
                try:
                    while w.conn.poll():
                        msg = w.conn.recv()
                        out.append(msg)
                        w.last_seen = now
                        if msg[0] in ("done", "error"):
                            w.video_id = None
                            w.videos += 1
                            if self.recycle_after and w.videos >= self.recycle_after:
                                self._retire(i)
                            break
                except (EOFError, OSError):
                    code = w.process.exitcode
                    out.append(("error", w.video_id, f"decoder process died (exit code {code}) on this video"))
                    self._replace(i)
            elif now - w.last_seen > self.timeout:
                out.append(("error", w.video_id, f"no progress for {self.timeout:.0f} s: decoder hung, killed"))
                self._replace(i)
        return out

    def _retire(self, i: int) -> None:
        """Ask an idle worker to exit (it is joined later) and put a fresh process in its place."""
        w = self._workers[i]
        try:
            w.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self._retired.append(w)
        self._workers[i] = self._start()
        still = []
        for old in self._retired:  # reap the ones that have exited meanwhile
            if old.process.is_alive():
                still.append(old)
            else:
                old.process.join(0)
                old.conn.close()
        self._retired = still

    def _replace(self, i: int) -> None:
        w = self._workers[i]
        w.process.kill()
        w.process.join(5)
        w.conn.close()
        self._workers[i] = self._start()

    def close(self) -> None:
        for w in self._retired:
            w.process.join(2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1)
            w.conn.close()
        self._retired = []
        for w in self._workers:
            try:
                if w.video_id is None:
                    w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 2
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1)
            w.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
