"""Videos stored as members of uncompressed tar files (WebDataset / video2dataset shards).

A manifest path ``shards/00003.tar#000000014.mp4`` names the member
``000000014.mp4`` of the tar ``shards/00003.tar``: the part up to and including the
first ``.tar`` followed by ``#`` is the tar's path (absolute, or relative to the
manifest like any path), the rest is the member's name exactly as the tar stores it.

Members are read in place, never unpacked: a process builds a member index
(name -> data offset, size) of a tar once, in one pass over its headers, keeps the
tar open, and hands out ``MemberFile`` views, bounded read-only files over one
member's bytes that PyAV and decord open like any file. Index and handle are
cached per process (``TarCache``) and checked against the tar's size and mtime on
every open, so a tar rewritten in place is indexed again rather than misread.
Only uncompressed tars qualify: a compressed member has no byte range to seek in.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import VideolmError

TAR_MARK = ".tar#"  # where the tar's path ends and the member's name begins
OPEN_TARS = 8  # tars a process keeps open: a worker reads a manifest's videos mostly tar by tar


class TarMemberError(VideolmError, OSError):
    """A tar or a member that cannot be read; the message names the tar and the member."""


def split_member(path: str) -> tuple[str, str] | None:
    """(tar path, member name) for the member path form; None for an ordinary file path."""
    i = path.find(TAR_MARK)
    if i < 0:
        return None
    return path[: i + 4], path[i + len(TAR_MARK):]


def member_path(tar: str, member: str) -> str:
    return f"{tar}#{member}"


def check_member_name(member: str) -> None:
    """Refuse member names a tar cannot hold in place (ValueError, for the manifest's line errors)."""
    if not member:
        raise ValueError("member path names no member after '.tar#'")
    parts = member.split("/")
    if member.startswith("/") or ".." in parts:
        raise ValueError(f"member name {member[:60]!r} must be relative and without '..'")


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class TarIndex:
    path: str
    stamp: tuple[int, int]  # (size, mtime_ns) of the tar the index was built from
    members: dict[str, tuple[int, int]]  # regular-file member name -> (data offset, size)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def build_index(path: str) -> TarIndex:
    """One pass over the tar's headers (tarfile seeks past each member's data)."""
    if not os.path.isfile(path):
        raise TarMemberError(f"{path}: tar file does not exist" if not os.path.exists(path)
                             else f"{path}: not a regular file")
    stamp = _stamp(path)
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise TarMemberError(f"{path}: a gzip-compressed tar; its members cannot be read in place "
                                 f"(decompress it to a plain .tar)")
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tf:  # "r:": uncompressed only, the one kind with byte ranges
            for info in tf:
                if info.isfile() and not info.issparse():
                    members[info.name] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError) as exc:
        raise TarMemberError(f"{path}: not a readable tar file ({exc or type(exc).__name__}) after "
                             f"{len(members)} members") from None
    return TarIndex(path, stamp, members)


class MemberFile(io.RawIOBase):
    """Read-only, seekable view of bytes [offset, offset + size) of an open file.

    Reads use ``os.pread``, which leaves the file's own position alone, so several
    views onto one open tar (PyAV's probe and decode passes) never disturb each other.
    """

    def __init__(self, fd: int, offset: int, size: int, name: str):
        super().__init__()
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0
        self.name = name  # what error messages and PyAV show

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._fd, n, self._offset + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"unsupported whence {whence}")
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self._size


# --------------------------------------------------------------------------- per-process cache


class TarCache:
    """Open tars with their indices, at most ``limit`` of them, least recently used closed first."""

    def __init__(self, limit: int = OPEN_TARS):
        self.limit = limit
        self.indexed = 0  # indices built (a test and the benchmark read it)
        self._open: OrderedDict[str, tuple[TarIndex, object]] = OrderedDict()

    def index(self, tar: str) -> tuple[TarIndex, object]:
        """The tar's index and open file, rebuilt when the tar changed since it was indexed."""
        held = self._open.get(tar)
        try:
            stamp = _stamp(tar)
        except OSError:
            stamp = None
        if held is not None and held[0].stamp == stamp:
            self._open.move_to_end(tar)
            return held
        if held is not None:
            self._close(tar)
        index = build_index(tar)
        handle = open(tar, "rb")
        self.indexed += 1
        self._open[tar] = (index, handle)
        while len(self._open) > self.limit:
            self._close(next(iter(self._open)))
        return index, handle

    def open_member(self, path: str) -> MemberFile:
        """A view onto the member a member path names; TarMemberError when there is none."""
        split = split_member(path)
        if split is None:
            raise TarMemberError(f"{path}: not a tar member path (<file>.tar#<member>)")
        tar, member = split
        index, handle = self.index(tar)
        where = index.members.get(member)
        if where is None:
            raise TarMemberError(f"no member {member!r} in {tar} ({len(index.members)} files)")
        return MemberFile(handle.fileno(), where[0], where[1], path)

    def _close(self, tar: str) -> None:
        _, handle = self._open.pop(tar)
        handle.close()

    def close(self) -> None:
        while self._open:
            self._close(next(iter(self._open)))


# One per process: decoder workers are separate processes, so each keeps its own open tars.
PROCESS_CACHE = TarCache()


def open_member(path: str) -> MemberFile:
    return PROCESS_CACHE.open_member(path)
