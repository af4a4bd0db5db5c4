"""Property-based tests of manifest parsing (hypothesis).

Every malformed line must give a ``ManifestError`` that names the file and the
line and says why, never another exception type; blank lines are the one
documented skip. Valid manifests round-trip through write_manifest/load_manifest.

The default suite runs ~200 examples per property (a few seconds); the
``faults``-marked copies (``make test-faults``, or ``pytest -m faults``) run
thousands. See docs/reliability.md, "Bad input and security".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from videolm.manifests.manifest import (  # noqa: E402
    CAPTION_KINDS, SPLITS, Caption, ManifestError, VideoEntry, iter_manifest, load_manifest, write_manifest,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
MANY = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

# Text that is valid in a caption: anything but lone surrogates and NUL (RTL, emoji, combining marks,
# U+2028, NEL, other control characters are all fine and must survive a round trip).
caption_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
# video_id additionally may not hold control characters (it becomes an HDF5 string).
id_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(str.strip)
times = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def captions(draw):
    start = draw(times)
    end = draw(st.floats(min_value=start, max_value=start + 1e5, allow_nan=False, allow_infinity=False))
    c = {"start": start, "end": end, "text": draw(caption_text)}
    kind = draw(st.sampled_from((None,) + CAPTION_KINDS))
    if kind is not None:
        c["kind"] = kind
    return c


@st.composite
def valid_line(draw, index: int):
    d = {"video_id": f"v{index}-" + draw(id_text), "path": draw(st.sampled_from(
        ["videos/a.mp4", "/data/v.mp4", "sub dir/ü b.webm", "./x/../y.mkv", "\u05d0\u05d1.mp4", "\U0001f3a5.mp4"])),
        "split": draw(st.sampled_from(SPLITS))}
    if draw(st.booleans()):
        d["duration"] = draw(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False))
    if draw(st.booleans()):
        d["captions"] = draw(st.lists(captions(), max_size=4))
    return d


# Values of the wrong JSON type (or a wrong value) for each kind of field.
any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=6,
)
not_a_number = any_json.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float))) | st.sampled_from(
    ["NaN", "nan", "Infinity", "1.0", "", True, False, float("nan"), float("inf"), float("-inf"), 10**400])
not_a_string = any_json.filter(lambda v: not isinstance(v, str))
bad_id = not_a_string | st.sampled_from(["", "   ", "\t", "a\x00b", "a\nb", "\x7f", "\ud800", "x\udfff"])
bad_path = not_a_string | st.sampled_from(["", "a\x00b.mp4", "\udc80.mp4"])
bad_split = any_json.filter(lambda v: v not in SPLITS) | st.sampled_from(["Train", "dev", " train", "validation"])
bad_text = not_a_string | st.sampled_from(["\x00", "ok\ud83d", "\udfff"])
bad_kind = any_json.filter(lambda v: v is not None and v not in CAPTION_KINDS) | st.sampled_from(["Caption", ""])


def _field_mutation(draw, d: dict) -> tuple[dict, str]:
    d = json.loads(json.dumps(d))
    if not d.get("captions"):
        d["captions"] = [{"start": 0.0, "end": 1.0, "text": "x"}]
    c = d["captions"][-1]
    choice = draw(st.sampled_from([
        "video_id", "path", "split", "duration", "duration_nonpos", "captions", "caption", "start", "end",
        "text", "kind", "negative", "end_lt_start", "missing", "missing_caption_key", "unknown", "unknown_caption",
    ]))
    if choice == "video_id":
        d["video_id"] = draw(bad_id)
    elif choice == "path":
        d["path"] = draw(bad_path)
    elif choice == "split":
        d["split"] = draw(bad_split)
    elif choice == "duration":
        d["duration"] = draw(not_a_number.filter(lambda v: v is not None))
    elif choice == "duration_nonpos":
        d["duration"] = draw(st.sampled_from([0, 0.0, -0.0, -1, -1e-9, -1e300]))
    elif choice == "captions":
        d["captions"] = draw(any_json.filter(lambda v: not isinstance(v, list) and v is not None))
    elif choice == "caption":
        d["captions"][-1] = draw(any_json.filter(lambda v: not isinstance(v, dict)))
    elif choice in ("start", "end"):
        c[choice] = draw(not_a_number)
    elif choice == "text":
        c["text"] = draw(bad_text)
    elif choice == "kind":
        c["kind"] = draw(bad_kind)
    elif choice == "negative":
        c["start"] = draw(st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False))
    elif choice == "end_lt_start":
        c["start"] = draw(st.floats(min_value=1.0, max_value=1e9))
        c["end"] = draw(st.floats(min_value=0.0, max_value=c["start"] * 0.999))
    elif choice == "missing":
        del d[draw(st.sampled_from(["video_id", "path", "split"]))]
    elif choice == "missing_caption_key":
        del c[draw(st.sampled_from(["start", "end", "text"]))]
    elif choice == "unknown":
        d[draw(st.sampled_from(["videoid", "Path", "caption", "", "\ud800", "\x00"]))] = 1
    else:
        c[draw(st.sampled_from(["txt", "begin", "\u202e"]))] = 1
    return d, choice


def _dumps(d) -> bytes:
    # allow_nan: NaN/Infinity tokens, which Python's json (and so a manifest writer in Python) produces.
    return json.dumps(d, ensure_ascii=bool(len(str(d)) % 2)).encode("utf-8", "surrogatepass")


@st.composite
def bad_line(draw, index: int, earlier_ids: list[str]):
    """Bytes of one line (no newline) that must be refused, and a label of what was done."""
    base = draw(valid_line(index))
    how = draw(st.sampled_from(["field", "field", "field", "field", "syntax", "nonobject", "duplicate_id",
                                "duplicate_key", "bytes", "nan_token", "deep"]))
    if how == "field":
        d, label = _field_mutation(draw, base)
        return _dumps(d), label
    if how == "duplicate_id" and earlier_ids:
        return _dumps({**base, "video_id": draw(st.sampled_from(earlier_ids))}), how
    if how == "nonobject":
        v = draw(any_json.filter(lambda v: not isinstance(v, dict)))
        return json.dumps(v).encode(), how
    if how == "duplicate_key":
        text = _dumps(base).decode("utf-8", "surrogatepass")
        return (text[:-1] + ', "split": "train"}').encode("utf-8", "surrogatepass"), how
    if how == "bytes":
        raw = _dumps(base)
        cut = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc", b"\xfe\xff"]))
        return raw[:cut] + junk + raw[cut:], how
    if how == "nan_token":
        raw = _dumps({**base, "captions": [{"start": 0.0, "end": 1.0, "text": "x"}]})
        token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        return raw.replace(b'"end": 1.0', b'"end": ' + token), how
    if how == "deep":
        n = draw(st.sampled_from([50, 5000, 200000]))
        return b'{"video_id": "d", "path": "p", "split": "train", "captions": ' + b"[" * n + b"]" * n + b"}", how
    # syntax: trailing comma, truncation, single quotes, comments, two objects on a line, etc.
    raw = _dumps(base)
    kind = draw(st.sampled_from(["trailing_comma", "truncate", "quotes", "comment", "two", "garbage", "bare"]))
    if kind == "trailing_comma":
        return raw[:-1] + b",}", kind
    if kind == "truncate":
        return raw[: draw(st.integers(1, len(raw) - 1))], kind
    if kind == "quotes":
        return raw.replace(b'"', b"'"), kind
    if kind == "comment":
        return raw + b" // note", kind
    if kind == "two":
        return raw + b" " + raw, kind
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=30).filter(lambda b: b.strip() and b"\n" not in b
                                                              and not _is_valid_object(b))), kind
    return b"video_id: v1", kind


def _is_valid_object(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except Exception:
        return False


blank = st.sampled_from([b"", b" ", b"\t", b"  \t ", b"\r"])


@st.composite
def manifest_with_one_bad_line(draw):
    """(file bytes, 1-based line number of the bad line, label)."""
    n_good = draw(st.integers(0, 4))
    bad_at = draw(st.integers(0, n_good))
    crlf = draw(st.booleans())
    lines, ids = [], []
    if draw(st.booleans()):
        lines.append(draw(blank))
    for i in range(n_good + 1):
        if i == bad_at:
            raw, label = draw(bad_line(i, list(ids)))
            lines.append(raw)
            bad_lineno = len(lines)
            break  # nothing after the bad line is read
        d = draw(valid_line(i))
        ids.append(d["video_id"])
        lines.append(_dumps(d))
        if draw(st.booleans()):
            lines.append(draw(blank))
    lines += [_dumps(draw(valid_line(100 + j))) for j in range(draw(st.integers(0, 2)))]
    data = (b"\r\n" if crlf else b"\n").join(lines) + draw(st.sampled_from([b"", b"\n"]))
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data, bad_lineno, label


@st.composite
def valid_manifest_bytes(draw):
    lines = []
    for i in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            lines.append(draw(blank))
        lines.append(_dumps(draw(valid_line(i))))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = sep.join(lines) + draw(st.sampled_from([b"", sep]))
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data, sum(1 for l in lines if l.strip())


# ---------------------------------------------------------------- helpers


class _Dir:
    """A scratch folder per example (hypothesis cannot use pytest's function-scoped tmp_path)."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="videolm-fuzz-"))
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def _assert_clean_error(err: ManifestError, path: Path, lineno: int | None):
    msg = str(err)
    assert isinstance(err, ManifestError)
    assert err.line == lineno, (msg, lineno)
    assert msg.startswith(f"{path}:{lineno}: " if lineno else f"{path}: "), msg
    assert err.problem.strip(), msg
    assert len(err.problem) < 400, f"error message of {len(err.problem)} chars"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), \
        "error chained to an internal exception"
    msg.encode("utf-8")  # printable on a UTF-8 terminal: no lone surrogates in the message


