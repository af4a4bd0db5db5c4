"""Subcommands that train: pretrain, finetune, and the end-to-end demo."""

from __future__ import annotations

from pathlib import Path
from .common import check_root, recipe_for


def add_pretrain(sub):
    p = sub.add_parser(
        "pretrain", help="pretrain a video-text model over feature shards with a recipe of objectives",
        description="Train the video-text model on cached shards and the manifest's timed captions. Recipes "
                    "(pipelines/videobert.yaml, univl.yaml, hero.yaml, demo.yaml) mix the objectives mlm, mvm, "
                    "mfm_nce, mfm_reg, fom, vsm, joint, align and caption. Multi-process: "
                    "torchrun --nproc-per-node N -m videolm pretrain ... (or -m videolm.cli)",
    )
    p.add_argument("--config", help="recipe YAML (required unless --resume finds the run's own config)")
    p.add_argument("--features", required=True, help="feature directory (shards, and codebook for visual words)")
    p.add_argument("--manifest", required=True, help="manifest JSONL with timed captions")
    p.add_argument("--root", help="refuse manifest video paths that resolve (symlinks followed) outside this folder")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics, TensorBoard, plots")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--text-init", help="text encoder start: default (MiniLM-L6), none, or a local BERT directory "
                                       "(same as the override model.text_init=...)")
    p.add_argument("--init-from", metavar="RUN", help="start from this run's (or imported checkpoint's) model and "
                                                    "matching heads with a fresh optimiser (train.init_from=RUN)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. max_steps=200 batch_size=16 lr=1e-4 mlm.weight=2 mixing=sample")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    check_root(args)
    from ..pretrain.trainer import run_pretrain

    extra = [f"model.text_init={args.text_init}"] if args.text_init else []
    extra += [f"train.init_from={Path(args.init_from).resolve()}"] if args.init_from else []
    cfg = recipe_for(args, extra)
    summary = run_pretrain(cfg, args.features, args.manifest, args.out, resume=args.resume,
                           progress=not args.quiet)
    if summary.get("loss_plot") is not None or summary["world_size"] == 1:
        print(f"pretrain: {summary['steps']} steps in {summary['seconds']:.1f} s "
              f"({summary['examples_per_s']:.1f} examples/s on {summary['device']}); "
              f"checkpoint {summary['checkpoint']}")
        print(f"pretrain: metrics {args.out}/metrics.jsonl (+ .csv, tensorboard/), loss curves {summary.get('loss_plot')}")
    return 0


def add_finetune(sub):
    p = sub.add_parser(
        "finetune", help="fine-tune a pretrained (or imported) checkpoint on a task recipe, selecting on val",
        description="Start from --init's model weights (and the heads of objectives of the same name) with a "
                    "fresh optimiser and schedule, train the task recipe (pipelines/ft_*.yaml) on the manifest's "
                    "train split, score select.metric on select.val_split every select.every steps, keep the best "
                    "checkpoint in OUT/best and stop after select.patience scorings without a gain.",
    )
    p.add_argument("--init", required=True, metavar="RUN_OR_CHECKPOINT",
                   help="pretraining run directory, its best/, or one checkpoint directory; 'none' trains the "
                        "recipe's own model from scratch (the no-pretraining baseline)")
    p.add_argument("--config", help="task recipe YAML (required unless --resume finds the run's own config)")
    p.add_argument("--features", required=True, help="feature directory of the task's videos")
    p.add_argument("--manifest", required=True, help="manifest JSONL with train and val splits")
    p.add_argument("--root", help="refuse manifest video paths that resolve (symlinks followed) outside this folder")
    p.add_argument("--out", required=True, help="run directory: checkpoints, best/, selection.jsonl, metrics")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. max_steps=200 lr=5e-5 select.every=50 patience=3")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    check_root(args)
    from ..finetune.job import run_finetune

    init = None if args.init == "none" else args.init
    summary = run_finetune(init, recipe_for(args), args.features, args.manifest, args.out,
                           resume=args.resume, progress=not args.quiet)
    line = f"finetune: {summary['steps']} steps in {summary['seconds']:.1f} s"
    if summary.get("stopped_early"):
        line += " (stopped early: no gain on val)"
    print(line + f"; last checkpoint {summary['checkpoint']}")
    if "best" in summary:
        b = summary["best"]
        print(f"finetune: best val {b['metric']} {b['score']:.2f} at step {b['step']}: {b['checkpoint']}")
    return 0


def add_demo(sub):
    p = sub.add_parser("demo", help="run the pipeline end to end on the embedded default (synthetic videos)",
                       description="Synthesize train, val and test digit videos, extract 'pixels' features, "
                                   "quantise them into visual words, pretrain the demo recipe, fine-tune it for "
                                   "retrieval and captions, train a moment model, and print three tables on the "
                                   "test split (retrieval, captioning, moments), each against baselines.")
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out/)")
    p.add_argument("--train-videos", type=int, default=800, help="synthetic training videos (default 800)")
    p.add_argument("--val-videos", type=int, default=100,
                   help="synthetic val videos, for fine-tuning's model selection (default 100)")
    p.add_argument("--test-videos", type=int, default=200, help="synthetic test videos (default 200)")
    p.add_argument("--seed", type=int, default=0,
                   help="train seed; the test split uses seed + 1 and the val split seed + 2 (default 0)")
    p.add_argument("--workers", type=int, default=2, help="processes for synthesis and extraction (default 2)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides for the demo's pretraining and moment recipes (pipelines/demo.yaml, "
                        "demo_moments.yaml), e.g. max_steps=50; batch_size, max_steps, checkpoint_every, "
                        "num_workers, threads and select.every also size the fine-tuning")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(Path(args.out), train_videos=args.train_videos, test_videos=args.test_videos, seed=args.seed,
                    workers=args.workers, train_overrides=tuple(args.overrides), val_videos=args.val_videos)
