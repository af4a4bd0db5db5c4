import io
import json
import pickle

import numpy as np
import pytest
from conftest import write_test_video

from videolm.cli import main
from videolm.manifests.importers import IMPORTERS, ImporterError, run_import
from videolm.manifests.importers.json_stream import iter_object
from videolm.manifests.manifest import Caption, load_manifest


def make_videos(root, *names):
    """Empty files: the importers only check that a video exists (duration probing aside)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return root


def imported(tmp_path, fmt, videos=None, **kw):
    """run_import into tmp_path/out/m.jsonl; returns the summary and {id: entry} as load_manifest reads it."""
    out = tmp_path / "out" / "m.jsonl"
    summary = run_import(fmt, out, videos if videos is not None else tmp_path / "videos", **kw)
    entries = load_manifest(out)
    return summary, {e.video_id: e for e in entries}, [e.video_id for e in entries]


def caps(entry):
    return [(c.start, c.end, c.text, c.kind) for c in entry.captions]


def dropped_ids(summary, reason_start):
    return {r: ids for r, (n, ids) in summary.dropped.items() if r.startswith(reason_start)}


# --------------------------------------------------------------------------- MSR-VTT

MSRVTT = {
    "info": {"year": 2016},
    "videos": [
        {"video_id": "video0", "start time": 10.0, "end time": 22.5, "split": "train", "id": 0, "category": 9},
        {"video_id": "video1", "start time": 0.0, "end time": 8.0, "split": "validate", "id": 1},
        {"video_id": "video2", "start time": 3.0, "end time": 13.0, "split": "test", "id": 2},
        {"video_id": "video3", "start time": 0.0, "end time": 5.0, "split": "train", "id": 3},  # no sentences
        {"video_id": "video4", "start time": 0.0, "end time": 5.0, "split": "test", "id": 4},  # no file
        {"video_id": "video0", "start time": 0.0, "end time": 1.0, "split": "test", "id": 5},  # duplicate
    ],
    "sentences": [
        {"video_id": "video0", "caption": "a man is cooking", "sen_id": 2},
        {"video_id": "video0", "caption": "someone cooks pasta", "sen_id": 0},
        {"video_id": "video2", "caption": "a Dog runs  on the beach", "sen_id": 5},
        {"video_id": "video2", "caption": "a puppy plays", "sen_id": 6},
        {"video_id": "video1", "caption": "cars race", "sen_id": 7},
        {"video_id": "video4", "caption": "nothing to see", "sen_id": 8},
    ],
}


def msrvtt_files(tmp_path):
    ann = tmp_path / "MSRVTT_data.json"
    ann.write_text(json.dumps(MSRVTT))
    make_videos(tmp_path / "videos", "video0.mp4", "video1.webm", "sub/video2.mp4", "video3.mp4")
    return ann


def test_msrvtt_splits_from_annotations(tmp_path):
    ann = msrvtt_files(tmp_path)
    summary, by_id, order = imported(tmp_path, "msrvtt", annotations=ann)
    assert order == ["video0", "video1", "video2"]
    assert {v: e.split for v, e in by_id.items()} == {"video0": "train", "video1": "val", "video2": "test"}
    # whole-video captions in sen_id order, spanning end time - start time
    assert caps(by_id["video0"]) == [(0.0, 12.5, "someone cooks pasta", "caption"),
                                     (0.0, 12.5, "a man is cooking", "caption")]
    assert by_id["video0"].duration == 12.5
    assert by_id["video1"].path == str(tmp_path / "videos" / "video1.webm")
    assert by_id["video2"].path == str(tmp_path / "videos" / "sub" / "video2.mp4")
    assert summary.written == 3 and summary.captions == 5
    assert summary.per_split == {"train": 1, "val": 1, "test": 1}
    assert summary.dropped["no captions"] == (1, ("video3",))
    assert summary.dropped["duplicate id"] == (1, ("video0",))
    assert list(dropped_ids(summary, "video file not found").values()) == [("video4",)]


def test_msrvtt_split_csvs_and_jsfusion_query(tmp_path):
    ann = msrvtt_files(tmp_path)
    make_videos(tmp_path / "videos", "video4.mp4")
    train = tmp_path / "MSRVTT_train.9k.csv"
    train.write_text("video_id\nvideo0\nvideo1\nvideo9\n")
    test = tmp_path / "MSRVTT_JSFUSION_test.csv"
    test.write_text("key,vid_key,video_id,sentence\n"
                    "ret0,msr2,video2,A dog runs on the beach.\n"  # same words up to case/spaces/punctuation: marked
                    "ret1,msr4,video4,a quiet street at night\n")  # not among its sentences: added
    summary, by_id, order = imported(tmp_path, "msrvtt", annotations=ann, train_csv=train, test_csv=test)
    assert order == ["video0", "video1", "video2", "video4"]
    assert {v: e.split for v, e in by_id.items()} == {"video0": "train", "video1": "train", "video2": "test",
                                                      "video4": "test"}
    assert caps(by_id["video2"]) == [(0.0, 10.0, "a Dog runs  on the beach", "query"),
                                     (0.0, 10.0, "a puppy plays", "caption")]
    assert caps(by_id["video4"]) == [(0.0, 5.0, "nothing to see", "caption"),
                                     (0.0, 5.0, "a quiet street at night", "query")]
    assert summary.dropped["not in any split CSV"] == (1, ("video3",))
    assert summary.dropped["in a split CSV but not in the annotations"] == (1, ("video9",))


def test_msrvtt_bad_annotation_file_is_one_clear_line(tmp_path):
    ann = tmp_path / "MSRVTT_data.json"
    ann.write_text('{"videos": [\n{"video_id": "video0",}\n]}')
    with pytest.raises(ImporterError, match=r"MSRVTT_data\.json:2: malformed JSON"):
        run_import("msrvtt", tmp_path / "m.jsonl", tmp_path, annotations=ann)
    ann.write_text(json.dumps({"videos": [{"video_id": "v", "split": "dev"}], "sentences": []}))
    with pytest.raises(ImporterError, match=r"videos\[0\] \(v\): 'split' 'dev'"):
        run_import("msrvtt", tmp_path / "m.jsonl", tmp_path, annotations=ann)
    with pytest.raises(ImporterError, match="--annotations .*no such file"):
        run_import("msrvtt", tmp_path / "m.jsonl", tmp_path, annotations=tmp_path / "nope.json")


# --------------------------------------------------------------------------- YouCook2


def test_youcook2_timed_segments(tmp_path):
    ann = tmp_path / "youcookii_annotations_trainval.json"
    ann.write_text(json.dumps({"database": {
        "GLd3aX16zBg": {"subset": "training", "recipe_type": "113", "duration": 241.62, "annotations": [
            {"id": 0, "segment": [90, 102], "sentence": "spread margarine on two slices of white bread"},
            {"id": 1, "segment": [114, 110], "sentence": "backwards segment"},
            {"id": 2, "segment": [114, 127.5], "sentence": "place a slice of cheese on the bread"}]},
        "xHr8X2Wpmno": {"subset": "validation", "duration": 120, "annotations": [
            {"id": 0, "segment": [5, 9], "sentence": "crack the eggs"}]},
    }}))
    # videos in YouCook2's own layout: <subset>/<recipe_type>/<id>.<ext>; mp4 preferred over mkv
    make_videos(tmp_path / "videos", "training/113/GLd3aX16zBg.mkv", "training/113/GLd3aX16zBg.mp4",
                "validation/201/xHr8X2Wpmno.webm")
    summary, by_id, order = imported(tmp_path, "youcook2", annotations=ann)
    assert order == ["GLd3aX16zBg", "xHr8X2Wpmno"]
    g = by_id["GLd3aX16zBg"]
    assert (g.split, g.duration, g.path) == ("train", 241.62, str(tmp_path / "videos/training/113/GLd3aX16zBg.mp4"))
    assert caps(g) == [(90.0, 102.0, "spread margarine on two slices of white bread", "caption"),
                       (114.0, 127.5, "place a slice of cheese on the bread", "caption")]
    assert by_id["xHr8X2Wpmno"].split == "val"
    assert summary.skipped == {"caption line with a negative or infinite time, or end < start": (1, ("GLd3aX16zBg#1",))}


# --------------------------------------------------------------------------- HowTo100M


def tricky_captions(n=40):
    """HowTo100M-shaped data with everything a naive splitter gets wrong."""
    rng = np.random.default_rng(0)
    texts = ['he said "stir it" then {left}', "ünïcödé 日本語 😀", "braces } { ] [ , : inside", "back\\slash \\\"",
             "tab\tand\nnewline", "a\u2028b", "plain words here"]
    data = {}
    for i in range(n):
        vid = f'vid{i:03d}' if i % 9 else f'v"{i}"{{}}é😀'
        k = int(rng.integers(1, 6))
        starts = sorted(round(float(x), 2) for x in rng.uniform(0, 100, k))
        data[vid] = {"start": starts, "end": [s + 1.5 for s in starts],
                     "text": [texts[(i + j) % len(texts)] for j in range(k)]}
    return data


@pytest.mark.parametrize("indent", [None, 3])
def test_stream_parser_equals_json_load_at_any_chunk_size(indent):
    data = tricky_captions()
    raw = (" \n" + json.dumps(data, indent=indent, ensure_ascii=indent is None) + "\n").encode()
    reference = json.loads(raw)
    for chunk in (1, 2, 3, 5, 7, 64, 1 << 20):  # 1-7 bytes: boundaries fall inside strings and numbers
        assert list(iter_object(io.BytesIO(raw), "c.json", chunk)) == list(reference.items()), chunk


def test_howto100m_streamed_import_equals_json_load_reference(tmp_path):
    data = tricky_captions()
    src = tmp_path / "caption.json"
    src.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    summary, by_id, order = imported(tmp_path, "howto100m", captions=src, keep_missing=True, chunk_size=7)
    reference = json.loads(src.read_text(encoding="utf-8"))
    assert order == list(reference)
    for vid, v in reference.items():
        assert caps(by_id[vid]) == [(s, e, t, "asr") for s, e, t in zip(v["start"], v["end"], v["text"])]
        assert by_id[vid].split == "train" and by_id[vid].path == str(tmp_path / "videos" / f"{vid}.mp4")
    assert summary.written == len(reference) and not summary.skipped


def test_howto100m_bad_lines_skipped_and_named(tmp_path):
    src = tmp_path / "caption.json"
    src.write_text(json.dumps({
        "a": {"start": [0, 5, 2, "7", 1, 3], "end": [2, 4, 3, 8, 2, 4], "text": ["ok", "back", " ", "str", True, "ok2"]},
        "b": {"start": [1], "end": [0], "text": ["only bad line"]},
    }))
    summary, by_id, _ = imported(tmp_path, "howto100m", captions=src, keep_missing=True, default_split="val")
    assert caps(by_id["a"]) == [(0.0, 2.0, "ok", "asr"), (3.0, 4.0, "ok2", "asr")]
    assert by_id["a"].split == "val"
    assert summary.skipped == {
        "caption line with a negative or infinite time, or end < start": (2, ("a#1", "b#0")),
        "caption line with empty text": (2, ("a#2", "a#4")),
        "caption line with a non-numeric time": (1, ("a#3",)),
    }
    assert summary.dropped == {"no captions": (1, ("b",))}


def test_howto100m_malformed_file_names_offset_and_video(tmp_path):
    src = tmp_path / "caption.json"
    raw = '{"v1": {"start": [0], "end": [1], "text": ["é"]},\n "v2": {"start": [0], "end": [1] "text": []}}'
    src.write_text(raw, encoding="utf-8")
    offset = len(raw[:raw.index('"text": []')].encode())  # the byte offset json.loads reports (+1 for the é)
    with pytest.raises(ImporterError, match=rf"caption\.json: malformed JSON at byte {offset} in the entry of video "
                                            r"'v2': Expecting ',' delimiter"):
        run_import("howto100m", tmp_path / "m.jsonl", tmp_path, keep_missing=True, captions=src, chunk_size=4)
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "m.jsonl.tmp").exists()
    src.write_text('{"v1": {"start": [0], "end": [1]}}')
    with pytest.raises(ImporterError, match=r"video 'v1': 'text' is missing"):
        run_import("howto100m", tmp_path / "m.jsonl", tmp_path, keep_missing=True, captions=src)


def test_howto100m_pickle_needs_trust(tmp_path):
    src = tmp_path / "caption.pickle"
    with open(src, "wb") as f:
        pickle.dump({"p1": {"start": np.array([0.0, 4.0]), "end": np.array([3.5, 6.0]),
                            "text": np.array(["first line", "second line"])}}, f)
    with pytest.raises(ImporterError, match="can run arbitrary code.*--trust-pickle only for a file you trust"):
        run_import("howto100m", tmp_path / "m.jsonl", tmp_path, keep_missing=True, captions=src)
    summary, by_id, _ = imported(tmp_path, "howto100m", captions=src, keep_missing=True, trust_pickle=True)
    assert caps(by_id["p1"]) == [(0.0, 3.5, "first line", "asr"), (4.0, 6.0, "second line", "asr")]


# --------------------------------------------------------------------------- WebVid


def test_webvid_page_dir_paths_and_iso_durations(tmp_path):
    src = tmp_path / "results_2M_train.csv"
    src.write_text("videoid,contentUrl,duration,page_dir,name\n"
                   "1001,https://example.invalid/1001.mp4,PT00H00M11S,001001_001050,\"Aerial shot, of a lake\"\n"
                   "1002,https://example.invalid/1002.mp4,PT00H01M02S,001001_001050,Time lapse of clouds\n"
                   "1003,https://example.invalid/1003.mp4,PT00H00M20S,001051_001100,Missing clip\n"
                   "1004,https://example.invalid/1004.mp4,PT00H00M07S,001051_001100,\n"
                   "1001,https://example.invalid/1001.mp4,PT00H00M11S,001001_001050,duplicate row\n")
    # 1002 sits flat under --videos instead of in its page_dir: found by id
    make_videos(tmp_path / "videos", "001001_001050/1001.mp4", "1002.mp4", "001051_001100/1004.mp4")
    summary, by_id, order = imported(tmp_path, "webvid", csv=src, default_split="val")
    assert order == ["1001", "1002"]
    assert by_id["1001"].path == str(tmp_path / "videos" / "001001_001050" / "1001.mp4")
    assert by_id["1002"].path == str(tmp_path / "videos" / "1002.mp4")
    assert caps(by_id["1001"]) == [(0.0, 11.0, "Aerial shot, of a lake", "caption")]
    assert (by_id["1002"].duration, by_id["1002"].split) == (62.0, "val")
    assert summary.dropped["no captions"] == (1, ("1004",))
    assert summary.dropped["duplicate id"] == (1, ("1001",))
    assert list(dropped_ids(summary, "video file not found").values()) == [("1003",)]
    # kept: the expected location is the page_dir path
    _, by_id, _ = imported(tmp_path, "webvid", csv=src, keep_missing=True)
    assert by_id["1003"].path == str(tmp_path / "videos" / "001051_001100" / "1003.mp4")
    assert caps(by_id["1003"]) == [(0.0, 20.0, "Missing clip", "caption")]


# --------------------------------------------------------------------------- TVQA subtitles


def test_tvsub_bad_line_reported_and_skipped(tmp_path):
    src = tmp_path / "tvqa_subtitles.jsonl"
    src.write_text(
        json.dumps({"vid_name": "s01e01_seg02_clip_00", "sub": [
            {"text": "(Sheldon:) Hello.", "start": 0.5, "end": 1.8},
            {"text": "(Leonard:) Hi.", "start": 2.0, "end": 1.0}]}) + "\n"
        + '{"vid_name": "broken", "sub": [\n'
        + "\n"
        + json.dumps({"sub": []}) + "\n"
        + json.dumps({"vid_name": "met_s02e03_seg01_clip_01", "sub": [{"text": "Kids...", "start": 3, "end": 4.25}]})
        + "\n")
    make_videos(tmp_path / "videos", "s01e01_seg02_clip_00.mp4", "met_s02e03_seg01_clip_01.mp4")
    summary, by_id, order = imported(tmp_path, "tvsub", subtitles=src)
    assert order == ["s01e01_seg02_clip_00", "met_s02e03_seg01_clip_01"]
    assert caps(by_id["s01e01_seg02_clip_00"]) == [(0.5, 1.8, "(Sheldon:) Hello.", "subtitle")]
    assert caps(by_id["met_s02e03_seg01_clip_01"]) == [(3.0, 4.25, "Kids...", "subtitle")]
    (n, first), = [v for r, v in summary.skipped.items() if r == "malformed JSON line"]
    assert n == 1 and first[0].startswith(f"{src}:2 (")
    assert summary.skipped["line without a string 'vid_name' and a list 'sub'"] == (1, (f"{src}:4",))


# --------------------------------------------------------------------------- generic CSV


def test_csv_with_times_paths_and_splits(tmp_path):
    src = tmp_path / "captions.csv"
    src.write_text("clip,sentence,file,t0,t1,part\n"
                   "c1,first thing,clips/one.mp4,0.5,2,train\n"
                   "c2,other clip,/nonexistent/abs.mp4,1,3,Validation\n"
                   "c1,second thing,,2.5,4.0,train\n"
                   "c1,bad time,,x,4.0,train\n"
                   "c3,no split given,,0,1,\n")
    make_videos(tmp_path / "videos", "clips/one.mp4", "c3.mkv")
    summary, by_id, order = imported(tmp_path, "csv", csv=src, id_col="clip", text_col="sentence", path_col="file",
                                     start_col="t0", end_col="t1", split_col="part", default_split="test",
                                     keep_missing=True)
    assert order == ["c1", "c2", "c3"]
    assert by_id["c1"].path == str(tmp_path / "videos" / "clips" / "one.mp4")
    assert caps(by_id["c1"]) == [(0.5, 2.0, "first thing", "caption"), (2.5, 4.0, "second thing", "caption")]
    assert (by_id["c2"].split, by_id["c2"].path) == ("val", "/nonexistent/abs.mp4")
    assert (by_id["c3"].split, by_id["c3"].path) == ("test", str(tmp_path / "videos" / "c3.mkv"))
    assert summary.skipped == {"caption line with a non-numeric time": (1, (f"c1 ({src}:5)",))}


def test_csv_whole_video_captions_get_probed_duration(tmp_path):
    src = tmp_path / "captions.csv"
    src.write_text("id,text\nreal,a bright square slides right\nempty,a file that is not a video\n"
                   "gone,kept although missing\nreal,a second description\n")
    videos = make_videos(tmp_path / "videos", "empty.mp4")
    write_test_video(videos / "real.mp4", n_frames=30, fps=25)
    summary, by_id, _ = imported(tmp_path, "csv", csv=src, id_col="id", text_col="text", kind="query",
                                 keep_missing=True)
    real = by_id["real"]
    assert real.duration == pytest.approx(1.2, abs=0.05)
    assert caps(real) == [(0.0, real.duration, "a bright square slides right", "query"),
                          (0.0, real.duration, "a second description", "query")]
    for vid in ("empty", "gone"):  # unreadable or missing: unknown duration, span 0-0
        assert by_id[vid].duration is None and by_id[vid].captions[0] == Caption(0.0, 0.0, by_id[vid].captions[0].text,
                                                                                 "query")
    (n, first), = summary.notes.values()
    assert (n, first) == (2, ("empty", "gone"))


def test_csv_missing_column_names_the_columns_it_has(tmp_path):
    src = tmp_path / "c.csv"
    src.write_text("video,caption\nv1,hello\n")
    with pytest.raises(ImporterError, match=r"c\.csv: no column 'id'; the file's columns are 'video', 'caption'"):
        run_import("csv", tmp_path / "m.jsonl", tmp_path, csv=src, id_col="id", text_col="caption")
    with pytest.raises(ImporterError, match="--start-col and --end-col go together"):
        run_import("csv", tmp_path / "m.jsonl", tmp_path, csv=src, id_col="video", text_col="caption",
                   start_col="caption")


# --------------------------------------------------------------------------- common rules and the CLI


def test_missing_videos_dropped_or_kept(tmp_path):
    src = tmp_path / "caption.json"
    src.write_text(json.dumps({f"v{i}": {"start": [0], "end": [1], "text": ["hi"]} for i in range(4)}))
    make_videos(tmp_path / "videos", "v1.mp4", "v3.avi", "notes.txt")
    summary, by_id, _ = imported(tmp_path, "howto100m", captions=src)
    assert sorted(by_id) == ["v1", "v3"]
    assert list(dropped_ids(summary, "video file not found").values()) == [("v0", "v2")]
    summary, by_id, _ = imported(tmp_path, "howto100m", captions=src, keep_missing=True)
    assert sorted(by_id) == ["v0", "v1", "v2", "v3"] and not summary.dropped
    assert by_id["v0"].path == str(tmp_path / "videos" / "v0.mp4")


def test_zero_written_is_exit_2_with_the_reason(tmp_path, capsys):
    src = tmp_path / "caption.json"
    src.write_text(json.dumps({f"v{i}": {"start": [0], "end": [1], "text": ["hi"]} for i in range(1000)}))
    (tmp_path / "videos").mkdir()
    out = tmp_path / "m.jsonl"
    rc = main(["import", "howto100m", "--captions", str(src), "--videos", str(tmp_path / "videos"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == (f"videolm import: error: none of the 1,000 videos were found under {tmp_path / 'videos'} "
                           f"(looked for <id>.mp4/.webm/.mkv/.avi); use --keep-missing to write them anyway")
    assert not out.exists() and not (tmp_path / "m.jsonl.tmp").exists()
    rc = main(["import", "howto100m", "--captions", str(src), "--videos", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 2 and "no such folder" in capsys.readouterr().err


def test_zero_written_messages_name_the_cause(tmp_path):
    src = tmp_path / "results.csv"
    src.write_text("videoid,name,page_dir,duration\n7,a clip,000001_000050,PT5S\n8,,000001_000050,PT5S\n")
    make_videos(tmp_path / "videos")
    with pytest.raises(ImporterError, match=r"none of the 1 videos were found under .*\.avi, and the paths the input "
                                            r"names\); use --keep-missing to write them anyway; also dropped: 1 no captions"):
        run_import("webvid", tmp_path / "m.jsonl", tmp_path / "videos", csv=src)
    subs = tmp_path / "subs.jsonl"
    subs.write_text("not json\n" + json.dumps({"vid_name": "c1", "sub": [{"text": "", "start": 0, "end": 1}]}) + "\n")
    with pytest.raises(ImporterError, match=r"no videos written from .*subs\.jsonl: dropped 1 no captions"):
        run_import("tvsub", tmp_path / "m.jsonl", tmp_path / "videos", subtitles=subs)
    subs.write_text("not json\n")
    with pytest.raises(ImporterError, match=r"subs\.jsonl holds no usable videos \(skipped 1 malformed JSON line\)"):
        run_import("tvsub", tmp_path / "m.jsonl", tmp_path / "videos", subtitles=subs)
    assert not (tmp_path / "m.jsonl").exists()


def test_cli_prints_the_summary(tmp_path, capsys):
    ann = msrvtt_files(tmp_path)
    out = tmp_path / "data" / "msrvtt.jsonl"
    rc = main(["import", "msrvtt", "--annotations", str(ann), "--videos", str(tmp_path / "videos"), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert lines[0].startswith(f"import msrvtt: wrote 3 videos with 5 captions to {out} in ")
    assert lines[0].endswith("(train 1, val 1, test 1)")
    assert "import msrvtt: dropped 1: no captions (first: video3)" in lines
    assert "import msrvtt: dropped 1: duplicate id (first: video0)" in lines
    assert json.loads(out.read_text().splitlines()[0])["path"] == "../videos/video0.mp4"  # relative to the manifest
    assert len(load_manifest(out)) == 3


def test_run_import_rejects_unknown_format_and_options(tmp_path):
    assert list(IMPORTERS) == ["msrvtt", "youcook2", "howto100m", "webvid", "tvsub", "activitynet", "didemo", "tvr",
                              "csv", "webdataset"]
    with pytest.raises(ImporterError, match="unknown format 'vatex'"):
        run_import("vatex", tmp_path / "m.jsonl", tmp_path)
    with pytest.raises(ImporterError, match="has no option.*captionz"):
        run_import("howto100m", tmp_path / "m.jsonl", tmp_path, captionz="x")
    with pytest.raises(ImporterError, match="needs --captions"):
        run_import("howto100m", tmp_path / "m.jsonl", tmp_path)


def test_durations_are_parsed_and_rounded():
    from videolm.manifests.importers.common import parse_duration

    assert parse_duration(149.44 - 137.72) == 11.72  # float subtraction noise does not reach the manifest
    assert parse_duration("PT00H01M05S") == 65.0 and parse_duration("12.5") == 12.5
    assert parse_duration("soon") is None and parse_duration(0) is None and parse_duration(True) is None
