import json

import pytest

from videolm.manifests.manifest import Caption, ManifestError, VideoEntry, load_manifest, write_manifest

GOOD = {"video_id": "v1", "path": "videos/v1.mp4", "split": "train", "duration": 5.0,
        "captions": [{"start": 0.0, "end": 2.5, "text": "a 3 moves left", "kind": "caption"}]}


def write_lines(tmp_path, lines):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


def test_loads_and_resolves_relative_paths(tmp_path):
    p = write_lines(tmp_path, [GOOD, "", {"video_id": "v2", "path": "/abs/v2.mp4", "split": "test"}])
    entries = load_manifest(p)
    assert [e.video_id for e in entries] == ["v1", "v2"]
    assert entries[0].path == str(tmp_path / "videos" / "v1.mp4")
    assert entries[1].path == "/abs/v2.mp4"
    assert entries[0].captions == (Caption(0.0, 2.5, "a 3 moves left", "caption"),)
    assert [e.video_id for e in load_manifest(p, split="test")] == ["v2"]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"video_id": "v9", "path": "x.mp4", "split": "train"', "malformed JSON"),
        ({"path": "x.mp4", "split": "train"}, "missing field 'video_id'"),
        ({"video_id": "v9", "split": "train"}, "missing field 'path'"),
        ({"video_id": "v9", "path": "x.mp4", "split": "dev"}, "split 'dev'"),
        ({**GOOD, "video_id": "v9", "captions": [{"start": 3, "end": 1, "text": "x"}]}, "end 1.0 < start 3.0"),
        ({**GOOD, "video_id": "v9", "captions": [{"start": 0, "text": "x"}]}, "missing 'end'"),
        ({**GOOD, "video_id": "v9", "captions": [{"start": "0", "end": 1, "text": "x"}]}, "must be a number"),
        ({**GOOD, "video_id": "v9", "captions": [{"start": -1, "end": 1, "text": "x"}]}, "negative"),
        ({**GOOD, "video_id": "v9", "duration": 0}, "duration must be positive"),
        ({**GOOD, "video_id": "v9", "captions": {"start": 0}}, "captions must be a list"),
        ({**GOOD, "video_id": "v9", "extra": 1}, "unknown field(s): extra"),
        ([1, 2], "must be a JSON object"),
        (GOOD, "duplicate video_id 'v1' (first seen on line 1)"),
    ],
)
def test_errors_name_file_line_and_problem(tmp_path, line, problem):
    p = write_lines(tmp_path, [GOOD, line])
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}:2: "), msg
    assert problem in msg
    assert err.value.line == 2


def test_error_names_video_id(tmp_path):
    p = write_lines(tmp_path, [{**GOOD, "split": "nope"}])
    with pytest.raises(ManifestError, match=r"video_id 'v1'"):
        load_manifest(p)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "none.jsonl")


def test_write_then_load_round_trip(tmp_path):
    entries = [VideoEntry("a", str(tmp_path / "vids" / "a.mp4"), "val", 3.5, (Caption(0.5, 1.0, "hi", "asr"),))]
    p = write_manifest(entries, tmp_path / "out" / "m.jsonl")
    assert json.loads(p.read_text())["path"] == "../vids/a.mp4"
    assert load_manifest(p) == entries


def test_example_manifest_in_repo_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "data_manifests" / "example.jsonl"
    entries = load_manifest(example)
    assert len(entries) >= 2 and {e.split for e in entries} <= {"train", "val", "test"}
