#!/usr/bin/env python
"""Does pretraining transfer? Pretrain every recipe on a narrated corpus, fine-tune on small labelled sets.

Protocol and noise model: docs/transfer.md (fixed before any study ran). Steps:

1. data: a narrated corpus (``synth --style narrated``), clean downstream train/val/test
   sets and an order-pair test (``--style order_pairs``), each from its own seed; ``pixels``
   features, one directory for the corpus and one for the downstream videos; visual words
   fitted on the corpus alone (hierarchical, and flat for the VideoBERT ablation) and
   assigned to the downstream videos with the corpus's codebook;
2. pretraining: scratch (none), joint, univl, hero, videobert (``pipelines/transfer/``), the
   same number of examples each (steps x batch), per seed; ablations (seed 0): UniVL's stage 2
   minus each objective, HERO minus each task, VideoBERT with a flat codebook;
3. fine-tuning: ``pipelines/transfer/finetune.yaml`` on each train size, val selection; caption
   fine-tuning (two_stream choices) and moment fine-tuning (hierarchical) at one size;
4. scoring on the test sets, then ``transfer_report`` writes JSON, markdown and PNG plots.

Every run is a directory with its ``result.json``; a rerun skips what is done (the study
resumes). Runs go to ``--jobs`` processes with one torch thread each.

    python benchmarks/bench_transfer.py --out transfer_out            # full study (~85 min, 2 cores)
    python benchmarks/bench_transfer.py --quick --out transfer_quick  # reduced grid, minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

RECIPES = REPO / "pipelines" / "transfer"
CHOICES = ("scratch", "joint", "univl", "hero", "videobert")
UNIVL_ABLATIONS = ("joint", "mlm", "mfm_nce", "align", "caption")
HERO_ABLATIONS = ("mlm", "mfm_nce", "fom", "vsm")
SEEDS = {"corpus": 100, "train": 200, "val": 201, "test": 202, "order": 203}


@dataclass(frozen=True)
class Plan:
    corpus: int = 1500
    sizes: tuple[int, ...] = (25, 50, 100, 200)
    val: int = 100
    test: int = 200
    order_pairs: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 120  # x batch: the examples every pretraining run sees (its budget)
    finetune_steps: int = 100
    task_steps: int = 100  # caption and moment fine-tuning
    task_size: int = 100  # the train size the caption/moment fine-tunes and the ablations use
    batch: int = 32  # pretraining
    ft_batch: int = 16  # fine-tuning, every size (at most the smallest train set)
    select_every: int = 25
    ablations: bool = True
    univl_ablations: tuple[str, ...] = UNIVL_ABLATIONS  # UniVL's stage 2 minus each of these in turn
    hero_ablations: tuple[str, ...] = HERO_ABLATIONS
    k: int = 8  # hierarchical codebook: k^2 words; the flat ablation fits k^2 words in one level
    jobs: int = 2


FULL = Plan()
QUICK = Plan(corpus=64, sizes=(8, 16), val=12, test=16, order_pairs=6, seeds=(0,), pretrain_steps=4,
             finetune_steps=4, task_steps=2, task_size=16, batch=8, ft_batch=8, select_every=2, k=3,
             univl_ablations=("mlm",), hero_ablations=("fom",))


def log(msg: str) -> None:
    print(f"[transfer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data

def prepare_data(out: Path, plan: Plan) -> dict:
    """Synthesise, extract and quantise; returns the paths every run reads."""
    from videolm.extract.config import ExtractConfig
    from videolm.extract.job import run_extract
    from videolm.manifests.manifest import load_manifest, write_manifest
    from videolm.manifests.synthetic import synthesize

    data = out / "data"
    sets = {"corpus": (plan.corpus, "train", "narrated"), "train": (max(plan.sizes), "train", "clean"),
            "val": (plan.val, "val", "clean"), "test": (plan.test, "test", "clean"),
            "order": (2 * plan.order_pairs, "test", "order_pairs")}
    entries = {}
    for name, (n, split, style) in sets.items():
        folder = data / name
        marker = folder / "synth.json"
        wanted = {"videos": n, "seed": SEEDS[name], "split": split, "style": style}
        if not (marker.exists() and json.loads(marker.read_text()) == wanted):
            log(f"synthesising {n} {style} videos ({name}, seed {SEEDS[name]})")
            synthesize(folder, n, SEEDS[name], split=split, id_prefix=name, progress=False, workers=plan.jobs,
                       style=style)
            marker.write_text(json.dumps(wanted))
        entries[name] = load_manifest(folder / "manifest.jsonl")
    paths = {"corpus_manifest": data / "corpus" / "manifest.jsonl", "test": data / "test.jsonl",
             "order": data / "order.jsonl", "down_manifest": data / "downstream.jsonl"}
    write_manifest(entries["test"], paths["test"])
    write_manifest(entries["order"], paths["order"])
    write_manifest([e for k in ("train", "val", "test", "order") for e in entries[k]], paths["down_manifest"])
    for n in plan.sizes:  # nested train sets: the first n videos, with the val set for selection
        paths[f"train_{n}"] = write_manifest(entries["train"][:n] + entries["val"], data / f"train_{n}.jsonl")
    cfg = ExtractConfig(encoder="pixels", backend="av", shard_size=500, workers=plan.jobs)
    for name, manifest in (("corpus", paths["corpus_manifest"]), ("down", paths["down_manifest"])):
        log(f"extracting {name} features")
        summary = run_extract(manifest, out / "features" / name, cfg)
        if summary.failures_total:
            raise RuntimeError(f"{summary.failures_total} videos failed to extract: {summary.failures_file}")
    paths.update(quantize_all(out / "features", plan))
    return {k: str(v) for k, v in paths.items()}


def quantize_all(features: Path, plan: Plan) -> dict:
    """Visual words fitted on the corpus only: hierarchical (k, 2 levels) and flat (k^2 words)."""
    from videolm.quantize.job import run_quantize
    from videolm.quantize.kmeans import QuantizeConfig

    books = {"hier": QuantizeConfig(k=plan.k, levels=2, sample=100_000),
             "flat": QuantizeConfig(k=plan.k ** 2, levels=1, sample=100_000)}
    paths = {}
    for name, qcfg in books.items():
        corpus, down = features / "corpus", features / "down"
        if name == "flat":  # a second copy of the same feature shards carries the flat words
            corpus, down = _copy_features(corpus, features / "corpus_flat"), _copy_features(down, features / "down_flat")
        run_quantize(corpus, qcfg, overwrite=True, progress=False)
        run_quantize(down, None, overwrite=True, progress=False, codebook_from=corpus)
        paths[f"corpus_{name}"], paths[f"down_{name}"] = corpus, down
    return paths


def _copy_features(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.tokens.h5", "codebook.h5", "*.partial-*"))
    return dst


# --------------------------------------------------------------------------- runs

def recipe_dict(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def without(recipe: dict, objective: str) -> dict:
    """The recipe with one objective removed from every stage; a stage left empty is dropped and the
    others share its steps (the budget in examples stays the same)."""
    r = copy.deepcopy(recipe)
    if "stages" not in r:
        del r["objectives"][objective]
        return r
    for stage in r["stages"]:
        stage["objectives"].pop(objective, None)
    kept = [s for s in r["stages"] if s["objectives"]]
    total = sum(s["fraction"] for s in kept)
    for s in kept:
        s["fraction"] = s["fraction"] / total
    r["stages"] = kept
    return r


def sized(recipe: dict, plan: Plan, steps: int, seed: int, finetune: bool = False) -> dict:
    r = copy.deepcopy(recipe)
    t = r["train"]
    t.update(max_steps=steps, batch_size=plan.ft_batch if finetune else plan.batch, seed=seed,
             warmup_steps=min(t["warmup_steps"], steps // 5),
             checkpoint_every=max(1, min(t["checkpoint_every"], steps)), log_every=max(1, min(t["log_every"], steps)))
    if finetune and "select" in r:
        r["select"]["every"] = plan.select_every
    return r


def pretrain_runs(plan: Plan) -> list[dict]:
    """Every pretraining run: {name, choice, seed, recipe (dict), features key}."""
    runs = []
    for seed in plan.seeds:
        for choice in CHOICES[1:]:
            runs.append({"name": f"{choice}_s{seed}", "choice": choice, "seed": seed,
                         "recipe": recipe_dict(choice), "features": ""})
    if plan.ablations:
        univl, hero = recipe_dict("univl"), recipe_dict("hero")
        for obj in plan.univl_ablations:
            runs.append({"name": f"univl-{obj}_s0", "choice": f"univl - {obj}", "seed": 0,
                         "recipe": without(univl, obj), "features": ""})
        for obj in plan.hero_ablations:
            runs.append({"name": f"hero-{obj}_s0", "choice": f"hero - {obj}", "seed": 0,
                         "recipe": without(hero, obj), "features": ""})
        runs.append({"name": "videobert-flat_s0", "choice": "videobert (flat codebook)", "seed": 0,
                     "recipe": recipe_dict("videobert"), "features": "flat"})
    for r in runs:
        r["recipe"] = sized(r["recipe"], plan, plan.pretrain_steps, r["seed"])
    return runs


def features_for(run: dict, paths: dict, side: str) -> str:
    """The feature directory a run reads: corpus or downstream, with the flat words where asked."""
    return paths[f"{side}_flat"] if run["features"] == "flat" else paths[f"{side}_hier"]


def finetune_runs(plan: Plan, pretrains: list[dict]) -> list[dict]:
    """Retrieval fine-tunes (every choice x seed x size; ablations at task_size), then caption and moment ones."""
    by_name = {p["name"]: p for p in pretrains}
    ft, runs = recipe_dict("finetune"), []
    for seed in plan.seeds:
        for choice in CHOICES:
            init = None if choice == "scratch" else f"{choice}_s{seed}"
            for n in plan.sizes:
                runs.append(_ft(f"{choice}_s{seed}_n{n}", choice, seed, n, init, ft, plan, "retrieval"))
        for choice in ("scratch", "joint", "univl"):
            init = None if choice == "scratch" else f"{choice}_s{seed}"
            runs.append(_ft(f"caption_{choice}_s{seed}", choice, seed, plan.task_size, init, recipe_dict("caption"),
                            plan, "caption"))
        for choice, init in (("scratch", None), ("hero", f"hero_s{seed}")):
            runs.append(_ft(f"moments_{choice}_s{seed}", choice, seed, plan.task_size, init, recipe_dict("moments"),
                            plan, "moments", model_of="hero"))
    for p in pretrains:
        if p["seed"] == 0 and p["name"] != f"{p['choice']}_s0":  # an ablation
            runs.append(_ft(f"{p['name']}_n{plan.task_size}", p["choice"], 0, plan.task_size, p["name"], ft, plan,
                            "retrieval"))
    for r in runs:
        r["features"] = by_name[r["init"]]["features"] if r["init"] else ""
    return runs


def _ft(name, choice, seed, size, init, recipe, plan, task, model_of=None) -> dict:
    """One fine-tuning run. Its recipe's model section is the pretraining recipe's (``model_of``, else the
    choice's own; scratch: joint's two_stream): what an init checkpoint holds, and scratch's model."""
    steps = plan.finetune_steps if task == "retrieval" else plan.task_steps
    r = sized(recipe, plan, steps, seed, finetune=True)
    parent = choice.split(" ")[0]
    r["model"] = recipe_dict(model_of or ("joint" if parent == "scratch" else parent))["model"]
    return {"name": name, "choice": choice, "seed": seed, "size": size, "init": init, "recipe": r, "task": task}