def _check_bad(case):
    data, lineno, label = case
    with _Dir() as d:
        p = d / "m.jsonl"
        p.write_bytes(data)
        try:
            entries = load_manifest(p)
        except ManifestError as err:
            _assert_clean_error(err, p, lineno)
        else:
            pytest.fail(f"{label}: line {lineno} was accepted: {data[:300]!r} -> {entries[-1:]}")


def _check_valid(case):
    data, n = case
    with _Dir() as d:
        p = d / "m.jsonl"
        p.write_bytes(data)
        entries = load_manifest(p)
        assert len(entries) == n
        for e in entries:
            assert os.path.isabs(e.path)
            assert e.split in SPLITS
            for c in e.captions:
                assert math.isfinite(c.start) and math.isfinite(c.end) and 0 <= c.start <= c.end


def _check_roundtrip(entries, relative):
    with _Dir() as d:
        entries = [VideoEntry(e.video_id, str(d / e.path), e.split, e.duration, e.captions) for e in entries]
        p = write_manifest(entries, d / "sub" / "m.jsonl", relative=relative)
        assert load_manifest(p) == entries
        assert [e for _, e in iter_manifest(p, root=d)] == entries


# ---------------------------------------------------------------- properties


@FAST
@given(manifest_with_one_bad_line())
def test_malformed_line_gives_manifest_error_with_its_line(case):
    _check_bad(case)


