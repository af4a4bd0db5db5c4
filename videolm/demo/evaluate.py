"""The demo's scores on the test split: retrieval, captioning and moments, each beside its baselines.

* retrieval: the pretrained model (zero-shot), its fine-tuned best checkpoint, the
  same architecture untrained, and a TF-IDF -> ridge baseline, through
  ``eval-retrieval``'s evaluator (whole-video queries, the demo's pretraining task);
* captioning: greedy captions of every timed segment (YouCook2's protocol) from the
  fine-tuned checkpoint, and the most frequent training caption as a baseline, both
  scored by ``eval-caption`` (pycocoevalcap; METEOR and the PTB tokenizer with Java);
* moments: the moment model through ``eval-moments`` (the videos' clips alone: the
  synthetic videos have no subtitles), and the whole-video and prior-span baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..features.shards import FeatureStore
from ..manifests.manifest import load_manifest

RETRIEVAL_FILES = {"pretrained": "pretrained", "fine-tuned": "finetuned", "untrained": "untrained",
                   "TF-IDF ridge": "tfidf_ridge"}


@dataclass
class DemoScores:
    retrieval: dict = field(default_factory=dict)  # row name -> eval-retrieval report
    captions: dict = field(default_factory=dict)  # row name -> eval-caption report
    moments: dict = field(default_factory=dict)  # eval-moments report
    moment_baselines: dict = field(default_factory=dict)  # row name -> {"SVMR": metrics}
    caption_speed: float = 0.0  # captions/s, greedy


def evaluate_demo(runs: dict[str, Path], features: Path, manifest: Path, eval_dir: Path) -> DemoScores:
    scores = DemoScores()
    scores.retrieval = evaluate_retrieval(runs, features, manifest, eval_dir)
    scores.captions, scores.caption_speed = evaluate_captioning(runs["finetune"] / "best", features, manifest,
                                                                eval_dir)
    scores.moments, scores.moment_baselines = evaluate_moments(runs["moments"], features, manifest, eval_dir)
    return scores


def evaluate_retrieval(runs: dict[str, Path], features: Path, manifest: Path, eval_dir: Path) -> dict:
    from ..retrieval.baselines import TfidfRidge, pooled_features, training_pairs
    from ..retrieval.evaluate import EvalConfig, evaluate_embeddings, rankings_rows
    from ..retrieval.job import make_report, plot_recall, run_eval, split_entries, write_outputs
    from ..retrieval.queries import build_queries

    cfg = EvalConfig(split="test")
    reports = {}
    models = {"pretrained": (runs["pretrain"], False), "fine-tuned": (runs["finetune"] / "best", False),
              "untrained": (runs["pretrain"], True)}
    for name, (checkpoint, untrained) in models.items():
        stem = eval_dir / RETRIEVAL_FILES[name]
        reports[name] = run_eval(checkpoint, features, manifest, cfg, stem.with_suffix(".json"),
                                 stem.with_suffix(".rankings.jsonl"), None, progress=False, untrained=untrained)
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
    return reports


def evaluate_captioning(checkpoint: Path, features: Path, manifest: Path, eval_dir: Path) -> tuple[dict, float]:
    """({"fine-tuned": report, "most frequent caption": report}, greedy captions/s)."""
    from ..captioning.baselines import constant_rows, most_frequent_caption
    from ..captioning.job import CaptionConfig, read_captions, run_caption, run_eval_caption
    from ..retrieval.job import write_rankings

    cfg = CaptionConfig(split="test", unit="segment")
    meta = run_caption(checkpoint, features, manifest, cfg, eval_dir / "captions.jsonl", progress=False)
    reports = {"fine-tuned": run_eval_caption(eval_dir / "captions.jsonl", eval_dir / "caption_report.json")}
    text, count = most_frequent_caption(load_manifest(manifest, "train"))
    rows = constant_rows(read_captions(eval_dir / "captions.jsonl"), text)
    write_rankings(rows, eval_dir / "captions_baseline.jsonl")
    base = run_eval_caption(eval_dir / "captions_baseline.jsonl", eval_dir / "caption_baseline_report.json")
    base["baseline"] = {"caption": text, "train_count": count}
    reports["most frequent caption"] = base
    return reports, float(meta["captions_per_s"])


def evaluate_moments(run_dir: Path, features: Path, manifest: Path, eval_dir: Path) -> tuple[dict, dict]:
    from ..moments.baselines import baseline_reports
    from ..moments.job import MomentConfig, build_moment_queries, run_moments
    from ..retrieval.job import split_entries, write_json

    report = run_moments(run_dir, features, manifest, MomentConfig(split="test", context="video"),
                         eval_dir / "moments.json", eval_dir / "moments.spans.jsonl")
    store = FeatureStore(features)
    try:
        train = build_moment_queries(split_entries(manifest, "train"), store)
        test = build_moment_queries(split_entries(manifest, "test"), store)
        baselines = baseline_reports(train, test, store)
    finally:
        store.close()
    write_json(baselines, eval_dir / "moment_baselines.json")
    return report, baselines