def _recipe(run: dict, out: Path):
    from videolm.pretrain.recipe import load_recipe

    out.mkdir(parents=True, exist_ok=True)
    path = out / "study_recipe.yaml"
    path.write_text(yaml.safe_dump(run["recipe"], sort_keys=False))
    return load_recipe(path)


def _done(out: Path) -> dict | None:
    f = out / "result.json"
    return json.loads(f.read_text()) if f.exists() else None


def _finish(out: Path, result: dict) -> dict:
    tmp = out / "result.json.part"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")
    slim(out)
    return result


def slim(out: Path) -> None:
    """A finished run keeps only the model it is scored by: the optimizer states (twice the model) and the
    superseded checkpoints go, or the full grid would need about 60 GB (a checkpoint is ~230 MB)."""
    for state in out.glob("**/checkpoints/step_*/trainer.pt"):
        state.unlink()
    if (out / "best" / "checkpoints").is_dir():  # fine-tuned with selection: best/ is the model
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    else:
        steps = sorted((out / "checkpoints").glob("step_*"))
        for old in steps[:-1]:
            shutil.rmtree(old)


def _start(run: dict, root: str, kind: str) -> tuple[Path, dict | None, object, bool]:
    """(run directory, its result when already finished, else its recipe and whether to resume)."""
    import torch
    from videolm.pretrain.checkpoint import latest_checkpoint

    torch.set_num_threads(1)
    out = Path(root) / kind / run["name"]
    if (found := _done(out)) is not None:
        return out, found, None, False
    return out, None, _recipe(run, out), latest_checkpoint(out) is not None


