"""Kill `videolm extract` anywhere, many times; the finished directory must equal an uninterrupted run's.

The job runs as a subprocess in its own session (decoder workers included) and the
whole process group gets SIGKILL after a random 0.3-3 s (seeded), so kills land
during start-up, decoding, encoding, a shard's write, its fsync/rename and the
failures.jsonl rewrite. The same command is re-run until it exits 0. The result is
compared byte for byte (every dataset of every shard) with a reference extraction,
and must pass `videolm verify`. Numbers for docs/reliability.md: `-s` prints them.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_job import assert_same_shards, shard_contents
from videolm.cli import main
from videolm.features.layout import list_shards
from videolm.features.shards import FeatureStore
from videolm.manifests.manifest import load_manifest
from videolm.manifests.synthetic import synthesize
from videolm.features.verify import verify_directory

ROOT = Path(__file__).resolve().parents[1]


def extract_args(manifest, shard_size):
    return ["--manifest", str(manifest), "--shard-size", str(shard_size), "--batch-size", "16", "--workers", "1",
            "--quiet"]


def kill_moment(out):
    """Where the job was when the kill landed, judged from the directory."""
    if not (out / "extract_config.json").exists():
        return "start-up"
    if list(out.glob("*.partial-*")):
        return "shard partly written"
    return "no shard file open (import, decode, encode, publish)"


def run_until_done_with_kills(cmd, out, kills_wanted, rng, moments, min_s=0.3, max_s=3.0, max_runs=400):
    """Run ``cmd`` repeatedly; SIGKILL its process group after a random delay until ``kills_wanted`` kills
    have landed, then let it finish. Returns (kills, runs, seconds, kill delays)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    kills, runs, delays, t0 = 0, 0, [], time.monotonic()
    while runs < max_runs:
        runs += 1
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        delay = rng.uniform(min_s, max_s) if kills < kills_wanted else None
        try:
            _, err = proc.communicate(timeout=delay if delay is not None else 300)
        except subprocess.TimeoutExpired:
            if delay is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise AssertionError("an unkilled run took more than 300 s")
            moment = kill_moment(out)
            os.killpg(proc.pid, signal.SIGKILL)  # the job and its decoder workers: nothing gets to clean up
            moments[moment] = moments.get(moment, 0) + 1
            proc.communicate()
            kills += 1
            delays.append(delay)
            continue
        assert proc.returncode == 0, f"run {runs} failed (rc {proc.returncode}): {err.decode()[-2000:]}"
        if kills >= kills_wanted:
            return kills, runs, time.monotonic() - t0, delays
        # finished before enough kills landed: the caller starts another round on a fresh directory
        return kills, runs, time.monotonic() - t0, delays
    raise AssertionError(f"no completion after {max_runs} runs")


def check_like_reference(ref, out, manifest):
    assert_same_shards(shard_contents(ref), shard_contents(out))
    store = FeatureStore(out)
    ids = [e.video_id for e in load_manifest(manifest)]
    seen = store.video_ids + [v for v, _ in store.failures()]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))  # no duplicates, nothing missing
    assert (ref / "failures.jsonl").read_text() == (out / "failures.jsonl").read_text()
    report = verify_directory(out)
    assert report.ok, [p.line() for p in report.problems]
    assert not list(out.glob("*.partial-*"))
    return report


def kill_campaign(tmp_path, n_videos, shard_size, kills_wanted, seed):
    manifest = synthesize(tmp_path / "synth", n_videos, seed=0, progress=False)
    args = extract_args(manifest, shard_size)
    t = time.monotonic()
    assert main(["extract", *args, "--out", str(tmp_path / "ref")]) == 0
    ref_s = time.monotonic() - t
    rng = np.random.default_rng(seed)
    total_kills, total_runs, rounds, seconds, all_delays, moments, warnings = 0, 0, 0, 0.0, [], {}, 0
    while total_kills < kills_wanted:  # a round that finishes early starts again on a fresh directory
        out = tmp_path / f"killed{rounds}"
        cmd = [sys.executable, "-m", "videolm.cli", "extract", *args, "--out", str(out)]
        kills, runs, secs, delays = run_until_done_with_kills(cmd, out, kills_wanted - total_kills, rng, moments)
        rounds += 1
        total_kills, total_runs, seconds = total_kills + kills, total_runs + runs, seconds + secs
        all_delays += delays
        report = check_like_reference(tmp_path / "ref", out, manifest)
        warnings += len(report.warnings)
        rc = main(["verify", str(out)])
        assert rc == 0
    print(f"\n[faults] {n_videos} videos, shard_size {shard_size}: {total_kills} SIGKILLs over {total_runs} runs in "
          f"{rounds} round(s), {seconds:.0f} s (uninterrupted reference {ref_s:.1f} s); kill delays "
          f"{min(all_delays):.2f}-{max(all_delays):.2f} s; {len(list_shards(tmp_path / 'ref'))} shards, "
          f"{report.clips} clips, all identical to the reference, verify clean ({warnings} warning(s)); kills by "
          f"moment: {moments}")
    return total_kills


def test_kill_anywhere_fast(tmp_path):
    """Default suite: 10 videos, 3 kills."""
    assert kill_campaign(tmp_path, n_videos=10, shard_size=3, kills_wanted=3, seed=1) >= 3


@pytest.mark.faults
def test_kill_anywhere_many_times(tmp_path):
    """make test-faults: 50 videos, at least 20 kills at random moments."""
    assert kill_campaign(tmp_path, n_videos=50, shard_size=4, kills_wanted=20, seed=0) >= 20
