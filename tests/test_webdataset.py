"""WebDataset tars: `videolm import webdataset`, tar member paths in manifests, extraction
straight from the tar (identical shards to the same videos as files)."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_VIDEOS, shared_videos
from videolm.cli import main
from videolm.extract.config import ExtractConfig, SamplingSpec
from videolm.extract.decode import DecodeError, iter_clips
from videolm.extract.job import run_extract
from videolm.features.layout import list_shards
from videolm.features.shards import FeatureStore, ShardReader
from videolm.manifests.importers import ImporterError, run_import
from videolm.manifests.importers.webdataset import expand_braces, expand_shards, sample_key
from videolm.manifests.manifest import ManifestError, VideoEntry, load_manifest, write_manifest
from videolm.manifests.synthetic import synthesize
from videolm.manifests.tar_members import MemberFile, TarCache, split_member


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _meta(key, status="success", **extra) -> bytes:
    return json.dumps({"key": key, "status": status, "error_message": None, **extra}, indent=4).encode()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two video2dataset-style tars over 4 synthetic videos, plus the same videos as files."""
    d = tmp_path_factory.mktemp("wds")
    synthesize(d / "synth", 4, seed=5, progress=False)
    files = [Path(e.path) for e in load_manifest(d / "synth" / "manifest.jsonl")]
    (d / "shards").mkdir()
    with tarfile.open(d / "shards" / "00000.tar", "w") as tf:
        _add(tf, "000000000.mp4", files[0].read_bytes())
        _add(tf, "000000000.txt", b"a red 3 moves left\n")
        _add(tf, "000000000.json", _meta("000000000", caption="from the json"))
        _add(tf, "000000001.mp4", files[1].read_bytes())
        _add(tf, "000000001.txt", b"a blue 7 moves up")
        _add(tf, "000000001.json", _meta("000000001", video_metadata={"format": {"duration": "6.25"}}))
        _add(tf, "000000002.txt", b"never downloaded")  # video2dataset writes failed samples without a video
        _add(tf, "000000002.json", json.dumps({"key": "000000002", "status": "failed_to_download",
                                               "error_message": "HTTP Error 404: Not Found"}).encode())
        _add(tf, "000000003_00000.mp4", files[2].read_bytes())  # clipped: its span of the source video
        _add(tf, "000000003_00000.txt", b"a green 1 moves right")
        _add(tf, "000000003_00000.json", _meta("000000003_00000", clips=[["00:00:02.000", "00:00:05.500"]]))
    with tarfile.open(d / "shards" / "00001.tar", "w") as tf:
        _add(tf, "000010000.mp4", files[3].read_bytes())
        _add(tf, "000010000.json", b"{not json")
        _add(tf, "000010001.txt", b"a caption without its video")
        _add(tf, "part/000010002.mp4", files[3].read_bytes())
        _add(tf, "part/000010002.txt", b"a yellow 5 moves down")
    return d, files


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b{1..2}}-{x,y}") == ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"] and expand_braces("open{1..2") == ["open{1..2"]
    assert sample_key("part/000010002.seg.mp4") == ("part/000010002", ".seg.mp4")