def do_pretrain(run: dict, paths: dict, root: str) -> dict:
    from videolm.pretrain.trainer import run_pretrain

    out, found, cfg, resume = _start(run, root, "pretrain")
    if found is not None:
        return found
    summary = run_pretrain(cfg, features_for(run, paths, "corpus"), paths["corpus_manifest"], out, resume=resume,
                           progress=False)
    down = features_for(run, paths, "down")
    result = {"run": run["name"], "choice": run["choice"], "seed": run["seed"], "seconds": summary["seconds"],
              "steps": summary["steps"], "examples": summary["steps"] * cfg.train.batch_size,
              "zero_shot": score_retrieval(out, down, paths, out / "zero_shot")}
    return _finish(out, result)


def do_finetune(run: dict, paths: dict, root: str) -> dict:
    from videolm.finetune.job import run_finetune

    out, found, cfg, resume = _start(run, root, "finetune")
    if found is not None:
        return found
    init = str(Path(root) / "pretrain" / run["init"]) if run["init"] else None
    down = features_for(run, paths, "down")
    summary = run_finetune(init, cfg, down, paths[f"train_{run['size']}"], out, resume=resume, progress=False)
    best = out / "best" if summary.get("best") else out
    result = {k: run[k] for k in ("name", "choice", "seed", "size", "init", "task")}
    result.update(seconds=summary["seconds"], steps=summary["steps"], best=summary.get("best"))
    if run["task"] == "retrieval":
        result["test"] = score_retrieval(best, down, paths, out / "test")
    elif run["task"] == "caption":
        result["test"] = score_captions(best, down, paths["test"], out / "test")
    else:
        result["test"] = score_moments(best, down, paths["test"], out / "test")
    return _finish(out, result)


