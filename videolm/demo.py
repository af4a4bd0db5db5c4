"""``videolm demo``: the main job on the embedded default, end to end.

1. synthesize a train split (seed s) and a test split (seed s + 1, held-out
   handwriting) of digit videos, one manifest;
2. extract ``pixels`` features into shards;
3. quantise them into visual words (k=8, 2 levels);
4. pretrain the ``pipelines/demo.yaml`` recipe on the train split;
5. evaluate text-to-video retrieval on the test split for the pretrained model,
   the same architecture untrained, and a TF-IDF -> ridge baseline, and print
   the table with paired bootstrap tests.

Re-running reuses what is already there (synthesis is deterministic, extraction
and pretraining resume), so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import save_yaml
from .errors import ConfigError
from .extract.config import ExtractConfig
from .extract.job import ExtractSummary, run_extract
from .features.shards import FeatureStore
from .manifests.manifest import load_manifest, write_manifest
from .manifests.synthetic import synthesize
from .pretrain.metrics_log import read_metrics
from .quantize.job import run_quantize, summary_lines
from .quantize.kmeans import QuantizeConfig

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
STEPS = 5


def _synth_split(data: Path, split: str, videos: int, seed: int) -> Path:
    folder = data / split
    manifest, marker = folder / "manifest.jsonl", folder / "synth.json"
    wanted = {"videos": videos, "seed": seed, "split": split}
    if manifest.exists() and marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"      reusing {videos} {split} videos (seed {seed}) in {folder}", flush=True)
    else:
        synthesize(folder, videos, seed, split=split, progress=sys.stderr.isatty())
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
    pretrained: dict = field(default_factory=dict)  # run_pretrain's summary
    reports: dict = field(default_factory=dict)  # retrieval report per table row

    # Where each step writes, all below ``out``.
    data: Path = field(init=False)
    features: Path = field(init=False)
    quantize_report: Path = field(init=False)
    run_dir: Path = field(init=False)
    eval_dir: Path = field(init=False)

    def __post_init__(self):
        self.data, self.features = self.out / "data", self.out / "features"
        self.quantize_report = self.out / "quantize_report"
        self.run_dir, self.eval_dir = self.out / "pretrain", self.out / "eval"


def run_demo(out: Path, train_videos: int = 800, test_videos: int = 200, seed: int = 0, workers: int = 2,
             train_overrides: tuple[str, ...] = ()) -> int:
    out.mkdir(parents=True, exist_ok=True)
    run = DemoRun(out, started=time.monotonic())
    synthesize_splits(run, train_videos, test_videos, seed)
    extract_features(run, workers)
    quantize_features(run)
    pretrain_demo_recipe(run, train_overrides)
    evaluate_retrieval(run)
    print()
    print_summary(run, train_videos, test_videos)
    print()
    print(retrieval_table(run.reports))
    print()
    print_written(run)
    return 0 if run.extracted.failures_total == 0 else 1


def synthesize_splits(run: DemoRun, train_videos: int, test_videos: int, seed: int) -> None:
    print(f"[1/{STEPS}] synthesizing digit videos into {run.data}", flush=True)
    parts = [_synth_split(run.data, "train", train_videos, seed),
             _synth_split(run.data, "test", test_videos, seed + 1)]
    run.manifest = write_manifest([e for p in parts for e in load_manifest(p)], run.data / "manifest.jsonl")
    run.times["synth"] = time.monotonic() - run.started


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


def pretrain_demo_recipe(run: DemoRun, train_overrides: tuple[str, ...]) -> None:
    if not DEMO_RECIPE.exists():
        raise ConfigError(f"demo recipe not found at {DEMO_RECIPE}; run the demo from a source checkout "
                          "(pip install -e .)")
    from .pretrain.checkpoint import latest_checkpoint
    from .pretrain.recipe import load_recipe
    from .pretrain.trainer import run_pretrain

    recipe = load_recipe(DEMO_RECIPE, list(train_overrides))
    resume = run.run_dir.exists() and latest_checkpoint(run.run_dir) is not None
    print(f"[4/{STEPS}] pretraining the demo recipe ({recipe.train.max_steps} steps, "
          f"{', '.join(recipe.objective_names)}) on the train split into {run.run_dir}", flush=True)
    run.pretrained = run_pretrain(recipe, run.features, run.manifest, run.run_dir, resume=resume, progress=True)
    run.times["pretrain"] = run.pretrained["seconds"]


def evaluate_retrieval(run: DemoRun) -> None:
    print(f"[5/{STEPS}] evaluating text-to-video retrieval on the test split into {run.eval_dir}", flush=True)
    started = time.monotonic()
    run.reports = evaluate_demo(run.run_dir, run.features, run.manifest, run.eval_dir)
    run.times["eval"] = time.monotonic() - started


def print_summary(run: DemoRun, train_videos: int, test_videos: int) -> None:
    """The data, features, visual words, training and time of the run."""
    entries = load_manifest(run.manifest)
    store = FeatureStore(run.features)
    try:
        lengths = [len(store.get(v).features) for v in store.video_ids]
        dim, videos, shards = store.dim, len(store), len(store.shards)
    finally:
        store.close()
    captions = sum(len(e.captions) for e in entries)
    q, t = run.quantized, run.pretrained
    records = read_metrics(run.run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    print("demo summary")
    print(f"  videos            {len(entries)} synthesized ({train_videos} train, {test_videos} test), "
          f"{videos} with features, {run.extracted.failures_total} failed")
    print(f"  captions          {captions} ({captions / len(entries):.1f} per video)")
    print(f"  clips per video   mean {np.mean(lengths):.1f}, min {min(lengths)}, max {max(lengths)}")
    print(f"  feature dim       {dim} (encoder 'pixels', float16 in {shards} shard(s))")
    print(f"  visual words      {q['words_used']} of {q['vocab_size']} used, entropy {q['entropy_bits']:.2f} bits")
    print(f"  pretraining       {t['steps']} steps, {t['examples_per_s']:.1f} examples/s; loss "
          f"{first['loss']:.3f} -> {last['loss']:.3f} ("
          + ", ".join(f"{k[:-5]} {first[k]:.2f} -> {last[k]:.2f}" for k in sorted(last) if k.endswith("_loss") and k in first)
          + ")")
    print("  time              " + ", ".join(f"{k} {v:.1f} s" for k, v in run.times.items())
          + f", total {time.monotonic() - run.started:.1f} s")


def print_written(run: DemoRun) -> None:
    features, eval_dir, t = run.features, run.eval_dir, run.pretrained
    print(f"  written           manifest {run.manifest}")
    print(f"                    features {features}/shard_*.h5, failures {run.extracted.failures_file}")
    print(f"                    codebook {run.quantized['codebook']}, tokens {features}/shard_*.tokens.h5")
    print(f"                    quantize report {run.quantize_report}/ (quantize_summary.json, word_frequencies.png)")
    print(f"                    checkpoint {t['checkpoint']}")
    print(f"                    training log {run.run_dir}/metrics.jsonl (+ metrics.csv, tensorboard/), "
          f"loss curves {t.get('loss_plot')}")
    print(f"                    retrieval reports {eval_dir}/{{pretrained,untrained,tfidf_ridge}}.json, "
          f"rankings {eval_dir}/*.rankings.jsonl")
    print(f"                    recall@K plot {eval_dir}/recall.png, table {eval_dir}/table.txt")


def evaluate_demo(run_dir: Path, features: Path, manifest: Path, eval_dir: Path) -> dict:
    """Reports for the pretrained model, its untrained twin and the TF-IDF baseline on the test split."""
    from .retrieval.baselines import TfidfRidge, pooled_features, training_pairs
    from .retrieval.evaluate import EvalConfig, evaluate_embeddings, rankings_rows
    from .retrieval.job import make_report, plot_recall, run_eval, split_entries, write_outputs
    from .retrieval.queries import build_queries

    cfg = EvalConfig(split="test")
    reports = {}
    for name, untrained in (("pretrained", False), ("untrained", True)):
        reports[name] = run_eval(run_dir, features, manifest, cfg, eval_dir / f"{name}.json",
                                 eval_dir / f"{name}.rankings.jsonl", None, progress=False, untrained=untrained)
    store = FeatureStore(features)
    try:
        texts, ids = training_pairs(load_manifest(manifest, "train"), store)
        baseline = TfidfRidge().fit(texts, pooled_features(store, ids))
        qs = build_queries(split_entries(manifest, "test"), store, cfg.query_mode)
        part, results = evaluate_embeddings(qs, baseline.embed_texts(qs.texts),
                                            baseline.embed_videos(pooled_features(store, qs.video_ids)), cfg)
    finally:
        store.close()
    rep = make_report(part, qs, cfg, results, model={"kind": TfidfRidge.name, "alpha": baseline.alpha,
                                                     "validation_R@1": baseline.validation,
                                                     "train_pairs": len(texts)},
                      features=str(features), manifest=str(manifest))
    write_outputs(rep, rankings_rows(qs, results), eval_dir / "tfidf_ridge.json",
                  eval_dir / "tfidf_ridge.rankings.jsonl", None)
    reports["TF-IDF ridge"] = rep
    plot_recall(reports, eval_dir / "recall.png")
    (eval_dir / "table.txt").write_text(retrieval_table(reports) + "\n")
    return reports


def retrieval_table(reports: dict) -> str:
    """Text-to-video table on the test split, with each baseline's paired bootstrap test against the first row."""
    from .retrieval.compare import format_p, paired_ranks
    from .retrieval.metrics import paired_bootstrap

    names = list(reports)
    first = reports[names[0]]
    lines = [f"text-to-video retrieval, test split: {first['n_videos']} videos, {first['n_queries']['t2v']} queries "
             f"(chance R@1 {100 / first['n_videos']:.1f}%)",
             f"  {'model':14}{'R@1':>7}{'95% CI':>15}{'R@5':>7}{'R@10':>7}{'MedR':>7}{'MnR':>8}   "
             f"{names[0]} vs this row (paired bootstrap, R@1)"]
    for name in names:
        m, ci = reports[name]["t2v"]["metrics"], reports[name]["t2v"]["ci95"]["R@1"]
        line = (f"  {name:14}{m['R@1']:7.1f}{f'[{ci[0]:.1f}, {ci[1]:.1f}]':>15}{m['R@5']:7.1f}{m['R@10']:7.1f}"
                f"{m['MedR']:7g}{m['MnR']:8.1f}")
        if name != names[0]:
            a, b, _ = paired_ranks(reports[name], first, "t2v")
            t = paired_bootstrap(b, a, n_boot=2000)
            line += f"   {t['delta']:+.1f} points, {format_p(t)}"
        lines.append(line)
    v = reports[names[0]]["v2t"]["metrics"]
    lines.append(f"  ({names[0]} video-to-text: R@1 {v['R@1']:.1f}, R@5 {v['R@5']:.1f}, R@10 {v['R@10']:.1f}, "
                 f"MedR {v['MedR']:g})")
    return "\n".join(lines)