def test_import_writes_a_line_per_usable_sample(shards, tmp_path, capsys):
    d, _ = shards
    out = tmp_path / "m.jsonl"
    assert main(["import", "webdataset", str(d / "shards" / "{00000..00001}.tar"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    entries = {e.video_id: e for e in load_manifest(out)}
    assert sorted(entries) == ["000000000", "000000001", "000000003_00000", "part/000010002"]
    tar0 = str(d / "shards" / "00000.tar")
    assert entries["000000000"].path == f"{tar0}#000000000.mp4"
    assert entries["part/000010002"].path == f"{d / 'shards' / '00001.tar'}#part/000010002.mp4"
    assert entries["000000000"].captions[0].text == "a red 3 moves left"
    assert entries["000000001"].duration == 6.25 and entries["000000001"].captions[0].end == 6.25
    assert entries["000000003_00000"].duration == 3.5  # the clip's span, 2.0 s to 5.5 s of its source
    assert entries["000000000"].duration and entries["000000000"].duration > 1  # probed inside the tar
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert raw[0]["path"].startswith(os.path.relpath(tar0, tmp_path) + "#")  # relative, like any path
    assert "dropped 1: video2dataset status 'failed_to_download'" in printed and "HTTP Error 404" in printed
    assert "dropped 1: sample .json does not parse" in printed and "00001.tar#000010000.json" in printed
    assert "dropped 1: sample without a video member" in printed and "000010001" in printed


def test_caption_field_globs_and_bad_shards(shards, tmp_path):
    d, _ = shards
    s = run_import("webdataset", tmp_path / "m.jsonl", shards=[str(d / "shards" / "0000[0].tar")],
                   caption_field="caption")
    assert s.written == 1 and s.dropped["sample without a caption (no string field 'caption' in its .json)"][0] == 2
    assert load_manifest(tmp_path / "m.jsonl")[0].captions[0].text == "from the json"
    with pytest.raises(ImporterError, match=r"00002\.tar: no such file \(from .*\{00000\.\.00002\}"):
        expand_shards([str(d / "shards" / "{00000..00002}.tar")])
    broken = tmp_path / "broken.tar"
    broken.write_bytes((d / "shards" / "00000.tar").read_bytes()[:700] + b"\x01" * 1500)
    s = run_import("webdataset", tmp_path / "b.jsonl", shards=[str(broken), str(d / "shards" / "00001.tar")])
    assert s.written == 1 and any(str(broken) in ex for _, ex in s.skipped.values() for ex in ex)


def test_member_paths_in_manifests(shards, tmp_path):
    d, _ = shards
    tar = d / "shards" / "00000.tar"
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"video_id": "a", "path": os.path.relpath(tar, tmp_path) + "#x/../y.mp4",
                             "split": "train"}) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: member name .* without '\.\.'"):
        load_manifest(m)
    m.write_text(json.dumps({"video_id": "a", "path": os.path.relpath(tar, tmp_path) + "#dir/0.mp4",
                             "split": "train"}) + "\n")
    assert load_manifest(m)[0].path == f"{tar}#dir/0.mp4"
    assert load_manifest(m, root=d)[0].path == f"{tar}#dir/0.mp4"  # --root applies to the tar
    with pytest.raises(ManifestError, match="outside the allowed root"):
        load_manifest(m, root=tmp_path)
    assert split_member("/a/b.mp4") is None and split_member("s.tar#k.mp4") == ("s.tar", "k.mp4")


def test_member_views_and_the_index_cache(shards, tmp_path):
    d, files = shards
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, "k.bin", b"0123456789")
    cache = TarCache(limit=1)
    view = cache.open_member(f"{tar}#k.bin")
    assert isinstance(view, MemberFile) and view.read(4) == b"0123" and view.tell() == 4
    assert view.seek(-3, io.SEEK_END) == 7 and view.read() == b"789" and view.read(5) == b""
    cache.open_member(f"{tar}#k.bin")
    assert cache.indexed == 1  # built once, reused
    with tarfile.open(tar, "w") as tf:  # rewritten in place: a new size and mtime
        _add(tf, "k.bin", b"abcdefghijkl")
    assert cache.open_member(f"{tar}#k.bin").read() == b"abcdefghijkl" and cache.indexed == 2
    cache.close()


def _file_manifest(tar_manifest: Path, files: list[Path], out: Path) -> Path:
    """The same ids and captions, with each video as a plain file."""
    by_member = {"000000000.mp4": files[0], "000000001.mp4": files[1], "000000003_00000.mp4": files[2],
                 "part/000010002.mp4": files[3]}
    entries = [VideoEntry(e.video_id, str(by_member[split_member(e.path)[1]]), e.split, e.duration, e.captions)
               for e in load_manifest(tar_manifest)]
    return write_manifest(entries, out)


