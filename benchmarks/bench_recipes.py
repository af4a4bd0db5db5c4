#!/usr/bin/env python
"""Step time of each shipped recipe at its own default size (``pipelines/*.yaml``), on this machine.

Prints ONE JSON object on stdout (progress goes to stderr). Unlike ``bench_train.py``
(one fixed model size, loader against memory), this answers "what does one optimizer
step of recipe X cost as shipped": the recipe's model sizes, batch size and objectives
(its last stage), the real ``build_run`` and ``train_step``, on in-memory batches.

Data: the synthetic S3D-like shards of ``bench_train.make_data`` (1024-d features,
one clip per second), quantised with a small hierarchical codebook for the recipes
whose model reads visual words. ``--batch-size`` caps every recipe's batch (CPU).

Per recipe: ``step_s`` is the median of ``--steps`` timed ``train_step`` calls after
``--warmup`` untimed ones. A recipe with ``mixing: sample`` runs one objective per
step, so its median mixes objectives (each is also timed alone, ``per_objective``).
``baseline_s`` is a fixed reference measured in the same process: one forward and
backward pass of a 2-layer MLP on a fixed batch; ``step_over_baseline`` = ratio (the
number to compare across machines and commits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = ("demo", "univl", "hero", "videobert")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def baseline_s(repeats: int = 20) -> float:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024))
    x = torch.randn(256, 1024)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        net(x).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quantised_copy(features: Path, root: Path) -> Path:
    """The shards quantised (k=8, 2 levels: 64 words), in a directory of their own; reused when present."""
    import shutil

    from videolm.quantize.job import run_quantize
    from videolm.quantize.kmeans import QuantizeConfig

    out = root / "features_quantised"
    if not (out / "codebook.h5").exists():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(features, out)
        run_quantize(out, QuantizeConfig(k=8, levels=2, sample=20000), progress=False)
    return out


def recipe_run(name: str, features: Path, entries, batch_cap: int, steps: int):
    from videolm.features.shards import FeatureStore
    from videolm.pretrain.recipe import apply_overrides, load_recipe
    from videolm.pretrain.run import build_run

    cfg = load_recipe(REPO / "pipelines" / f"{name}.yaml")
    last = cfg.stages[-1]
    bs = min(batch_cap, cfg.train.batch_size)
    overrides = [f"train.batch_size={bs}", "train.grad_accum=1", "train.num_workers=0", "train.precision=fp32",
                 f"train.max_steps={max(1000, steps * 4)}", "train.warmup_steps=1"]
    cfg = apply_overrides(cfg, overrides)
    from dataclasses import replace

    cfg = replace(cfg, stages=(replace(last, fraction=1.0),))
    return build_run(cfg, FeatureStore(features), entries, "cpu")


def time_steps(run, warmup: int, steps: int, names=None) -> dict:
    from videolm.pretrain.trainer import train_step

    batches = iter(run.make_loader(0))
    times = []
    run.runner.train()
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(run, step, batches, names)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "steps": steps}


def main() -> None:
    import tempfile

    import torch

    from bench_train import make_data
    from videolm.manifests.manifest import load_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="cap on each recipe's batch size")
    p.add_argument("--videos", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-objective", action="store_true", help="also time each objective alone")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_recipes_"))
    root.mkdir(parents=True, exist_ok=True)
    data = make_data(root, args.videos, 2, 1024)
    entries = load_manifest(data["manifest"])
    quantised = quantised_copy(Path(data["features"]), root)
    base = baseline_s()
    out = {"baseline_s": base, "threads": args.threads, "batch_cap": args.batch_size, "recipes": {}}
    for name in args.recipes.split(","):
        log(f"recipe {name}")
        run = recipe_run(name, quantised, entries, args.batch_size, args.steps)
        res = time_steps(run, args.warmup, args.steps)
        res.update(batch_size=run.cfg.train.batch_size, objectives=list(run.objectives.keys()),
                   architecture=getattr(run.cfg.model, "architecture", "two_stream (pre-0.3 layers)"),
                   parameters=sum(p.numel() for p in run.model.parameters()),
                   step_over_baseline=res["step_s"] / base)
        if args.per_objective:
            res["per_objective"] = {}
            for key in run.objectives.keys():
                res["per_objective"][key] = time_steps(run, 1, max(2, args.steps // 2), [key.split(":", 1)[1]])["step_s"]
        out["recipes"][name] = res
        log(json.dumps({name: res}))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
