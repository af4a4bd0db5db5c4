"""Read one huge JSON object ``{"key": value, ...}`` one pair at a time.

HowTo100M's caption.json is a single object holding 1.2M videos (several GB as
Python objects once ``json.load``-ed). This module keeps only a bounded text buffer:
it reads the file in chunks, and ``json.JSONDecoder.raw_decode`` (the standard
library's C scanner) parses each value straight out of the buffer. The buffer only
grows past one chunk when a single value is larger than a chunk.

Malformed input raises ``ImporterError`` naming the file, the byte offset and the
key being read, e.g. ``caption.json: malformed JSON at byte 1234567 in the entry of
video 'abc': Expecting ',' delimiter``.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import BinaryIO, Iterator

from .common import ImporterError

# Bytes read at a time. Small on purpose: with 1 MiB chunks (4 MiB strings once text
# holds an emoji) glibc's heap fragmented and RSS crept up to 450 MB over 1M videos;
# at 64 KiB it stays flat, and parsing is no slower (measured: 0.82 s vs 0.97-1.12 s
# for 100k videos).
DEFAULT_CHUNK = 1 << 16

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# raw_decode cannot tell "the value is cut by the end of the buffer" from "the value is
# broken": an error within this many characters of the buffer's end, or an unterminated
# string, may just need more text (a cut number such as "1." or "\u12" fails a few
# characters before the end).
_NEAR_END = 8


class _NeedMore(Exception):
    pass


def _nbytes(text: str) -> int:
    # isascii() is O(1) in CPython: the common all-ASCII case costs no encoding.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class _Buffer:
    """Text decoded from a binary file, with the byte offset of its first character."""

    def __init__(self, f: BinaryIO, source: str, chunk_size: int):
        self.f, self.source, self.chunk = f, source, max(1, int(chunk_size))
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.base = 0  # byte offset of text[0]
        self.read_bytes = 0
        self.eof = False

    def more(self, keep_from: int) -> bool:
        """Forget text before `keep_from` (positions restart at 0 there) and read more.
        Reads at least as much as is kept, so re-parsing a long value stays linear."""
        if self.eof:
            return False
        self.base += _nbytes(self.text[:keep_from])
        rest = self.text[keep_from:]
        data = self.f.read(max(self.chunk, len(rest)))
        try:
            new = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise ImporterError(f"{self.source}: not UTF-8 text (invalid byte at offset "
                                f"{self.read_bytes + exc.start})") from None
        if self.read_bytes == 0 and new.startswith("\ufeff"):
            new = new[1:]  # a byte-order mark written by some editors
            self.base += 3
        self.read_bytes += len(data)
        self.eof = not data
        self.text = rest + new
        return True

    def offset(self, pos: int) -> int:
        return self.base + _nbytes(self.text[:pos])


def _decode(buf: _Buffer, pos: int):
    try:
        value, end = _DECODER.raw_decode(buf.text, pos)
    except json.JSONDecodeError as exc:
        if not buf.eof and (exc.msg.startswith("Unterminated string") or exc.pos >= len(buf.text) - _NEAR_END):
            raise _NeedMore from None
        raise _Malformed(exc.pos, exc.msg) from None
    if end == len(buf.text) and not buf.eof:
        raise _NeedMore  # a number may continue in the next chunk
    return value, end


class _Malformed(Exception):
    def __init__(self, pos: int, msg: str, key=None):
        self.pos, self.msg, self.key = pos, msg, key


def _skip_ws(buf: _Buffer, pos: int) -> int:
    pos = _WS.match(buf.text, pos).end()
    if pos == len(buf.text) and not buf.eof:
        raise _NeedMore
    return pos


def _item(buf: _Buffer, pos: int, first: bool):
    """Parse `[,] "key": value` from pos; returns (key, value, end) or None at the closing brace."""
    pos = _skip_ws(buf, pos)
    text = buf.text
    if pos == len(text):
        raise _Malformed(pos, "unexpected end of file (the top-level object is not closed)")
    if text[pos] == "}":
        return None, None, pos + 1
    if not first:
        if text[pos] != ",":
            raise _Malformed(pos, f"expected ',' or '}}', found {text[pos]!r}")
        pos = _skip_ws(buf, pos + 1)
    if pos == len(text) or text[pos] != '"':
        found = repr(text[pos]) if pos < len(text) else "the end of the file"
        raise _Malformed(pos, f"expected a key (a string in double quotes), found {found}")
    key, pos = _decode(buf, pos)
    try:
        pos = _skip_ws(buf, pos)
        if pos == len(text) or text[pos] != ":":
            raise _Malformed(pos, "expected ':' after the key")
        pos = _skip_ws(buf, pos + 1)
        value, pos = _decode(buf, pos)
    except _Malformed as exc:
        exc.key = key
        raise
    return key, value, pos


def iter_object(f: BinaryIO, source: str, chunk_size: int = DEFAULT_CHUNK,
                key_name: str = "key") -> Iterator[tuple[str, object]]:
    """Yield the (key, value) pairs of the JSON object in binary file `f`, in file order.

    `key_name` is what a key is called in error messages ("video" for HowTo100M).

    Duplicate keys are all yielded (``json.load`` would keep only the last one).
    """
    buf = _Buffer(f, source, chunk_size)
    buf.more(0)
    pos, first, last_key = 0, True, None

    def fail(pos: int, msg: str, key=None):
        where = f" in the entry of {key_name} {key!r:.80}" if key is not None else (
            f" after the entry of {key_name} {last_key!r:.80}" if last_key is not None else "")
        return ImporterError(f"{source}: malformed JSON at byte {buf.offset(pos)}{where}: {msg}")

    # The opening brace.
    while True:
        try:
            pos = _skip_ws(buf, 0)
            break
        except _NeedMore:
            buf.more(0)
    if pos == len(buf.text):
        raise ImporterError(f"{source}: the file is empty")
    if buf.text[pos] != "{":
        raise fail(pos, f"expected a JSON object {{\"<video id>\": ...}} at the top level, found {buf.text[pos]!r}")
    pos += 1
    while True:
        try:
            key, value, end = _item(buf, pos, first)
        except _NeedMore:
            buf.more(pos)
            pos = 0
            continue
        except _Malformed as exc:
            raise fail(exc.pos, exc.msg, exc.key) from None
        pos = end
        if key is None:
            break
        first, last_key = False, key
        yield key, value
    # Only whitespace may follow the object.
    while True:
        rest = _WS.match(buf.text, pos).end()
        if rest < len(buf.text):
            raise fail(rest, "unexpected data after the end of the top-level object")
        if not buf.more(rest):
            return
        pos = 0

