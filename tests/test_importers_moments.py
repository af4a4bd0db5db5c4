"""ActivityNet Captions, DiDeMo and TVR importers (videolm/manifests/importers/moments.py)."""

import json

import pytest
from test_importers import caps, imported, make_videos

from videolm.cli import main
from videolm.manifests.importers import ImporterError, run_import
from videolm.manifests.importers.moments import AFTER_END, DIDEMO_BAD_TIMES, DIDEMO_TIE, PAST_END, didemo_moment
from videolm.manifests.manifest import load_manifest

BAD_RANGE = "caption line with a negative or infinite time, or end < start"

# --------------------------------------------------------------------------- ActivityNet Captions

ANET_TRAIN = {
    "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 79.42]],
                      "sentences": ["A young woman is seen standing in a room. ", " She then dances around.",
                                    "She ends by bowing."]},
    "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 12.5], [30, 70.2], [64, 80], [20, 10]],
                      "sentences": ["A man opens a box.", "He pulls out a cake.", "past the end", "backwards"]},
    "v_nofile0001": {"duration": 10.0, "timestamps": [[0, 5]], "sentences": ["nobody downloaded this"]},
}
ANET_VAL = {"v_uqiMw7tQ1Cc": {"duration": 55.15, "timestamps": [[0.28, 55.15], [13.79, 54.32]],
                              "sentences": ["A weight lifting tutorial is given.", "The coach helps the guy."]},
            "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0, 1]], "sentences": ["also in train"]}}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_activitynet_timed_sentences_splits_and_clamping(tmp_path):
    train = write_json(tmp_path / "train.json", ANET_TRAIN)
    val = write_json(tmp_path / "val_1.json", ANET_VAL)
    # v_<id>.mp4 and the bare YouTube id (how many downloads name them) are both found
    make_videos(tmp_path / "videos", "v_QOlSCBRmfWY.mp4", "ehGHCYKzyZ8.mkv", "val/uqiMw7tQ1Cc.webm")
    summary, by_id, order = imported(tmp_path, "activitynet", train=train, val=val)
    assert order == ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8", "v_uqiMw7tQ1Cc"]
    first = by_id["v_QOlSCBRmfWY"]
    assert (first.split, first.duration) == ("train", 82.73)
    assert caps(first) == [(0.83, 19.86, "A young woman is seen standing in a room.", "caption"),
                           (17.37, 60.81, "She then dances around.", "caption"),
                           (56.26, 79.42, "She ends by bowing.", "caption")]
    second = by_id["v_ehGHCYKzyZ8"]
    assert second.path == str(tmp_path / "videos" / "ehGHCYKzyZ8.mkv")
    assert caps(second) == [(0.0, 12.5, "A man opens a box.", "caption"), (30.0, 61.72, "He pulls out a cake.", "caption")]
    assert by_id["v_uqiMw7tQ1Cc"].split == "val"
    assert summary.per_split == {"train": 2, "val": 1, "test": 0}
    assert summary.notes == {PAST_END: (1, ("v_ehGHCYKzyZ8#1",))}
    assert summary.skipped == {AFTER_END: (1, ("v_ehGHCYKzyZ8#2",)), BAD_RANGE: (1, ("v_ehGHCYKzyZ8#3",))}
    assert summary.dropped["duplicate id"] == (1, ("v_QOlSCBRmfWY",))  # val_1 repeating a train video
    assert [ids for r, (n, ids) in summary.dropped.items() if r.startswith("video file")] == [("v_nofile0001",)]


def test_activitynet_bad_files_name_file_and_video(tmp_path):
    path = tmp_path / "val_1.json"
    path.write_text('{"v_a": {"duration": 3,\n "timestamps": [[0, 1]] "sentences": []}}')
    with pytest.raises(ImporterError, match=r"val_1\.json:2: malformed JSON"):
        run_import("activitynet", tmp_path / "m.jsonl", tmp_path, keep_missing=True, val=path)
    write_json(path, [{"v_a": {}}])
    with pytest.raises(ImporterError, match=r"val_1\.json: expected an object \{video id"):
        run_import("activitynet", tmp_path / "m.jsonl", tmp_path, keep_missing=True, val=path)
    write_json(path, {"v_a": {"duration": 3, "timestamps": [[0, 1], [1, 2]], "sentences": ["one"]}})
    with pytest.raises(ImporterError, match=r"val_1\.json: video 'v_a': 'timestamps' and 'sentences' have "
                                            r"different lengths \(2, 1\)"):
        run_import("activitynet", tmp_path / "m.jsonl", tmp_path, keep_missing=True, val=path)
    write_json(path, {"v_a": {"duration": 3, "sentences": ["one"]}})
    with pytest.raises(ImporterError, match=r"video 'v_a': 'timestamps' is missing"):
        run_import("activitynet", tmp_path / "m.jsonl", tmp_path, keep_missing=True, val=path)
    with pytest.raises(ImporterError, match="give at least one of --train, --val, --test"):
        run_import("activitynet", tmp_path / "m.jsonl", tmp_path, keep_missing=True)
    with pytest.raises(ImporterError, match=r"--test .*nope\.json: no such file"):
        run_import("activitynet", tmp_path / "m.jsonl", tmp_path, keep_missing=True, test=tmp_path / "nope.json")
    assert not (tmp_path / "m.jsonl").exists()


def test_activitynet_unknown_duration_and_bad_pairs(tmp_path):
    path = write_json(tmp_path / "train.json", {"v_b": {"duration": "?", "timestamps": [[0, 500], [3], "x"],
                                                        "sentences": ["kept unclamped", "one number", "a string"]}})
    summary, by_id, _ = imported(tmp_path, "activitynet", train=path, keep_missing=True)
    assert by_id["v_b"].duration is None and caps(by_id["v_b"]) == [(0.0, 500.0, "kept unclamped", "caption")]
    assert summary.skipped == {"caption line without a [start, end] time pair": (2, ("v_b#1", "v_b#2"))}
    assert summary.notes == {"no positive 'duration': spans are not clamped": (1, ("v_b",))}


# --------------------------------------------------------------------------- DiDeMo

DIDEMO_VAL = [
    {"annotation_id": 1, "video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "the dog jumps",
     "times": [[2, 2], [2, 2], [2, 3], [1, 2]], "dl_link": "https://example.invalid/1"},
    {"annotation_id": 2, "video": "10015567@N08_3655084291_d8b58466fa.mov", "description": "camera pans left",
     "times": [[0, 0], [0, 1], [4, 5], [1, 1]], "num_segments": 6},  # all differ: tie
    {"annotation_id": 3, "video": "12345@N00_987_abc.mp4", "description": "a red car",
     "times": [[5, 5], [5, 9], [3, 2], [5, 5]]},
    {"annotation_id": 4, "video": "12345@N00_987_abc.mp4", "description": "no valid pair",
     "times": [[6, 6], [2, 1], "x"]},
    {"annotation_id": 5, "video": "12345@N00_987_abc.mp4", "description": "  ", "times": [[0, 0]]},
]


def test_didemo_moments_in_seconds_with_consensus(tmp_path):
    val = write_json(tmp_path / "val_data.json", DIDEMO_VAL)
    test = write_json(tmp_path / "test_data.json", [{"video": "77@N01_1_x.m4v", "description": "waves",
                                                      "times": [[0, 5]] * 4}])
    # the annotation's own file name (.mov, not an extension the id search knows), a converted .mp4 in a subfolder,
    # and a .m4v original
    make_videos(tmp_path / "videos", "10015567@N08_3655084291_d8b58466fa.mov", "mp4/12345@N00_987_abc.mp4",
                "77@N01_1_x.m4v")
    summary, by_id, order = imported(tmp_path, "didemo", val=val, test=test)
    assert order == ["10015567@N08_3655084291_d8b58466fa", "12345@N00_987_abc", "77@N01_1_x"]
    dog = by_id["10015567@N08_3655084291_d8b58466fa"]
    assert dog.path == str(tmp_path / "videos" / "10015567@N08_3655084291_d8b58466fa.mov")
    assert (dog.split, dog.duration) == ("val", None)
    # [2,2] chosen by two annotators -> 10-15 s; the 4-way tie -> [0,1] overlaps the others most -> 0-10 s
    assert caps(dog) == [(10.0, 15.0, "the dog jumps", "caption"), (0.0, 10.0, "camera pans left", "caption")]
    car = by_id["12345@N00_987_abc"]
    assert car.path == str(tmp_path / "videos" / "mp4" / "12345@N00_987_abc.mp4")
    assert caps(car) == [(25.0, 30.0, "a red car", "caption")]  # invalid pairs ignored
    assert caps(by_id["77@N01_1_x"]) == [(0.0, 30.0, "waves", "caption")] and by_id["77@N01_1_x"].split == "test"
    assert summary.notes == {DIDEMO_TIE: (1, ("10015567@N08_3655084291_d8b58466fa#2",))}
    assert summary.skipped == {DIDEMO_BAD_TIMES: (1, ("12345@N00_987_abc#4",)),
                               "caption line with empty text": (1, ("12345@N00_987_abc#5",))}


def test_didemo_moment_rule():
    assert didemo_moment([[1, 1], [1, 1], [3, 3], [3, 3]]) == ((1, 1), True)  # tie, no overlap: the earliest
    assert didemo_moment([[0, 2], [2, 4], [2, 2]]) == ((2, 2), True)  # inside both others
    assert didemo_moment([[4, 4]] * 3 + [[0, 5]]) == ((4, 4), False)
    assert didemo_moment([[True, 1], [1.0, 2.0]]) == (None, False) and didemo_moment(None) == (None, False)


def test_didemo_bad_file(tmp_path):
    path = write_json(tmp_path / "train_data.json", {"video": "a.mp4"})
    with pytest.raises(ImporterError, match=r"train_data\.json: expected a list of annotations"):
        run_import("didemo", tmp_path / "m.jsonl", tmp_path, keep_missing=True, train=path)
    write_json(path, [{"video": "a.mp4", "description": "ok", "times": [[0, 0]]}, {"description": "no video"}])
    with pytest.raises(ImporterError, match=r"train_data\.json: \[1\] must be an object with a string 'video'"):
        run_import("didemo", tmp_path / "m.jsonl", tmp_path, keep_missing=True, train=path)


# --------------------------------------------------------------------------- TVR


def tvr_line(desc_id, vid, desc, ts, duration=61.5, kind="v"):
    obj = {"desc_id": desc_id, "desc": desc, "vid_name": vid, "duration": duration, "type": kind}
    if ts is not None:
        obj["ts"] = ts
    return json.dumps(obj)


def test_tvr_queries_joined_with_subtitles(tmp_path):
    train = tmp_path / "tvr_train_release.jsonl"
    train.write_text("\n".join([
        tvr_line(1, "friends_s01e01_seg02_clip_00", "Rachel walks into the coffee house.", [12.3, 20.1]),
        tvr_line(2, "met_s02e03_seg01_clip_01", "Ted points at the bar.", [50.0, 70.0], duration=60.0, kind="vt"),
        "{not json",
        json.dumps({"desc": "no vid_name"}),
        tvr_line(3, "friends_s01e01_seg02_clip_00", "Monica laughs.", [3, 5.5], kind="t"),
        tvr_line(4, "friends_s01e01_seg02_clip_00", "broken span", [5, 1]),
    ]) + "\n")
    test = tmp_path / "tvr_test_public_release.jsonl"
    test.write_text(tvr_line(9, "castle_s01e01_seg01_clip_00", "Castle signs a book.", None) + "\n")
    subs = tmp_path / "tvqa_preprocessed_subtitles.jsonl"
    subs.write_text("\n".join(json.dumps({"vid_name": v, "sub": s}) for v, s in [
        ("friends_s01e01_seg02_clip_00", [{"text": "(Rachel:) Hi!", "start": 12.0, "end": 13.4}]),
        ("castle_s01e01_seg01_clip_00", [{"text": "(Castle:) Thanks.", "start": 1.0, "end": 2.0}]),
        ("bbt_s01e01_seg01_clip_00", [{"text": "(Sheldon:) Bazinga.", "start": 0.0, "end": 1.0}]),
    ]) + "\n")
    make_videos(tmp_path / "videos", "friends_s01e01_seg02_clip_00.mp4", "met_s02e03_seg01_clip_01.mp4",
                "castle_s01e01_seg01_clip_00.mp4")
    summary, by_id, order = imported(tmp_path, "tvr", train=train, test=test, subtitles=subs)
    assert order == ["friends_s01e01_seg02_clip_00", "met_s02e03_seg01_clip_01", "castle_s01e01_seg01_clip_00"]
    friends = by_id["friends_s01e01_seg02_clip_00"]
    assert (friends.split, friends.duration) == ("train", 61.5)
    assert caps(friends) == [(12.3, 20.1, "Rachel walks into the coffee house.", "caption"),
                             (3.0, 5.5, "Monica laughs.", "caption"), (12.0, 13.4, "(Rachel:) Hi!", "subtitle")]
    assert caps(by_id["met_s02e03_seg01_clip_01"]) == [(50.0, 60.0, "Ted points at the bar.", "caption")]
    castle = by_id["castle_s01e01_seg01_clip_00"]  # test_public: no moment, subtitles only
    assert castle.split == "test" and caps(castle) == [(1.0, 2.0, "(Castle:) Thanks.", "subtitle")]
    skipped = summary.skipped
    assert skipped["malformed JSON line"][1][0].startswith(f"{train}:3 (")
    assert skipped["line without a string 'vid_name'"] == (1, (f"{train}:4",))
    assert skipped[BAD_RANGE] == (1, (f"friends_s01e01_seg02_clip_00 ({train}:6)",))
    assert skipped["query without 'ts' (no moment: tvr_test_public has none)"] == (
        1, (f"castle_s01e01_seg01_clip_00 ({test}:1)",))
    assert summary.notes[PAST_END] == (1, (f"met_s02e03_seg01_clip_01 ({train}:2)",))
    assert summary.notes["subtitled clip without a TVR query in the files given: not written"] == (
        1, ("bbt_s01e01_seg01_clip_00",))


def test_tvr_without_subtitles_and_errors(tmp_path):
    val = tmp_path / "tvr_val_release.jsonl"
    val.write_text(tvr_line(1, "house_s01e01_seg01_clip_00", "House limps.", [0, 4]) + "\n"
                   + tvr_line(2, "house_s01e01_seg01_clip_00", "Wilson sighs.", [4, 8], duration=70.0) + "\n")
    summary, by_id, _ = imported(tmp_path, "tvr", val=val, keep_missing=True)
    house = by_id["house_s01e01_seg01_clip_00"]
    assert (house.split, house.duration, len(house.captions)) == ("val", 61.5, 2)
    assert summary.notes == {"queries of one clip disagree on 'duration': the first is kept":
                             (1, (f"house_s01e01_seg01_clip_00 ({val}:2)",))}
    val.write_bytes(b'{"vid_name": "a", "desc": "ok", "ts": [0, 1]}\n\xff\xfe\n')
    with pytest.raises(ImporterError, match=r"tvr_val_release\.jsonl:2: not UTF-8 text"):
        run_import("tvr", tmp_path / "m.jsonl", tmp_path, keep_missing=True, val=val)
    with pytest.raises(ImporterError, match=r"--subtitles .*nope\.jsonl: no such file"):
        run_import("tvr", tmp_path / "m.jsonl", tmp_path, keep_missing=True, val=val,
                   subtitles=tmp_path / "nope.jsonl")


def test_cli_imports_each_split_file(tmp_path, capsys):
    train = write_json(tmp_path / "train.json", ANET_TRAIN)
    val = write_json(tmp_path / "val_2.json", {"v_uqiMw7tQ1Cc": ANET_VAL["v_uqiMw7tQ1Cc"]})
    out = tmp_path / "anet.jsonl"
    rc = main(["import", "activitynet", "--train", str(train), "--val", str(val), "--videos", str(tmp_path / "v"),
               "--out", str(out), "--keep-missing"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[0].startswith(f"import activitynet: wrote 4 videos with 8 captions to {out}")
    assert lines[0].endswith("(train 3, val 1)")
    assert {e.split for e in load_manifest(out)} == {"train", "val"}
    rc = main(["import", "didemo", "--videos", str(tmp_path), "--out", str(out)])
    assert rc == 2 and "give at least one of --train, --val, --test (DiDeMo" in capsys.readouterr().err