def _store_contents(directory: Path) -> dict:
    store = FeatureStore(directory)
    out = {v: store.get(v) for v in store.video_ids}
    shards = [ShardReader(p) for p in list_shards(directory)]
    order = [s.video_ids for s in shards]
    return {v: (f.features, f.starts, f.ends, f.duration) for v, f in out.items()} | {"__order__": order}


def test_extract_from_tar_members_equals_extract_from_files(shards, tmp_path):
    d, files = shards
    tar_m = tmp_path / "tar.jsonl"
    run_import("webdataset", tar_m, shards=[str(d / "shards" / "0000*.tar")])
    file_m = _file_manifest(tar_m, files, tmp_path / "file.jsonl")
    cfg = ExtractConfig(shard_size=3, batch_size=8, workers=2)
    a = run_extract(tar_m, tmp_path / "from_tar", cfg, progress=False)
    b = run_extract(file_m, tmp_path / "from_files", cfg, progress=False)
    assert a.videos_failed == b.videos_failed == 0 and a.videos_ok == 4
    ta, fa = _store_contents(tmp_path / "from_tar"), _store_contents(tmp_path / "from_files")
    assert ta.keys() == fa.keys() and ta["__order__"] == fa["__order__"]
    for v in fa:
        if v != "__order__":
            for x, y in zip(ta[v], fa[v]):
                np.testing.assert_array_equal(x, y, err_msg=v)
    again = run_extract(tar_m, tmp_path / "from_tar", cfg, progress=False)  # resumable: nothing redone
    assert again.shards_skipped == 2 and again.shards_written == 0


def test_missing_member_is_a_recorded_failure(shards, tmp_path):
    d, files = shards
    tar = d / "shards" / "00000.tar"
    entries = [VideoEntry("good", f"{tar}#000000000.mp4", "train"), VideoEntry("gone", f"{tar}#nope.mp4", "train"),
               VideoEntry("no_tar", f"{d / 'shards' / 'absent.tar'}#000000000.mp4", "train")]
    m = write_manifest(entries, tmp_path / "m.jsonl")
    s = run_extract(m, tmp_path / "f", ExtractConfig(workers=0), progress=False)
    assert s.videos_failed == 2 and s.videos_ok == 1
    rows = {r["video_id"]: r for r in map(json.loads, (tmp_path / "f" / "failures.jsonl").read_text().splitlines())}
    assert "no member 'nope.mp4'" in rows["gone"]["error"] and str(tar) in rows["gone"]["error"]
    assert "absent.tar: tar file does not exist" in rows["no_tar"]["error"]
    assert FeatureStore(tmp_path / "f").video_ids == ["good"]


def test_decord_reads_tar_members_like_files(shards):
    d, files = shards
    spec = SamplingSpec(fps=2.0, frames_per_clip=2, clip_stride=2.0, short_side=32)
    a = list(iter_clips(f"{d / 'shards' / '00000.tar'}#000000001.mp4", spec, backend="decord"))
    b = list(iter_clips(files[1], spec, backend="decord"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.frames, y.frames)
        np.testing.assert_array_equal(x.starts, y.starts)
    with pytest.raises(DecodeError, match="no member"):
        next(iter_clips(f"{d / 'shards' / '00000.tar'}#000000002.mp4", spec, backend="decord"))


@pytest.mark.skipif(not shared_videos(), reason=f"real test videos not found in {SHARED_VIDEOS}")
def test_a_real_video_decodes_the_same_from_a_tar(tmp_path):
    real = shared_videos()[0]
    tar = tmp_path / "real.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, "pad.txt", b"x" * 1000)  # the member does not start at the tar's first block
        tf.add(real, arcname=real.name)
    spec = SamplingSpec(fps=1.0, frames_per_clip=2, clip_stride=4.0, short_side=48)
    x, y = next(iter_clips(f"{tar}#{real.name}", spec)), next(iter_clips(real, spec))
    np.testing.assert_array_equal(x.frames, y.frames)
    assert x.duration == y.duration
