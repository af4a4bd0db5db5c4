import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import write_audio_only
from videolm.cli import main
from videolm.extract.config import ExtractConfig
from videolm.extract.decode import decode_clips
from videolm.extract.encoders import build_encoder
from videolm.extract.job import ExtractError, run_extract
from videolm.features.layout import list_shards
from videolm.features.shards import FeatureStore
from videolm.manifests.manifest import VideoEntry, load_manifest, write_manifest
from videolm.manifests.synthetic import synthesize


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthesize(d, 10, seed=3, progress=False)
    return d


def manifest_with_bad_files(synth_dir, tmp_path):
    """The synthetic videos plus a corrupt, a missing and an audio-only file in between."""
    entries = load_manifest(synth_dir / "manifest.jsonl")
    corrupt = tmp_path / "corrupt.mp4"
    good = Path(entries[0].path).read_bytes()
    corrupt.write_bytes(good[:64] + np.random.default_rng(1).bytes(len(good)))
    audio = write_audio_only(tmp_path / "audio.mp4")
    bad = [VideoEntry("corrupt", str(corrupt), "train"), VideoEntry("missing", str(tmp_path / "gone.mp4"), "train"),
           VideoEntry("audio", str(audio), "train")]
    mixed = entries[:3] + bad[:1] + entries[3:6] + bad[1:] + entries[6:]
    return write_manifest(mixed, tmp_path / "manifest.jsonl"), entries


def shard_contents(directory):
    """Everything a reader can see in the shards, for exact comparisons."""
    out = {}
    for p in list_shards(directory):
        with h5py.File(p, "r") as f:
            out[p.name] = {k: f[k][()] for k in ("features", "clip_times", "index/video_id", "index/offset",
                                                 "index/num_clips", "index/duration", "failures/video_id",
                                                 "failures/error")}
    return out


def assert_same_shards(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")


def test_bad_videos_are_recorded_and_the_job_completes(synth_dir, tmp_path, capsys):
    manifest, entries = manifest_with_bad_files(synth_dir, tmp_path)
    rc = main(["extract", "--manifest", str(manifest), "--out", str(tmp_path / "f"), "--shard-size", "4",
               "--quiet"])
    assert rc == 0
    assert "10 videos ok, 3 failed" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "f" / "failures.jsonl").read_text().splitlines()]
    reasons = {r["video_id"]: r["error"] for r in rows}
    assert set(reasons) == {"corrupt", "missing", "audio"}
    assert "does not exist" in reasons["missing"] and "no video stream" in reasons["audio"]
    store = FeatureStore(tmp_path / "f")
    assert sorted(store.video_ids) == sorted(e.video_id for e in entries)
    # shard contents equal a direct decode + encode of the same video
    enc = build_encoder("pixels")
    clips = decode_clips(entries[4].path, enc.default_sampling, "av")
    got = store.get(entries[4].video_id)
    np.testing.assert_allclose(got.features, enc.encode(clips.frames).astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got.starts, clips.starts)
    assert got.duration == pytest.approx(entries[4].duration, abs=0.05)


def test_inline_and_pool_write_identical_shards(synth_dir, tmp_path):
    manifest = synth_dir / "manifest.jsonl"
    run_extract(manifest, tmp_path / "a", ExtractConfig(shard_size=3, batch_size=8, workers=0), progress=False)
    run_extract(manifest, tmp_path / "b", ExtractConfig(shard_size=3, batch_size=8, workers=2), progress=False)
    assert_same_shards(shard_contents(tmp_path / "a"), shard_contents(tmp_path / "b"))


def test_nodes_split_the_shards_without_overlap(synth_dir, tmp_path):
    manifest = synth_dir / "manifest.jsonl"
    cfg = ExtractConfig(shard_size=2, workers=1)
    run_extract(manifest, tmp_path / "one", cfg, progress=False)
    s0 = run_extract(manifest, tmp_path / "multi", cfg, num_nodes=2, node_rank=0, progress=False)
    assert s0.node_shards == 3 and len(list_shards(tmp_path / "multi")) == 3
    # quantising before every node has finished would fit the codebook on half the data
    from videolm.quantize.kmeans import QuantizeConfig
    from videolm.quantize.job import QuantizeError, run_quantize

    with pytest.raises(QuantizeError, match="3 of 5 shards are finished"):
        run_quantize(tmp_path / "multi", QuantizeConfig(k=2, levels=1), progress=False)
    run_extract(manifest, tmp_path / "multi", cfg, num_nodes=2, node_rank=1, progress=False)
    assert_same_shards(shard_contents(tmp_path / "one"), shard_contents(tmp_path / "multi"))
    run_quantize(tmp_path / "multi", QuantizeConfig(k=2, levels=1), progress=False)