@FAST
@given(valid_manifest_bytes())
def test_valid_lines_with_bom_crlf_and_blank_lines_load(case):
    _check_valid(case)


entry_strategy = st.builds(
    VideoEntry,
    video_id=id_text,
    path=st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\."),
                          min_size=1, max_size=8), min_size=1, max_size=3).map(lambda parts: os.path.join(*parts)),
    split=st.sampled_from(SPLITS),
    duration=st.none() | st.floats(min_value=1e-6, max_value=1e7, allow_nan=False, allow_infinity=False),
    captions=st.lists(captions().map(lambda c: Caption(**c)), max_size=4).map(tuple),
)
unique_entries = st.lists(entry_strategy, max_size=6, unique_by=lambda e: e.video_id)


@FAST
@given(unique_entries, st.booleans())
def test_valid_manifests_round_trip(entries, relative):
    _check_roundtrip(entries, relative)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=60) | any_json.map(lambda v: json.dumps(v).encode()), max_size=5))
def test_arbitrary_bytes_never_raise_anything_but_manifest_error(lines):
    with _Dir() as d:
        p = d / "m.jsonl"
        data = b"\n".join(lines)
        p.write_bytes(data)
        try:
            load_manifest(p)
        except ManifestError as err:
            assert err.line is not None and 1 <= err.line <= data.count(b"\n") + 1, str(err)
            assert err.__cause__ is None


# ---------------------------------------------------------------- big inputs, one example each


def _write(tmp_path, objs) -> Path:
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(o if isinstance(o, str) else json.dumps(o, ensure_ascii=False) for o in objs) + "\n",
                 encoding="utf-8", errors="surrogatepass")
    return p