# --------------------------------------------------------------------------- scoring

def score_retrieval(checkpoint: Path, features: str, paths: dict, out: Path) -> dict:
    """Text-to-video on the test set (whole-video queries) and on the order pairs (R@1 and pair accuracy)."""
    from videolm.retrieval.evaluate import EvalConfig
    from videolm.retrieval.job import run_eval

    out.mkdir(parents=True, exist_ok=True)
    cfg = EvalConfig(split="test", bootstrap=200)
    test = run_eval(checkpoint, Path(features), Path(paths["test"]), cfg, out / "test.json", progress=False)
    order = run_eval(checkpoint, Path(features), Path(paths["order"]), cfg, out / "order.json", progress=False)
    return {"test": _retrieval_part(test), "order": {**_retrieval_part(order),
                                                     **pair_accuracy(checkpoint, features, paths["order"])}}


def _retrieval_part(report: dict) -> dict:
    t2v = report["t2v"]
    return {"metrics": {k: t2v["metrics"][k] for k in ("R@1", "R@5", "R@10", "MedR", "MnR")},
            "ci95": {k: t2v["ci95"][k] for k in ("R@1", "R@5")},
            "keys": t2v["per_query"]["keys"], "ranks": t2v["per_query"]["ranks"]}


def pair_accuracy(checkpoint: Path, features: str, manifest: str) -> dict:
    """How often an order query scores its own video above its reversed twin (chance: 50%)."""
    import numpy as np
    from videolm.features.shards import FeatureStore
    from videolm.manifests.manifest import load_manifest
    from videolm.pretrain.checkpoint import load_pretrained
    from videolm.retrieval.encoding import PairEncoder

    entries = load_manifest(manifest)
    queries = [next(c.text for c in e.captions if c.kind == "query") for e in entries]
    model, tokenizer, _ = load_pretrained(checkpoint)
    store = FeatureStore(features)
    try:
        enc = PairEncoder(model, tokenizer, store)
        t, v = enc.embed_texts(queries), enc.embed_videos([e.video_id for e in entries])
    finally:
        store.close()
    own = (t * v).sum(1)
    twin = (t * v[np.arange(len(v)) ^ 1]).sum(1)  # videos 2k and 2k+1 are each other's twin
    wins = (own > twin).astype(float) + 0.5 * (own == twin)
    return {"pair_accuracy": float(100 * wins.mean()), "pair_wins": wins.tolist()}