def test_rerun_skips_and_mismatch_is_refused(synth_dir, tmp_path):
    manifest = synth_dir / "manifest.jsonl"
    first = run_extract(manifest, tmp_path / "f", ExtractConfig(shard_size=5), progress=False)
    again = run_extract(manifest, tmp_path / "f", ExtractConfig(shard_size=5), progress=False)
    assert first.shards_written == 2 and again.shards_written == 0 and again.shards_skipped == 2
    with pytest.raises(ExtractError, match="differs in: sampling"):
        run_extract(manifest, tmp_path / "f", ExtractConfig(shard_size=5, fps=2.0), progress=False)


def test_hung_decoder_is_killed_and_recorded(synth_dir, tmp_path):
    fifo = tmp_path / "never_written.mp4"
    os.mkfifo(fifo)  # opening it blocks forever: a stand-in for a decoder that hangs
    entries = load_manifest(synth_dir / "manifest.jsonl")[:2]
    manifest = write_manifest([entries[0], VideoEntry("hang", str(fifo), "train"), entries[1]], tmp_path / "m.jsonl")
    t0 = time.monotonic()
    s = run_extract(manifest, tmp_path / "f", ExtractConfig(timeout=3, workers=2), progress=False)
    assert time.monotonic() - t0 < 60
    assert (s.videos_ok, s.videos_failed) == (2, 1)
    row = json.loads((tmp_path / "f" / "failures.jsonl").read_text())
    assert row["video_id"] == "hang" and "no progress for 3 s" in row["error"]


def test_killed_job_resumes_to_identical_shards(synth_dir, tmp_path):
    manifest = synth_dir / "manifest.jsonl"
    args = ["--manifest", str(manifest), "--shard-size", "2", "--batch-size", "8", "--quiet"]
    main(["extract", *args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "videolm.cli", "extract", *args, "--out", str(out)]
    kills = 0
    for attempt in range(10):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        before = len(list_shards(out)) if out.exists() else 0
        deadline = time.monotonic() + 60
        # kill as soon as this attempt has published one more shard (mid-run, with a partial open)
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and len(list_shards(out)) > before:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        proc.wait()
        if proc.returncode == 0:
            break
    assert kills >= 2
    main(["extract", *args, "--out", str(out)])  # resumes whatever is left; leftover .partial files are removed
    assert not list(out.glob("*.partial-*"))
    assert_same_shards(shard_contents(tmp_path / "ref"), shard_contents(out))


def test_cli_help_and_user_errors(synth_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["extract", "--help"])
    assert e.value.code == 0 and "--num-nodes" in capsys.readouterr().out
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"video_id": "a", "path": "x.mp4", "split": "train"}\n{"video_id": "a"\n')
    assert main(["extract", "--manifest", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    good = str(synth_dir / "manifest.jsonl")
    assert main(["extract", "--manifest", good, "--out", str(tmp_path / "o"), "--encoder", "s3d"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["extract", "--manifest", good, "--out", str(tmp_path / "o"), "--node-rank", "3"]) == 2


def test_pipeline_yaml_configs_load():
    from videolm.config import load_yaml

    root = Path(__file__).resolve().parents[1] / "pipelines"
    pixels = load_yaml(root / "extract_pixels.yaml", ExtractConfig)
    s3d = load_yaml(root / "extract_s3d.yaml", ExtractConfig)
    assert pixels.encoder == "pixels" and s3d.encoder == "s3d" and s3d.crop == 224


def test_yaml_typos_are_errors(tmp_path):
    from videolm.errors import ConfigError
    from videolm.config import load_yaml

    p = tmp_path / "c.yaml"
    p.write_text("encoder: pixels\nshard_sise: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*shard_sise"):
        load_yaml(p, ExtractConfig)


def test_decoder_workers_are_recycled_without_changing_results(synth_dir):
    from videolm.extract.encoders import build_encoder
    from videolm.extract.workers import DecoderPool

    entries = load_manifest(synth_dir / "manifest.jsonl")[:5]
    spec = ExtractConfig().resolve_sampling(build_encoder("pixels", None, "cpu").default_sampling)

    def decode_all(recycle_after):
        clips = {}
        with DecoderPool(1, "av", 0, 60.0, recycle_after=recycle_after) as pool:
            for e in entries:
                pool.submit(e.video_id, e.path, spec)
                while pool.busy:
                    for kind, vid, payload in pool.poll(1.0):
                        assert kind != "error", payload
                        if kind == "clips":
                            clips[vid] = clips.get(vid, 0) + len(payload.starts)
            return clips, pool.started

    plain, started = decode_all(0)
    recycled, started_recycled = decode_all(2)
    assert started == 1 and started_recycled == 3  # fresh processes after videos 2 and 4
    assert recycled == plain and len(plain) == 5
