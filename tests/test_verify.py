"""`videolm verify`: checksums written with every shard, damage detected and named, --repair restores."""

import shutil

import h5py
import numpy as np
import pytest

from test_job import assert_same_shards, shard_contents
from videolm.cli import main
from videolm.extract.config import ExtractConfig
from videolm.extract.job import run_extract
from videolm.features.hdf5 import ShardError, dataset_digest, read_checksums
from videolm.features.layout import shard_name, token_path
from videolm.features.shards import FeatureStore, ShardReader
from videolm.quantize.kmeans import QuantizeConfig
from videolm.quantize.job import run_quantize
from videolm.manifests.synthetic import synthesize
from videolm.features.verify import check_shard, verify_directory

QCFG = QuantizeConfig(k=2, levels=2, sample=1000)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """8 synthetic videos extracted into 3 shards (3 + 3 + 2 videos), and the same directory quantised."""
    root = tmp_path_factory.mktemp("verify")
    manifest = synthesize(root / "synth", 8, seed=5, progress=False)
    run_extract(manifest, root / "ref", ExtractConfig(shard_size=3, workers=0), progress=False)
    shutil.copytree(root / "ref", root / "quantised")
    run_quantize(root / "quantised", QCFG, progress=False)
    return {"manifest": manifest, "dir": root / "ref", "quantised": root / "quantised"}


@pytest.fixture
def copy(ref, tmp_path):
    def make(which="dir"):
        d = tmp_path / which
        shutil.copytree(ref[which], d)
        return d
    return make


def verify_cli(d, capsys, *extra):
    rc = main(["verify", str(d), *extra])
    return rc, capsys.readouterr().out


def test_checksums_are_recorded_as_json(ref):
    with h5py.File(ref["dir"] / shard_name(0), "r") as f:
        recorded = read_checksums(f.attrs)
        assert recorded["algorithm"] == "sha256"
        assert recorded["datasets"]["features"] == dataset_digest(f["features"][()])
        assert recorded["datasets"]["index/video_id"] == dataset_digest(f["index/video_id"][()])
        assert set(recorded["datasets"]) >= {"features", "clip_times", "index/offset", "index/num_clips"}
    with h5py.File(token_path(ref["quantised"] / shard_name(1)), "r") as f:
        assert read_checksums(f.attrs)["datasets"]["tokens"] == dataset_digest(f["tokens"][()])
    with h5py.File(ref["quantised"] / "codebook.h5", "r") as f:
        assert "level_0/centroids" in read_checksums(f.attrs)["datasets"]


def test_clean_directory_passes(ref, capsys):
    for d in (ref["dir"], ref["quantised"]):
        rc, out = verify_cli(d, capsys)
        assert rc == 0 and "0 error(s), 0 warning(s): clean" in out, out


def test_truncated_shard_is_named_here_and_elsewhere(copy, capsys):
    d = copy()
    p = d / shard_name(1)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    rc, out = verify_cli(d, capsys)
    assert rc == 1
    assert f"ERROR shard_00001.h5: truncated or not an HDF5 file (size {len(data) // 2} bytes" in out
    assert "2 ok" in out and "PROBLEMS FOUND" in out
    for open_it in (FeatureStore, lambda d: ShardReader(d / shard_name(1))):
        with pytest.raises(ShardError, match=r"shard_00001.h5: cannot open shard: truncated or not an HDF5 file"):
            open_it(d)


def test_garbage_file_is_not_hdf5(copy, capsys):
    d = copy()
    (d / shard_name(2)).write_bytes(b"not a shard at all" * 10)
    rc, out = verify_cli(d, capsys)
    assert rc == 1 and "shard_00002.h5: truncated or not an HDF5 file (size 180 bytes" in out