def score_captions(checkpoint: Path, features: str, manifest: str, out: Path) -> dict:
    from videolm.captioning.job import CaptionConfig, run_caption, run_eval_caption

    out.mkdir(parents=True, exist_ok=True)
    run_caption(checkpoint, Path(features), Path(manifest), CaptionConfig(split="test", unit="segment"),
                out / "captions.jsonl", progress=False)
    rep = run_eval_caption(out / "captions.jsonl", out / "caption_report.json")
    return {"metrics": rep["metrics"], "ci95": rep.get("ci95", {}), "keys": rep["per_item"]["keys"],
            "cider": rep["per_item"]["CIDEr-D"]}


def score_moments(checkpoint: Path, features: str, manifest: str, out: Path) -> dict:
    from videolm.moments.job import MomentConfig, run_moments

    out.mkdir(parents=True, exist_ok=True)
    rep = run_moments(checkpoint, Path(features), Path(manifest), MomentConfig(split="test", context="video"),
                      out / "moments.json", out / "moments.spans.jsonl")
    return {"SVMR": rep["SVMR"]}


# --------------------------------------------------------------------------- driver

def run_all(fn, runs: list[dict], paths: dict, out: Path, jobs: int, what: str) -> list[dict]:
    log(f"{what}: {len(runs)} runs in {jobs} process(es)")
    t0 = time.monotonic()
    results, failed = [], []
    # spawn: forked children of a process that ran torch threads can hang
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet)
    with pool:
        futures = [pool.submit(fn, r, paths, str(out)) for r in runs]
        for n, (run, f) in enumerate(zip(runs, futures), 1):
            try:  # one failed run is recorded and the others go on; a rerun retries only what failed
                results.append(f.result())
            except Exception as exc:  # noqa: BLE001 - any error of one run
                failed.append({"run": run["name"], "error": f"{type(exc).__name__}: {exc}"})
                log(f"{what}: {run['name']} FAILED: {type(exc).__name__}: {exc}")
            log(f"{what}: {n}/{len(runs)} finished ({run['name']}, {time.monotonic() - t0:.0f} s)")
    if failed:
        with (out / "failures.jsonl").open("a") as f:
            f.write("".join(json.dumps(x) + "\n" for x in failed))
    return results, failed


def _quiet() -> None:
    """Worker setup: the study's progress lines only (per-run logs stay in each run's metrics)."""
    import logging

    logging.getLogger("videolm").setLevel(logging.ERROR)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("transfer_out"))
    ap.add_argument("--quick", action="store_true", help="the reduced grid (tests; minutes on 2 cores)")
    ap.add_argument("--jobs", type=int, help="runs at a time (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (training runs; scoring stays on cpu)")
    ap.add_argument("--no-ablations", action="store_true")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = replace(plan, jobs=args.jobs or plan.jobs, ablations=plan.ablations and not args.no_ablations)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    paths = prepare_data(args.out, plan)
    t_data = time.monotonic() - t0
    pretrains = pretrain_runs(plan)
    finetunes = finetune_runs(plan, pretrains)
    for r in pretrains + finetunes:
        r["recipe"]["train"]["device"] = args.device
    pre, failed_pre = run_all(do_pretrain, pretrains, paths, args.out, plan.jobs, "pretraining")
    done = {p["run"] for p in pre}
    finetunes = [f for f in finetunes if f["init"] is None or f["init"] in done]
    fts, failed_ft = run_all(do_finetune, finetunes, paths, args.out, plan.jobs, "fine-tuning")
    from transfer_report import write_report

    timing = {"data_s": round(t_data, 1), "total_s": round(time.monotonic() - t0, 1)}
    summary = write_report(args.out, asdict(plan), pre, fts, timing, quick=args.quick, device=args.device)
    summary["failed"] = failed_pre + failed_ft
    print(json.dumps({k: summary[k] for k in ("timing", "written", "failed", "vs_scratch")}, indent=1))
    if summary["failed"]:
        log(f"{len(summary['failed'])} run(s) failed (listed in {args.out / 'failures.jsonl'}); rerun to retry them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