def test_huge_but_valid_fields_load(tmp_path):
    text = "\u05e9\u05dc\u05d5\u05dd \U0001f600 \u202e" * 100_000  # ~1 MB of RTL text, emoji, an RTL override
    caps = [{"start": float(i), "end": float(i) + 0.5, "text": f"line {i}"} for i in range(10_000)]
    p = _write(tmp_path, [{"video_id": "big", "path": "v.mp4", "split": "train", "captions": [
        {"start": 0, "end": 1, "text": text}]}, {"video_id": "many", "path": "w.mp4", "split": "val", "captions": caps}])
    big, many = load_manifest(p)
    assert big.captions[0].text == text and len(many.captions) == 10_000


@pytest.mark.parametrize("line, problem", [
    ('{"video_id": "' + "x" * 1_000_000 + '", "path": "p", "split": "nope"}', "split 'nope'"),
    ('{"video_id": "a", "path": "p", "split": "' + "y" * 1_000_000 + '"}', "is not one of"),
    ('{"video_id": "a", "path": "p", "split": "train", "duration": ' + "9" * 5000 + "}", "malformed JSON"),
    ('{"video_id": "a", "path": "p", "split": "train", "duration": 1' + "0" * 400 + "}", "too large"),
    ('{"video_id": "a", "path": "p", "split": "train", "captions": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "nested too deeply"),
    ('{"video_id": "a", "path": "p", "split": "train", "captions": [' + ",".join(["1"] * 10_000) + "]}",
     "captions[0] must be an object"),
    ('{"video_id": "a", "path": "p", "split": "train", "split": "test"}', "appears twice"),
    ('{"video_id": "a\\u0000", "path": "p", "split": "train"}', "NUL"),
    ('{"video_id": "a", "path": "p\\ud800", "split": "train"}', "lone surrogate"),
    ('{"video_id": "a", "path": "p", "split": "train", "captions": [{"start": 0, "end": NaN, "text": "x"}]}',
     "must be finite"),
    ('{"video_id": "a", "path": "p", "split": "train", "captions": [{"start": 0, "end": "NaN", "text": "x"}]}',
     "must be a number"),
    ('{"video_id": "a", "path": "p", "split": "train", "captions": [{"start": true, "end": 1, "text": "x"}]}',
     "must be a number"),
    ('{"video_id": "a", "path": "p", "split": "train",}', "malformed JSON"),
    ('"just a string"', "must be a JSON object, got string"),
    ("null", "must be a JSON object, got null"),
])
def test_pathological_lines(tmp_path, line, problem):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"video_id": "ok", "path": "p", "split": "train"}\r\n\r\n' + line.encode())
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    _assert_clean_error(err.value, p, 3)
    assert problem in str(err.value)


def test_invalid_utf8_names_line_and_column(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'\n{"video_id": "\xff", "path": "p", "split": "train"}\n')
    with pytest.raises(ManifestError, match=r":2: not valid UTF-8 \(byte b'\\xff' at column 15\)"):
        load_manifest(p)


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"video_id": "a", "path": "p", "split": "train"}\r\n \t\r\n\r\n'
                  b'{"video_id": "b", "path": "q", "split": "val"}\r\n')
    assert [(n, e.video_id) for n, e in iter_manifest(p)] == [(1, "a"), (4, "b")]


def test_line_numbers_count_newlines_only(tmp_path):
    # A lone CR or U+2028 inside a line is not a line break (text-mode iteration would count the CR).
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"video_id": "a", "path": "p", "split": "train"}\r \n'
                  + json.dumps({"video_id": "b", "path": "q", "split": "train", "captions": [
                      {"start": 0, "end": 1, "text": "x\u2028y\x85z"}]}, ensure_ascii=False).encode() + b"\n"
                  + b'{"video_id": "a", "path": "p", "split": "train"}\n')
    with pytest.raises(ManifestError, match=r":3: duplicate video_id 'a' \(first seen on line 1\)"):
        load_manifest(p)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- heavy versions (pytest -m faults)


@pytest.mark.faults
@MANY
@given(manifest_with_one_bad_line())
def test_faults_malformed_line_many(case):
    _check_bad(case)


@pytest.mark.faults
@MANY
@given(valid_manifest_bytes())
def test_faults_valid_lines_many(case):
    _check_valid(case)


@pytest.mark.faults
@MANY
@given(unique_entries, st.booleans())
def test_faults_round_trip_many(entries, relative):
    _check_roundtrip(entries, relative)