def test_flipped_bytes_in_features_fail_the_checksum(copy, capsys):
    d = copy()
    p = d / shard_name(0)
    with h5py.File(p, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset  # chunked: the first chunk's place in the file
        assert offset
    with open(p, "r+b") as fh:
        fh.seek(offset + 100)
        b = fh.read(4)
        fh.seek(offset + 100)
        fh.write(bytes(x ^ 0x01 for x in b))  # low mantissa bits: still finite numbers, silently wrong
    rc, out = verify_cli(d, capsys)
    assert rc == 1 and "ERROR shard_00000.h5: checksum mismatch in features" in out
    assert "NaN" not in out  # only the checksum can see this kind of damage


def test_nan_written_through_h5py(copy, capsys):
    d = copy()
    with h5py.File(d / shard_name(1), "r+") as f:
        vid, first = f["index/video_id"][1].decode(), int(f["index/offset"][1])
        f["features"][first + 1, 0] = np.nan
    rc, out = verify_cli(d, capsys)
    assert rc == 1
    assert f"shard_00001.h5: NaN/inf features in 1 row(s), first at row {first + 1} (video '{vid}')" in out
    assert "checksum mismatch in features" in out


@pytest.mark.parametrize("damage, message", [
    (lambda f: f["index/offset"].__setitem__(1, f["index/offset"][1] + 1), "rows not contiguous"),
    (lambda f: f["index/num_clips"].__setitem__(2, f["index/num_clips"][2] + 50), "beyond the"),
    (lambda f: f["index/num_clips"].__setitem__(2, f["index/num_clips"][2] - 1), "index covers"),
    (lambda f: f.__delitem__("index/duration"), "dataset index/duration missing"),
    (lambda f: f.attrs.__setitem__("num_videos", 7), "attribute num_videos=7 but the datasets hold 3"),
])
def test_broken_index(copy, capsys, damage, message):
    d = copy()
    with h5py.File(d / shard_name(0), "r+") as f:
        damage(f)
    problems, _ = check_shard(d / shard_name(0))
    assert any(message in p.message for p in problems), [p.line() for p in problems]
    rc, out = verify_cli(d, capsys)
    assert rc == 1 and message in out


def test_old_shard_without_checksums_is_a_warning(copy, capsys):
    d = copy()
    with h5py.File(d / shard_name(0), "r+") as f:
        del f.attrs["checksums"]
    rc, out = verify_cli(d, capsys)
    assert rc == 0 and "warning shard_00000.h5: no checksums recorded" in out and "ok with warnings" in out
    with ShardReader(d / shard_name(0)) as r:  # still readable
        assert len(r) == 3


def test_missing_shard_and_leftovers(copy, capsys):
    d = copy()
    (d / shard_name(2)).rename(d / (shard_name(2) + ".partial-host-1"))
    rc, out = verify_cli(d, capsys)
    assert rc == 1 and "ERROR shard_00002.h5: missing (the directory should hold 3 shards" in out
    assert "warning shard_00002.h5.partial-host-1: leftover of an interrupted run" in out


def test_token_problems(copy, capsys):
    d = copy("quantised")
    with h5py.File(token_path(d / shard_name(0)), "r+") as f:
        f["tokens"][0] = (f["tokens"][0] + 1) % 4
    token_path(d / shard_name(1)).unlink()
    with h5py.File(token_path(d / shard_name(2)), "r+") as f:
        f.attrs["codebook_fingerprint"] = "other"
    rc, out = verify_cli(d, capsys)
    assert rc == 1
    assert "shard_00000.tokens.h5: checksum mismatch in tokens" in out
    assert "shard_00001.tokens.h5: missing" in out
    assert "shard_00002.tokens.h5: written with another codebook" in out


def test_codebook_nan(copy, capsys):
    d = copy("quantised")
    with h5py.File(d / "codebook.h5", "r+") as f:
        f["level_1/centroids"][0, 0] = np.nan
    rc, out = verify_cli(d, capsys)
    assert rc == 1 and "codebook.h5: NaN/inf in level_1/centroids" in out


def test_repair_restores_an_uninterrupted_extraction(ref, copy, capsys):
    d = copy("quantised")
    tokens_before = {p.name: p.read_bytes() for p in d.glob("*.tokens.h5")}
    p0 = d / shard_name(0)
    p0.write_bytes(p0.read_bytes()[:5000])  # truncated
    with h5py.File(d / shard_name(1), "r+") as f:
        f["features"][2, 2] = np.inf
    (d / shard_name(2)).unlink()  # missing
    assert len(verify_directory(d).broken_shards) == 3
    rc, out = verify_cli(d, capsys, "--repair", "--manifest", str(ref["manifest"]), "--quiet")
    assert rc == 0, out
    assert "re-extracted 3 shard(s)" in out and "re-tokenised with the existing codebook" in out
    assert out.strip().endswith("clean")
    assert_same_shards(shard_contents(ref["dir"]), shard_contents(d))
    assert {p.name: p.read_bytes() for p in d.glob("*.tokens.h5")}.keys() == tokens_before.keys()
    a, b = FeatureStore(ref["quantised"]), FeatureStore(d)
    for vid in a.video_ids:
        np.testing.assert_array_equal(a.get(vid).tokens, b.get(vid).tokens)
    rc, out = verify_cli(d, capsys, "--repair", "--manifest", str(ref["manifest"]))
    assert rc == 0 and "nothing to repair" in out


def test_repair_needs_the_same_manifest(ref, copy, capsys, tmp_path):
    d = copy()
    with h5py.File(d / shard_name(0), "r+") as f:
        f["features"][0, 0] = np.nan
    assert main(["verify", str(d), "--repair"]) == 2
    assert "pass --manifest" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(ref["manifest"].read_text() + "\n")
    assert main(["verify", str(d), "--repair", "--manifest", str(other)]) == 2
    assert "differs from the manifest this directory was extracted from" in capsys.readouterr().err
    assert (d / shard_name(0)).exists()  # nothing deleted on refusal


def test_verify_user_errors(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    assert "no feature shards" in capsys.readouterr().err
