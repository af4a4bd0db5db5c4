"""``videolm demo``: the main job on the embedded default, end to end.

1. synthesize a train split (seed s), a val split (seed s + 2) and a test split
   (seed s + 1) of digit videos, val and test with held-out handwriting; one manifest;
2. extract ``pixels`` features into shards;
3. quantise them into visual words (k=8, 2 levels);
4. pretrain ``pipelines/demo.yaml`` (the joint objective, whole videos) on the train split;
5. fine-tune it with ``pipelines/demo_finetune.yaml`` (joint + caption, one caption per
   example), keeping the checkpoint with the best val retrieval;
6. train the moment model, ``pipelines/demo_moments.yaml`` (HERO's layout, vsm);
7. score on the test split (``evaluate``): retrieval, captioning and moments, each
   against baselines, and print the three tables (``tables``).

Re-running reuses what is already there (synthesis is deterministic, extraction
and training resume), so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import save_yaml
from ..errors import ConfigError
from ..extract.config import ExtractConfig
from ..extract.job import ExtractSummary, run_extract
from ..features.shards import FeatureStore
from ..manifests.manifest import load_manifest, write_manifest
from ..manifests.synthetic import synthesize
from ..pretrain.metrics_log import read_metrics
from ..quantize.job import run_quantize, summary_lines
from ..quantize.kmeans import QuantizeConfig
from . import evaluate, tables

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
RECIPES = {"pretrain": PIPELINES / "demo.yaml", "finetune": PIPELINES / "demo_finetune.yaml",
           "moments": PIPELINES / "demo_moments.yaml"}
STEPS = 7
# overrides that size a run (the test's tiny demo); the fine-tuned model's sizes come from its --init
RUN_KEYS = ("batch_size", "max_steps", "checkpoint_every", "num_workers", "threads", "select.every")


def _synth_split(data: Path, split: str, videos: int, seed: int, workers: int) -> Path:
    folder = data / split
    manifest, marker = folder / "manifest.jsonl", folder / "synth.json"
    wanted = {"videos": videos, "seed": seed, "split": split}
    if manifest.exists() and marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"      reusing {videos} {split} videos (seed {seed}) in {folder}", flush=True)
    else:
        synthesize(folder, videos, seed, split=split, progress=sys.stderr.isatty(), workers=workers)
        marker.write_text(json.dumps(wanted))
        print(f"      {videos} {split} videos (seed {seed}) in {folder}", flush=True)
    return manifest


@dataclass
class DemoRun:
    """Where a demo writes and what each of its steps reported, for the closing summary."""

    out: Path
    started: float
    times: dict[str, float] = field(default_factory=dict)  # seconds per step
    manifest: Path | None = None
    extracted: ExtractSummary | None = None
    quantized: dict = field(default_factory=dict)  # run_quantize's summary
    trained: dict = field(default_factory=dict)  # run_pretrain / run_finetune summary per run name
    scores: evaluate.DemoScores | None = None

    def __post_init__(self):
        self.data, self.features = self.out / "data", self.out / "features"
        self.quantize_report = self.out / "quantize_report"
        self.runs = {"pretrain": self.out / "pretrain", "finetune": self.out / "finetune",
                     "moments": self.out / "moments_model"}
        self.eval_dir = self.out / "eval"


def run_demo(out: Path, train_videos: int = 800, test_videos: int = 200, seed: int = 0, workers: int = 2,
             train_overrides: tuple[str, ...] = (), val_videos: int = 100) -> int:
    out.mkdir(parents=True, exist_ok=True)
    run = DemoRun(out, started=time.monotonic())
    synthesize_splits(run, {"train": train_videos, "val": val_videos, "test": test_videos}, seed, workers)
    extract_features(run, workers)
    quantize_features(run)
    train_models(run, train_overrides)
    print(f"[{STEPS}/{STEPS}] scoring retrieval, captions and moments on the test split into {run.eval_dir}",
          flush=True)
    started = time.monotonic()
    run.scores = evaluate.evaluate_demo(run.runs, run.features, run.manifest, run.eval_dir)
    run.times["eval"] = time.monotonic() - started
    print()
    print_summary(run)
    printed = tables.all_tables(run.scores)
    for table in printed:
        print()
        print(table)
    (run.eval_dir / "tables.txt").write_text("\n\n".join(printed) + "\n")
    print()
    print_written(run)
    return 0 if run.extracted.failures_total == 0 else 1


def synthesize_splits(run: DemoRun, sizes: dict[str, int], seed: int, workers: int) -> None:
    print(f"[1/{STEPS}] synthesizing digit videos into {run.data}", flush=True)
    t0 = time.monotonic()
    seeds = {"train": seed, "val": seed + 2, "test": seed + 1}  # test keeps seed + 1, as before val existed
    parts = [_synth_split(run.data, split, n, seeds[split], workers) for split, n in sizes.items() if n > 0]
    run.manifest = write_manifest([e for p in parts for e in load_manifest(p)], run.data / "manifest.jsonl")
    run.times["synth"] = time.monotonic() - t0


def extract_features(run: DemoRun, workers: int) -> None:
    cfg = ExtractConfig(encoder="pixels", backend="av", shard_size=200, workers=workers)
    save_yaml(cfg, run.out / "extract_config.yaml")
    print(f"[2/{STEPS}] extracting 'pixels' features into {run.features}", flush=True)
    run.extracted = run_extract(run.manifest, run.features, cfg)
    print(run.extracted.line())
    run.times["extract"] = run.extracted.seconds


def quantize_features(run: DemoRun) -> None:
    print(f"[3/{STEPS}] quantising features into visual words (k=8, 2 levels)", flush=True)
    run.quantized = run_quantize(run.features, QuantizeConfig(k=8, levels=2, sample=100_000),
                                 report_dir=run.quantize_report, overwrite=True, progress=sys.stderr.isatty())
    for line in summary_lines(run.quantized):
        print(line)
    run.times["quantize"] = run.quantized["seconds"]


def _resume(run_dir: Path) -> bool:
    from ..pretrain.checkpoint import latest_checkpoint

    return run_dir.exists() and latest_checkpoint(run_dir) is not None


def train_models(run: DemoRun, overrides: tuple[str, ...]) -> None:
    """Steps 4-6: pretrain, fine-tune from it, and the moment model; the overrides size all three."""
    from ..finetune.job import run_finetune
    from ..pretrain.recipe import load_recipe
    from ..pretrain.trainer import run_pretrain

    for path in RECIPES.values():
        if not path.exists():
            raise ConfigError(f"demo recipe not found at {path}; run the demo from a source checkout "
                              "(pip install -e .)")
    sized = [o for o in overrides if o.split("=", 1)[0] in RUN_KEYS]
    steps = [("pretrain", "pretraining the demo recipe", list(overrides)),
             ("finetune", "fine-tuning it for retrieval and captions (FT-Joint + caption)", sized),
             ("moments", "training the moment model (hierarchical, vsm)", list(overrides))]
    for n, (name, what, extra) in enumerate(steps, 4):
        recipe = load_recipe(RECIPES[name], extra)
        out = run.runs[name]
        print(f"[{n}/{STEPS}] {what} ({recipe.train.max_steps} steps, {', '.join(recipe.objective_names)}) on "
              f"the train split into {out}", flush=True)
        resume = _resume(out)
        if name == "finetune":
            summary = run_finetune(run.runs["pretrain"], recipe, run.features, run.manifest, out, resume=resume)
        else:
            summary = run_pretrain(recipe, run.features, run.manifest, out, resume=resume, progress=True)
        run.trained[name] = summary
        run.times[name] = summary["seconds"]


def _training_line(run_dir: Path, summary: dict) -> str:
    records = read_metrics(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    losses = ", ".join(f"{k[:-5]} {first[k]:.2f} -> {last[k]:.2f}" for k in sorted(last)
                       if k.endswith("_loss") and k in first)
    line = (f"{summary['steps']} steps, {summary['examples_per_s']:.1f} examples/s; loss {first['loss']:.3f} -> "
            f"{last['loss']:.3f} ({losses})")
    if summary.get("best"):
        b = summary["best"]
        line += f"; best val {b['metric']} {b['score']:.1f} at step {b['step']}"
    return line


def print_summary(run: DemoRun) -> None:
    """The data, features, visual words, training and time of the run."""
    entries = load_manifest(run.manifest)
    store = FeatureStore(run.features)
    try:
        lengths = [len(store.get(v).features) for v in store.video_ids]
        dim, videos, shards = store.dim, len(store), len(store.shards)
    finally:
        store.close()
    per_split = {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")}
    captions = sum(len(e.captions) for e in entries)
    q = run.quantized
    print("demo summary")
    print(f"  videos            {len(entries)} synthesized ("
          + ", ".join(f"{n} {s}" for s, n in per_split.items() if n) + f"), {videos} with features, "
          f"{run.extracted.failures_total} failed")
    print(f"  captions          {captions} ({captions / len(entries):.1f} per video)")
    print(f"  clips per video   mean {np.mean(lengths):.1f}, min {min(lengths)}, max {max(lengths)}")
    print(f"  feature dim       {dim} (encoder 'pixels', float16 in {shards} shard(s))")
    print(f"  visual words      {q['words_used']} of {q['vocab_size']} used, entropy {q['entropy_bits']:.2f} bits")
    for name, label in (("pretrain", "pretraining"), ("finetune", "fine-tuning"), ("moments", "moment model")):
        print(f"  {label:<18}{_training_line(run.runs[name], run.trained[name])}")
    speed = run.scores.caption_speed
    print(f"  caption speed     {speed:.1f} captions/s (greedy, batch 32, cpu)")
    print("  time              " + ", ".join(f"{k} {v:.1f} s" for k, v in run.times.items())
          + f", total {time.monotonic() - run.started:.1f} s")


def print_written(run: DemoRun) -> None:
    features, e = run.features, run.eval_dir
    print(f"  written           manifest {run.manifest}")
    print(f"                    features {features}/shard_*.h5, failures {run.extracted.failures_file}")
    print(f"                    codebook {run.quantized['codebook']}, tokens {features}/shard_*.tokens.h5")
    print(f"                    quantize report {run.quantize_report}/ (quantize_summary.json, word_frequencies.png)")
    for name, run_dir in run.runs.items():
        t = run.trained[name]
        print(f"                    {name} run {run_dir}/ (checkpoint {t['checkpoint']}, metrics.jsonl, "
              f"loss_curves.png{', best/, selection.jsonl' if t.get('best') else ''})")
    print(f"                    retrieval reports {e}/{{{','.join(evaluate.RETRIEVAL_FILES.values())}}}.json "
          f"(+ .rankings.jsonl), recall@K plot {e}/recall.png")
    print(f"                    captions {e}/captions.jsonl, {e}/captions_baseline.jsonl, reports "
          f"{e}/caption_report.json, {e}/caption_baseline_report.json")
    print(f"                    moments {e}/moments.json (+ .spans.jsonl), {e}/moment_baselines.json")
    print(f"                    tables {e}/tables.txt")
