"""``videolm demo``: the main job on the embedded default, end to end.

Synthesize digit videos, extract ``pixels`` features into shards, quantise them
into visual words (k=8, 2 levels), pretrain the ``pipelines/demo.yaml`` recipe
for a few minutes on CPU, and print what was written.
Re-running reuses what is already there (synthesis is deterministic, extraction
and pretraining resume), so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import ConfigError, ExtractConfig, save_yaml
from .extract.job import run_extract
from .extract.shards import FeatureStore
from .manifest import load_manifest
from .quantize import QuantizeConfig
from .quantize_job import run_quantize, summary_lines
from .synthetic import synthesize
from .train_logging import read_metrics


DEMO_RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"


def run_demo(out: Path, videos: int = 64, seed: int = 0, workers: int = 2, train_overrides: tuple[str, ...] = ()) -> int:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data = out / "data"
    manifest = data / "manifest.jsonl"
    marker = data / "synth.json"
    wanted = {"videos": videos, "seed": seed}
    if not (manifest.exists() and marker.exists() and json.loads(marker.read_text()) == wanted):
        print(f"[1/4] synthesizing {videos} videos (seed {seed}) into {data}", flush=True)
        synthesize(data, videos, seed, split="train", progress=sys.stderr.isatty())
        marker.write_text(json.dumps(wanted))
    else:
        print(f"[1/4] reusing {videos} synthetic videos in {data}", flush=True)
    t_synth = time.monotonic() - t0

    features = out / "features"
    cfg = ExtractConfig(encoder="pixels", backend="av", shard_size=32, workers=workers)
    save_yaml(cfg, out / "extract_config.yaml")
    print(f"[2/4] extracting 'pixels' features into {features}", flush=True)
    summary = run_extract(manifest, features, cfg)
    print(summary.line())

    print("[3/4] quantising features into visual words (k=8, 2 levels)", flush=True)
    report = out / "quantize_report"
    qsum = run_quantize(features, QuantizeConfig(k=8, levels=2, sample=100_000), report_dir=report, overwrite=True,
                        progress=sys.stderr.isatty())
    for line in summary_lines(qsum):
        print(line)

    if not DEMO_RECIPE.exists():
        raise ConfigError(f"demo recipe not found at {DEMO_RECIPE}; run the demo from a source checkout "
                          "(pip install -e .)")
    from .checkpoint import latest_checkpoint
    from .recipe import load_recipe
    from .train import run_pretrain

    run_dir = out / "pretrain"
    recipe = load_recipe(DEMO_RECIPE, list(train_overrides))
    resume = run_dir.exists() and latest_checkpoint(run_dir) is not None
    print(f"[4/4] pretraining the demo recipe ({recipe.train.max_steps} steps, "
          f"{', '.join(recipe.objective_names)}) into {run_dir}", flush=True)
    tsum = run_pretrain(recipe, features, manifest, run_dir, resume=resume, progress=True)
    records = read_metrics(run_dir / "metrics.jsonl")

    entries = load_manifest(manifest)
    store = FeatureStore(features)
    lengths = [len(store.get(v).features) for v in store.video_ids]
    captions = sum(len(e.captions) for e in entries)
    print()
    print("demo summary")
    print(f"  videos            {len(entries)} synthesized, {len(store)} with features, "
          f"{summary.failures_total} failed")
    print(f"  captions          {captions} ({captions / len(entries):.1f} per video)")
    print(f"  clips per video   mean {np.mean(lengths):.1f}, min {min(lengths)}, max {max(lengths)}")
    print(f"  feature dim       {store.dim} (encoder 'pixels', float16 in {len(store.shards)} shard(s))")
    print(f"  visual words      {qsum['words_used']} of {qsum['vocab_size']} used, "
          f"entropy {qsum['entropy_bits']:.2f} bits")
    first, last = records[0], records[-1]
    print(f"  pretraining       {tsum['steps']} steps, {tsum['examples_per_s']:.1f} examples/s; loss "
          f"{first['loss']:.3f} -> {last['loss']:.3f} ("
          + ", ".join(f"{k[:-5]} {first[k]:.2f} -> {last[k]:.2f}" for k in sorted(last) if k.endswith("_loss") and k in first)
          + ")")
    print(f"  time              synth {t_synth:.1f} s, extract {summary.seconds:.1f} s, "
          f"quantize {qsum['seconds']:.1f} s, pretrain {tsum['seconds']:.1f} s, total {time.monotonic() - t0:.1f} s")
    print(f"  written           manifest {manifest}")
    print(f"                    features {features}/shard_*.h5, failures {summary.failures_file}")
    print(f"                    codebook {qsum['codebook']}, tokens {features}/shard_*.tokens.h5")
    print(f"                    quantize report {report}/ (quantize_summary.json, word_frequencies.png)")
    print(f"                    checkpoint {tsum['checkpoint']}")
    print(f"                    training log {run_dir}/metrics.jsonl (+ metrics.csv, tensorboard/), "
          f"loss curves {tsum.get('loss_plot')}")
    store.close()
    return 0 if summary.failures_total == 0 else 1
