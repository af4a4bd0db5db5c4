"""``videolm eval-retrieval``: load a checkpoint, encode, score, write the report.

Outputs (formats in docs/formats.md):

* report JSON: metrics and 95% bootstrap intervals per direction, counts,
  what was evaluated and how (checkpoint, step, split, search, flags), and the
  per-query ranks that ``compare-runs`` (``retrieval.compare``) pairs up;
* rankings JSONL: per query, its top list with scores and the right answer's rank;
* PNG: recall@K curves of both directions.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..features.layout import INDEX_CACHE_DIR
from ..features.shards import FeatureStore
from ..manifests.manifest import SPLITS, load_manifest
from .encoding import PairEncoder, require_align_head
from .evaluate import DIRECTIONS, EvalConfig, evaluate_embeddings, rankings_rows
from .index_cache import IndexCache, model_fields
from .metrics import recall_curve
from .protocols import check_entries, protocol
from .queries import EvalError, QuerySet, build_queries

TIE_POLICY = ("rank = 1 + candidates scoring strictly higher than the best correct one; "
              "ties count in the correct one's favour (pessimistic rank = rank + ties); NaN scores as -inf")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", leave=False)


def split_entries(manifest: Path, split: str):
    entries = load_manifest(manifest, split)
    if not entries:
        counts = {s: len(load_manifest(manifest, s)) for s in SPLITS}
        have = ", ".join(f"{s}: {n}" for s, n in counts.items() if n) or "none"
        raise EvalError(f"{manifest}: no videos in split {split!r} (videos per split: {have})")
    return entries


def evaluate_model(model, tokenizer, store: FeatureStore, qs: QuerySet, cfg: EvalConfig,
                   progress: bool = False, cache: IndexCache | None = None) -> tuple[dict, dict, dict]:
    """(report part, results, timing) for a model on prepared queries."""
    enc = PairEncoder(model, tokenizer, store, cfg.batch_size, cfg.device)
    t0 = time.perf_counter()
    bar = _progress(len(qs.texts) + len(qs.video_ids), "encode", progress)
    text_vecs = enc.embed_texts(qs.texts, bar)
    video_vecs = enc.embed_videos(qs.video_ids, bar)
    if bar is not None:
        bar.close()
    t1 = time.perf_counter()

    def pair_scores(ti, vi):
        return enc.align_scores([qs.texts[i] for i in ti], [qs.video_ids[j] for j in vi])

    part, results = evaluate_embeddings(qs, text_vecs, video_vecs, cfg, pair_scores, cache)
    return part, results, {"encode_s": t1 - t0, "score_s": time.perf_counter() - t1}


def index_cache_for(store: FeatureStore, cfg: EvalConfig, model: tuple[dict, dict]) -> IndexCache | None:
    """The cache of faiss indexes in ``<features>/indexes`` for this model, split and query mode."""
    if cfg.search.mode == "exact":
        return None
    slot, key = model
    return IndexCache(store.directory / INDEX_CACHE_DIR, cfg.index_cache,
                      {**slot, "split": cfg.split, "query_mode": cfg.query_mode},
                      {**key, "features_fingerprint": store.fingerprint()})


def index_report(results: dict, cfg: EvalConfig) -> dict | None:
    """Per direction, whether the faiss index was built or reused and the seconds of each step."""
    if cfg.search.mode == "exact":
        return None
    rounded = {d: {k: round(v, 4) if isinstance(v, float) else v for k, v in (results[d].index or {}).items()}
               for d in DIRECTIONS}
    return {"cache": cfg.index_cache, **rounded}


def make_report(part: dict, qs: QuerySet, cfg: EvalConfig, results: dict, **about) -> dict:
    search = dict(results["t2v"].params)
    search.pop("rerank_top", None)
    return {
        "videolm": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **about,
        "protocol": protocol(cfg.protocol).record() if cfg.protocol else None,
        "split": cfg.split,
        "query_mode": cfg.query_mode,
        "search": search,
        "rerank_top": cfg.rerank_top,
        "dsl": cfg.search.dsl,
        "tie_policy": TIE_POLICY,
        "n_videos": len(qs.video_ids),
        "n_queries": {d: part[d]["n_queries"] for d in DIRECTIONS},
        "excluded": {"missing_features": len(qs.missing), "missing_examples": qs.missing[:10],
                     "videos_without_query": qs.no_query, "empty_queries": len(qs.empty)},
        "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "level": 0.95},
        "index": index_report(results, cfg),
        "eval_config": asdict(cfg),
        **part,
    }


def write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_rankings(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def plot_recall(reports: dict[str, dict], path: Path, max_k: int = 100) -> Path:
    """Recall@K curves (t2v solid, v2t dashed) of one or more reports, by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    try:
        for i, (label, rep) in enumerate(reports.items()):
            for d, style in (("t2v", "-"), ("v2t", "--")):
                ranks = np.asarray(rep[d]["per_query"]["ranks"])
                k = min(max_k, rep["n_videos"] if d == "t2v" else rep["n_queries"]["t2v"])
                ax.plot(np.arange(1, k + 1), recall_curve(ranks, k), style, color=f"C{i}", label=f"{label} {d}")
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(f"retrieval, split {next(iter(reports.values()))['split']}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def run_eval(checkpoint: Path, features: Path, manifest: Path, cfg: EvalConfig, out: Path | None = None,
             rankings: Path | None = None, plot: Path | None = None, progress: bool = True,
             untrained: bool = False) -> dict:
    """Evaluate a checkpoint (or, with ``untrained``, its architecture at initialisation) and write outputs."""
    from ..pretrain.checkpoint import latest_checkpoint, load_pretrained, training_record
    from ..model.video_text import build_model

    model, tokenizer, run_cfg = load_pretrained(checkpoint, cfg.device)
    ckpt = latest_checkpoint(checkpoint)
    meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
    model_id = model_fields(ckpt, meta.get("step"), untrained, cfg.seed)
    about = {"model": {"kind": "checkpoint", "checkpoint": str(ckpt), "step": meta.get("step"),
                       "objectives": run_cfg.objective_names, "training": training_record(ckpt)}}
    if cfg.rerank_top:
        require_align_head(model, run_cfg.objective_names)
    if untrained:
        # Same architecture and code path, weights as a new run starts (text encoder from text_init).
        torch.manual_seed(cfg.seed)
        model = build_model(run_cfg.model).to(cfg.device).eval()
        about = {"model": {"kind": "untrained", "architecture_of": str(ckpt), "init_seed": cfg.seed}}
    store = FeatureStore(features)
    try:
        entries = split_entries(manifest, cfg.split)
        if cfg.protocol:
            check_entries(cfg.protocol, entries, f"split {cfg.split} of {manifest}")
        qs = build_queries(entries, store, cfg.query_mode)
        part, results, timing = evaluate_model(model, tokenizer, store, qs, cfg, progress,
                                               index_cache_for(store, cfg, model_id))
    finally:
        store.close()
    report = make_report(part, qs, cfg, results, **about, features=str(features), manifest=str(manifest),
                         timing=timing)
    write_outputs(report, rankings_rows(qs, results), out, rankings, plot)
    return report


def write_outputs(report: dict, rows: list[dict], out: Path | None, rankings: Path | None, plot: Path | None):
    written = {}
    if rankings is not None:
        written["rankings"] = str(write_rankings(rows, rankings))
    if plot is not None:
        written["plot"] = str(plot_recall({report["model"].get("kind", "run"): report}, plot))
    report["written"] = written
    if out is not None:
        write_json(report, out)
        written["report"] = str(out)


def metrics_line(report: dict, direction: str = "t2v") -> str:
    m, ci = report[direction]["metrics"], report[direction]["ci95"]
    return (f"{direction}: R@1 {m['R@1']:.1f} [{ci['R@1'][0]:.1f}, {ci['R@1'][1]:.1f}]  R@5 {m['R@5']:.1f}  "
            f"R@10 {m['R@10']:.1f}  MedR {m['MedR']:g}  MnR {m['MnR']:.1f}  ({report[direction]['n_queries']} queries)")


def print_report(report: dict, stream=None) -> None:
    for d in DIRECTIONS:  # sys.stdout looked up now, not at import (tests and notebooks replace it)
        print(metrics_line(report, d), file=stream or sys.stdout)
