"""The ``videolm`` command line: one subcommand per pipeline stage.

Each subcommand parses flags into the stage's frozen config and calls one library
function; nothing here holds pipeline logic. Errors a user can fix (bad manifest,
missing weights, mismatched output directory) print one clear line and exit 2;
a run that completes with some failed videos exits 0 and says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ConfigError, Terminated, VideolmError

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


def _add_synth(sub):
    p = sub.add_parser("synth", help="generate synthetic digit videos and their manifest (the embedded default data)",
                       description="Write real H.264 .mp4 files of moving handwritten digits plus a manifest.jsonl "
                                   "with one timed caption per event. Same seed, same files.")
    p.add_argument("--out", required=True, help="output directory (videos/ and manifest.jsonl are written there)")
    p.add_argument("--videos", type=int, default=64, help="number of videos (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="split written in the manifest")
    p.add_argument("--id-prefix", default="synth", help="prefix of video ids (default 'synth')")
    p.add_argument("--workers", type=int, default=1, help="render in this many processes (default 1; same files)")
    p.add_argument("--style", default="clean", choices=["clean", "narrated", "order_pairs"],
                   help="clean: one caption per event (default); narrated: HowTo100M-style noisy speech "
                        "(docs/transfer.md); order_pairs: pairs of videos with the same events in opposite orders")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from .manifests.synthetic import synthesize

    t0 = time.monotonic()
    manifest = synthesize(args.out, args.videos, args.seed, split=args.split, id_prefix=args.id_prefix,
                          progress=sys.stderr.isatty(), workers=args.workers, style=args.style)
    print(f"synth: {args.videos} videos in {time.monotonic() - t0:.1f} s; manifest {manifest}")
    return 0


def _check_root(args) -> None:
    """--root: read the manifest once; a video path outside the folder is a ManifestError naming its line."""
    if getattr(args, "root", None):
        from .manifests.manifest import load_manifest

        load_manifest(args.manifest, root=args.root)


def _add_extract(sub):
    p = sub.add_parser(
        "extract", help="decode videos into clips, embed them and write HDF5 feature shards",
        description="Batch feature extraction. Resumable: re-running the same command skips finished shards. "
                    "Run the same command on N machines with --num-nodes N --node-rank I (e.g. a Slurm array).",
    )
    p.add_argument("--manifest", required=True, help="manifest .jsonl (see data_manifests/README.md)")
    p.add_argument("--root", help="refuse manifest video paths that resolve (symlinks followed) outside this folder")
    p.add_argument("--out", required=True, help="feature directory (shard_NNNNN.h5, failures.jsonl)")
    p.add_argument("--config", help="YAML file with extraction settings; flags given here override it")
    p.add_argument("--split", choices=["train", "val", "test"], help="only videos of this split")
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", help="pixels (default, weight-free), s3d, clip or videomae")
    g.add_argument("--weights", help="local weights: s3d_howto100m.pth for s3d, a model directory for clip/videomae")
    g.add_argument("--device", help="cpu (default) or cuda")
    g.add_argument("--batch-size", type=int, help="clips per encoder forward pass (default 64)")
    g = p.add_argument_group("sampling (defaults come from the encoder)")
    g.add_argument("--fps", type=float, help="frames sampled per second of video")
    g.add_argument("--frames-per-clip", type=int, help="frames in one clip")
    g.add_argument("--clip-stride", type=float, help="seconds between clip starts")
    g.add_argument("--short-side", type=int, help="resize the short side to this many pixels (0: keep)")
    g.add_argument("--crop", type=int, help="centre crop size (0: none)")
    g = p.add_argument_group("job")
    g.add_argument("--backend", choices=["av", "decord"], help="video decoder (default av)")
    g.add_argument("--decode", choices=["exact", "sparse"],
                   help="exact (default): each sample is the frame on screen at its time; sparse (av only): "
                        "never decode non-reference frames, a sample on one shows the frame before it")
    g.add_argument("--shard-size", type=int, help="videos per shard (default 500)")
    g.add_argument("--num-nodes", type=int, default=int(os.environ.get("VIDEOLM_NUM_NODES", 1)),
                   help="machines sharing the job (default 1, or $VIDEOLM_NUM_NODES)")
    g.add_argument("--node-rank", type=int, default=_default_rank(),
                   help="this machine's rank, 0-based (default $VIDEOLM_NODE_RANK, $SLURM_ARRAY_TASK_ID, "
                        "$JOB_COMPLETION_INDEX, or 0)")
    g.add_argument("--workers", type=int, help="decoder processes (default 2; 0 decodes in-process)")
    g.add_argument("--threads", type=int, help="decoder threads per worker (default 0: decoder's choice)")
    g.add_argument("--timeout", type=float, help="seconds a video may go without progress before it is "
                                                  "declared hung and skipped (default 120)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_extract)


def _default_rank() -> int:
    for var in ("VIDEOLM_NODE_RANK", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


_EXTRACT_FLAGS = ("encoder", "weights", "device", "batch_size", "fps", "frames_per_clip", "clip_stride",
                  "short_side", "crop", "backend", "decode", "shard_size", "workers", "threads", "timeout")


def _cmd_extract(args) -> int:
    _check_root(args)
    from .extract.config import ExtractConfig
    from .config import from_dict, load_yaml, to_dict
    from .extract.job import run_extract

    base = load_yaml(args.config, ExtractConfig) if args.config else ExtractConfig()
    overrides = {k: getattr(args, k) for k in _EXTRACT_FLAGS if getattr(args, k) is not None}
    cfg = from_dict(ExtractConfig, {**to_dict(base), **overrides})
    summary = run_extract(args.manifest, args.out, cfg, num_nodes=args.num_nodes, node_rank=args.node_rank,
                          split=args.split, progress=not args.quiet)
    print(summary.line())
    if summary.failures_total:
        print(f"extract: {summary.failures_total} failed video(s) in this directory are listed in "
              f"{summary.failures_file}")
    if summary.videos_failed and summary.videos_ok == 0 and summary.shards_written:
        print("extract: every video failed; the run is broken (check the backend, paths and failures.jsonl)",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def _add_quantize(sub):
    p = sub.add_parser(
        "quantize", help="fit a (hierarchical) k-means codebook and write visual-word tokens beside the shards",
        description="VideoBERT-style visual words: k clusters, k sub-clusters in each, --levels deep (k^levels "
                    "words). Tokens go to shard_NNNNN.tokens.h5 beside each shard, the codebook to codebook.h5. "
                    "Resumable; feature shards are never modified.",
    )
    p.add_argument("--features", required=True, help="feature directory written by `videolm extract`")
    p.add_argument("--k", type=int, default=12, help="children per node (default 12)")
    p.add_argument("--levels", type=int, default=4, help="tree depth; 1 = flat codebook of k words (default 4)")
    p.add_argument("--sample", type=int, default=500_000, help="clip vectors sampled to fit (default 500000)")
    p.add_argument("--preset", choices=["fast", "accurate"], default="fast",
                   help="faiss settings: fast (subsampled, early stop; default) or accurate (full-batch Lloyd)")
    p.add_argument("--niter", type=int, help="k-means iterations per node (overrides the preset)")
    p.add_argument("--max-points-per-centroid", type=int, help="faiss subsampling cap (overrides the preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalize", choices=["l2", "none"], default="l2", help="L2-normalise features first (default)")
    p.add_argument("--backend", choices=["faiss", "sklearn"], default="faiss",
                   help="faiss k-means (default) or scikit-learn MiniBatchKMeans")
    p.add_argument("--report", metavar="DIR", help="write quantize_summary.json and word_frequencies.png here")
    p.add_argument("--overwrite", action="store_true", help="replace a codebook fitted with other settings")
    p.add_argument("--codebook", metavar="PATH", help="tokenise with this codebook (a codebook.h5 or a quantised "
                   "feature directory) instead of fitting one, e.g. test videos with the training set's words")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args) -> int:
    from .quantize.kmeans import PRESETS, QuantizeConfig
    from .quantize.job import run_quantize, summary_lines

    preset = PRESETS[args.preset]
    cfg = QuantizeConfig(
        k=args.k, levels=args.levels, sample=args.sample, seed=args.seed, normalize=args.normalize,
        backend=args.backend, niter=args.niter or preset["niter"],
        max_points_per_centroid=args.max_points_per_centroid or preset["max_points_per_centroid"],
    )
    summary = run_quantize(args.features, cfg, report_dir=args.report, overwrite=args.overwrite,
                           progress=not args.quiet, codebook_from=args.codebook)
    for line in summary_lines(summary):
        print(line)
    if args.report:
        print(f"quantize: report in {args.report} (quantize_summary.json, word_frequencies.png)")
    return 0


def _add_verify(sub):
    p = sub.add_parser(
        "verify", help="check a feature directory (shards, checksums, codebook, tokens); --repair re-extracts",
        description="Checks every shard (opens, index consistent with the datasets, no NaN/inf, sha256 checksums "
                    "recorded at write time), that no shard is missing, and the codebook and token files. One "
                    "line per problem, then a summary; exit 0 when clean, 1 when problems were found. --repair "
                    "deletes broken shards and re-extracts them with the directory's recorded configuration.",
    )
    p.add_argument("dir", help="feature directory written by `videolm extract`")
    p.add_argument("--repair", action="store_true", help="delete broken shards (and their token files), "
                                                         "re-extract and re-tokenise them, then verify again")
    p.add_argument("--manifest", help="with --repair: the manifest the directory was extracted from "
                                      "(its sha256 must match extract_config.json)")
    p.add_argument("--workers", type=int, help="with --repair: decoder processes (default: as recorded)")
    p.add_argument("--quiet", action="store_true", help="no extraction progress output while repairing")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from .features.verify import repair_directory, verify_directory

    if not args.repair:
        report = verify_directory(args.dir)
        for problem in report.problems:
            print(problem.line())
        print(report.summary())
        return 0 if report.ok else EXIT_RUN_FAILED
    result = repair_directory(args.dir, args.manifest, workers=args.workers, progress=not args.quiet)
    for problem in result.before.problems:
        print(problem.line())
    print(result.before.summary())
    if result.before.ok:
        print("verify: nothing to repair")
        return 0
    if result.shards_reextracted:
        print(f"verify: re-extracted {len(result.shards_reextracted)} shard(s): {', '.join(result.shards_reextracted)}")
    if result.token_files_removed:
        done = "re-tokenised with the existing codebook" if result.retokenised else \
            "run `videolm quantize` again to rewrite them"
        print(f"verify: removed {len(result.token_files_removed)} token file(s); {done}")
    for note in result.notes:
        print(f"verify: {note}")
    print("verify: after repair:")
    for problem in result.after.problems:
        print(problem.line())
    print(result.after.summary())
    return 0 if result.after.ok else EXIT_RUN_FAILED


def _add_finetune(sub):
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


def _recipe_for(args, extra: list[str] = ()):
    """The recipe of a pretrain/finetune command: --config, or on --resume the run's own, with overrides."""
    from .pretrain.checkpoint import latest_checkpoint
    from .pretrain.recipe import load_recipe

    config = args.config
    if config is None:
        ckpt = latest_checkpoint(args.out) if args.resume and Path(args.out).exists() else None
        if ckpt is None:
            raise ConfigError("--config is required (no checkpoint to resume from in --out)")
        config = ckpt / "config.yaml"
    return load_recipe(config, list(args.overrides) + list(extra))


def _cmd_finetune(args) -> int:
    _check_root(args)
    from .finetune.job import run_finetune

    init = None if args.init == "none" else args.init
    summary = run_finetune(init, _recipe_for(args), args.features, args.manifest, args.out,
                           resume=args.resume, progress=not args.quiet)
    line = f"finetune: {summary['steps']} steps in {summary['seconds']:.1f} s"
    if summary.get("stopped_early"):
        line += " (stopped early: no gain on val)"
    print(line + f"; last checkpoint {summary['checkpoint']}")
    if "best" in summary:
        b = summary["best"]
        print(f"finetune: best val {b['metric']} {b['score']:.2f} at step {b['step']}: {b['checkpoint']}")
    return 0


def _add_pretrain(sub):
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
    _check_root(args)
    from .pretrain.trainer import run_pretrain

    extra = [f"model.text_init={args.text_init}"] if args.text_init else []
    extra += [f"train.init_from={Path(args.init_from).resolve()}"] if args.init_from else []
    cfg = _recipe_for(args, extra)
    summary = run_pretrain(cfg, args.features, args.manifest, args.out, resume=args.resume,
                           progress=not args.quiet)
    if summary.get("loss_plot") is not None or summary["world_size"] == 1:
        print(f"pretrain: {summary['steps']} steps in {summary['seconds']:.1f} s "
              f"({summary['examples_per_s']:.1f} examples/s on {summary['device']}); "
              f"checkpoint {summary['checkpoint']}")
        print(f"pretrain: metrics {args.out}/metrics.jsonl (+ .csv, tensorboard/), loss curves {summary.get('loss_plot')}")
    return 0


def _add_eval(sub):
    p = sub.add_parser(
        "eval-retrieval", help="score a pretrained model on text-to-video (and video-to-text) retrieval",
        description="Encode the split's queries and videos with a checkpoint, rank, and report R@1/5/10, MedR and "
                    "MnR with bootstrap 95% intervals in both directions. Writes a JSON report, per-query "
                    "rankings (JSONL) and a recall@K plot.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint) or one checkpoint dir")
    p.add_argument("--features", required=True, help="feature directory holding the split's videos")
    p.add_argument("--manifest", required=True, help="manifest JSONL with the split's captions")
    p.add_argument("--root", help="refuse manifest video paths that resolve (symlinks followed) outside this folder")
    p.add_argument("--protocol", choices=["msrvtt-1k-a", "paragraph", "caption"],
                   help="a standard protocol: sets --query-mode and the default --split, checks the manifest "
                        "supports it, and is recorded in the report (docs/retrieval.md#protocols)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="split to evaluate (default test, or the protocol's)")
    p.add_argument("--query-mode", choices=["video", "caption", "paragraph"],
                   help="video: one query per video (its 'query' caption, else all captions joined); "
                        "caption: every caption is a query; paragraph: all of a video's captions joined "
                        "(default video, or the protocol's)")
    p.add_argument("--search", default="exact", choices=["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"],
                   help="exact (default), faiss-flat (exact, faiss kernels), faiss-ivf / faiss-hnsw (approximate)")
    p.add_argument("--search-k", type=int, default=100, help="candidates a faiss index returns per query (default 100)")
    p.add_argument("--nprobe", type=int, default=32, help="faiss-ivf: cells visited per query (default 32)")
    p.add_argument("--ef-search", type=int, default=128, help="faiss-hnsw: candidates explored per query (default 128)")
    p.add_argument("--index-cache", default="auto", choices=["auto", "off", "rebuild"],
                   help="faiss-ivf/hnsw: auto (default) reuses an index saved in FEATURES/indexes for the very same "
                        "gallery vectors, else builds and saves it; off: build, save nothing; rebuild: build and save")
    p.add_argument("--rerank-top", type=int, default=0, metavar="K",
                   help="re-rank each query's top K with the cross encoder's alignment score (default 0: off)")
    p.add_argument("--dsl", action="store_true", help="dual softmax over queries (off by default; recorded in the report)")
    p.add_argument("--untrained", action="store_true",
                   help="evaluate the checkpoint's architecture at initialisation instead of its weights (a baseline)")
    p.add_argument("--out", default="retrieval_report.json", help="report JSON (default retrieval_report.json)")
    p.add_argument("--rankings", help="per-query top-10 JSONL (default: beside the report, <name>.rankings.jsonl)")
    p.add_argument("--plot", help="recall@K PNG (default: beside the report, <name>.recall.png)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="texts or videos encoded at once (default 64)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    _check_root(args)
    from .retrieval.job import print_report, run_eval
    from .retrieval.evaluate import EvalConfig
    from .retrieval.protocols import settings
    from .retrieval.search import SearchConfig

    search = SearchConfig(mode=args.search, k=args.search_k, nprobe=args.nprobe, ef_search=args.ef_search,
                          dsl=args.dsl)
    split, query_mode = settings(args.protocol, args.split, args.query_mode)
    cfg = EvalConfig(split=split, query_mode=query_mode, search=search, rerank_top=args.rerank_top,
                     batch_size=args.batch_size, device=args.device, bootstrap=args.bootstrap, seed=args.seed,
                     index_cache=args.index_cache, protocol=args.protocol)
    out = Path(args.out)
    stem = out.with_suffix("")
    rankings = Path(args.rankings) if args.rankings else Path(f"{stem}.rankings.jsonl")
    plot = Path(args.plot) if args.plot else Path(f"{stem}.recall.png")
    report = run_eval(Path(args.checkpoint), Path(args.features), Path(args.manifest), cfg, out, rankings, plot,
                      progress=not args.quiet, untrained=args.untrained)
    ex = report["excluded"]
    print(f"eval-retrieval: {report['n_videos']} videos, {report['n_queries']['t2v']} queries "
          + (f"(protocol {cfg.protocol}, " if cfg.protocol else "(")
          + f"split {cfg.split}, {cfg.query_mode} queries, search {cfg.search.mode}"
          + (f", rerank top {cfg.rerank_top}" if cfg.rerank_top else "") + (", dual softmax" if cfg.search.dsl else "")
          + ")" + (f"; {ex['missing_features']} videos without features left out" if ex["missing_features"] else ""))
    print_report(report)
    print(f"eval-retrieval: report {out}, rankings {rankings}, plot {plot}")
    return 0


def _add_moments(sub):
    p = sub.add_parser(
        "eval-moments", help="score a HERO-style (hierarchical + vsm) model on moment retrieval: VR, SVMR, VCMR",
        description="Localise each timed caption of the split with the vsm start/end heads, HERO's way: VR (which "
                    "video), SVMR (which span in the right video), VCMR (video and span over the split). Reports "
                    "R@1/5/10/100 at temporal IoU 0.5 and 0.7 and mean IoU with bootstrap 95%% intervals; writes a "
                    "JSON report and each query's top spans (JSONL). Whole-video captions are counted, not scored.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint) or one checkpoint dir")
    p.add_argument("--features", required=True, help="feature directory holding the split's videos")
    p.add_argument("--manifest", required=True, help="manifest JSONL with the split's timed captions")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default test)")
    p.add_argument("--context", default="subtitles", choices=["subtitles", "video", "captions"],
                   help="subtitles (default): the local level reads each video's subtitle/asr lines (none: clips "
                        "alone); video: clips alone for every video; captions: every line, the queries too, as vsm "
                        "pretraining reads them (a diagnostic upper bound, not a moment-retrieval score)")
    p.add_argument("--min-span", type=int, default=1, help="shortest predicted span, in clips (default 1; HERO 3)")
    p.add_argument("--max-span", type=int, default=16, help="longest predicted span, in clips (default 16, HERO's)")
    p.add_argument("--alpha", type=float, default=20.0,
                   help="VCMR: spans weighed by exp(alpha * video score) (default 20, HERO's q2c_alpha)")
    p.add_argument("--top-videos", type=int, default=100, help="VCMR: spans from each query's top N videos (100)")
    p.add_argument("--nms-iou", type=float, default=0.5,
                   help="drop a span overlapping a better one of its video above this IoU (default 0.5, HERO's)")
    p.add_argument("--no-nms", action="store_true", help="keep overlapping spans (HERO's metrics before NMS)")
    p.add_argument("--out", default="moments_report.json", help="report JSON (default moments_report.json)")
    p.add_argument("--predictions", help="per-query top spans JSONL (default: beside the report, <name>.spans.jsonl)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=32, help="texts or videos encoded at once (default 32)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_moments)


def _cmd_moments(args) -> int:
    from .moments.job import MomentConfig, print_moments, run_moments
    from .moments.spans import SpanConfig

    try:
        spans = SpanConfig(min_len=args.min_span, max_len=args.max_span, alpha=args.alpha,
                           top_videos=args.top_videos, nms_iou=None if args.no_nms else args.nms_iou)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg = MomentConfig(split=args.split, context=args.context, spans=spans, batch_size=args.batch_size,
                       device=args.device, bootstrap=args.bootstrap, seed=args.seed)
    out = Path(args.out)
    predictions = Path(args.predictions) if args.predictions else Path(f"{out.with_suffix('')}.spans.jsonl")
    report = run_moments(Path(args.checkpoint), Path(args.features), Path(args.manifest), cfg, out, predictions)
    ex = report["excluded"]
    print(f"eval-moments: {report['n_videos']} videos, {report['n_queries']} timed captions (split {cfg.split}, "
          f"{report['videos_with_subtitles']} videos with subtitles); left out: {ex['whole_video']} whole-video, "
          f"{ex['no_clip']} outside the clips, {ex['empty']} empty, {ex['missing_features']} videos without features")
    print_moments(report)
    print(f"eval-moments: report {out}, spans {predictions}")
    return 0


def _add_compare(sub):
    p = sub.add_parser("compare-runs", help="compare two retrieval (or two caption) reports with a paired test",
                       description="Print both reports' metrics and a paired bootstrap test of R@1 over the queries "
                                   "they share (matched by query key); for two eval-caption reports, of CIDEr-D "
                                   "over the items they share.")
    p.add_argument("report_a")
    p.add_argument("report_b")
    p.add_argument("--bootstrap", type=int, default=10000, help="resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from .retrieval.compare import compare_runs

    table, _ = compare_runs(Path(args.report_a), Path(args.report_b), n_boot=args.bootstrap, seed=args.seed)
    print(table)
    return 0


def _add_caption(sub):
    p = sub.add_parser(
        "caption", help="generate captions for a split's videos (or timed segments) with a two_stream decoder",
        description="Caption every item of the split with the checkpoint's caption decoder (greedy or beam search), "
                    "from the video alone or, with --with-transcript, with its subtitles as extra input. Writes one "
                    "JSON line per item, the references beside the hypothesis, and <out>.meta.json.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory (its latest checkpoint) or one checkpoint dir")
    p.add_argument("--features", required=True, help="feature directory holding the split's videos")
    p.add_argument("--manifest", required=True, help="manifest JSONL with the split's captions (the references)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to caption (default test)")
    p.add_argument("--unit", default="video", choices=["video", "segment"],
                   help="video (default): one caption per video (MSR-VTT); segment: one per timed caption span "
                        "(YouCook2, as UniVL evaluates it)")
    p.add_argument("--with-transcript", action="store_true",
                   help="the cross encoder reads the item's subtitle/asr lines (UniVL's 'with transcript' setting)")
    p.add_argument("--beam-size", type=int, default=1, help="1 (default): greedy; >1: beam search")
    p.add_argument("--max-len", type=int, default=20, help="tokens generated at most, [SEP] included (default 20)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam ranking: log-prob sum / length**this (default 1.0: mean per token; 0: the sum)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="forbid repeating any n-gram of this size (0: off)")
    p.add_argument("--batch-size", type=int, default=32, help="items captioned at once (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default="captions.jsonl", help="captions JSONL (default captions.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_caption)


def _cmd_caption(args) -> int:
    from .captioning.generate import GenerateConfig
    from .captioning.job import CaptionConfig, run_caption

    gen = GenerateConfig(beam_size=args.beam_size, max_len=args.max_len, length_penalty=args.length_penalty,
                         no_repeat_ngram=args.no_repeat_ngram)
    cfg = CaptionConfig(split=args.split, unit=args.unit, with_transcript=args.with_transcript,
                        batch_size=args.batch_size, device=args.device, generate=gen)
    meta = run_caption(Path(args.checkpoint), Path(args.features), Path(args.manifest), cfg, Path(args.out),
                       progress=not args.quiet)
    left = meta["left_out"]
    print(f"caption: {meta['n_items']} {cfg.unit} captions ({'beam ' + str(gen.beam_size) if gen.beam_size > 1 else 'greedy'}"
          f", {meta['captions_per_s']:.1f} captions/s); left out: {left['missing_features']} videos without "
          f"features, {left['without_reference']} without a reference; wrote {args.out}")
    return 0


def _add_eval_caption(sub):
    p = sub.add_parser(
        "eval-caption", help="score captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap) with intervals",
        description="Score a captions JSONL (videolm caption's) with the COCO caption scorers and their PTB "
                    "tokenizer, with bootstrap 95%% intervals over items. Without java: METEOR unavailable, a "
                    "Python tokenizer instead of PTB's, both recorded in the report.",
    )
    p.add_argument("captions", help="captions JSONL: key, hypothesis, references per line")
    p.add_argument("--out", default="caption_report.json", help="report JSON (default caption_report.json)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_eval_caption)


def _cmd_eval_caption(args) -> int:
    from .captioning.job import metrics_line, run_eval_caption

    report = run_eval_caption(Path(args.captions), Path(args.out), n_boot=args.bootstrap, seed=args.seed)
    for name, why in report["unavailable"].items():
        print(f"eval-caption: {name} unavailable: {why}")
    print(metrics_line(report))
    print(f"eval-caption: report {args.out}")
    return 0


def _add_demo(sub):
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
    from .demo import run_demo

    return run_demo(Path(args.out), train_videos=args.train_videos, test_videos=args.test_videos, seed=args.seed,
                    workers=args.workers, train_overrides=tuple(args.overrides), val_videos=args.val_videos)


def _import_common(p):
    g = p.add_argument_group("common to every format")
    g.add_argument("--videos", required=True, metavar="DIR",
                   help="folder holding the video files, searched recursively for <id>.mp4/.webm/.mkv/.avi")
    g.add_argument("--out", required=True, metavar="PATH", help="manifest .jsonl to write")
    g.add_argument("--keep-missing", action="store_true",
                   help="keep videos whose file is not found (path = the expected DIR/<id>.mp4)")
    g.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="split for videos the format gives none (default train)")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def _add_import(sub):
    p = sub.add_parser(
        "import", help="turn a public dataset's annotations into a manifest (msrvtt, youcook2, howto100m, ...)",
        description="Read a dataset's own annotation files, find each video under --videos and write a manifest "
                    "(data_manifests/README.md). Prints what was written and what was dropped, and why.",
    )
    fmts = p.add_subparsers(dest="format", metavar="<format>", required=True)
    f = fmts.add_parser("msrvtt", help="MSR-VTT: MSRVTT_data.json (+ the 1k-A split CSVs)")
    f.add_argument("--annotations", required=True, help="MSRVTT_data.json")
    f.add_argument("--train-csv", help="MSRVTT_train.9k.csv: its videos become train")
    f.add_argument("--test-csv", help="MSRVTT_JSFUSION_test.csv: its videos become test, its sentence the query")
    f.set_defaults(import_options=("annotations", "train_csv", "test_csv"))
    f = fmts.add_parser("youcook2", help="YouCook2: youcookii_annotations_trainval.json (timed segments)")
    f.add_argument("--annotations", required=True, help="youcookii_annotations_trainval.json")
    f.set_defaults(import_options=("annotations",))
    f = fmts.add_parser("howto100m", help="HowTo100M: caption.json (ASR lines), streamed")
    f.add_argument("--captions", required=True, help="caption.json, or UniVL's caption.pickle with --trust-pickle")
    f.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickle file (loading a pickle can run code: only for files you trust)")
    f.set_defaults(import_options=("captions", "trust_pickle"))
    f = fmts.add_parser("webvid", help="WebVid: results_*.csv (one caption per clip), streamed")
    f.add_argument("--csv", required=True, help="results_2M_train.csv or similar (videoid, name, page_dir, duration)")
    f.set_defaults(import_options=("csv",))
    f = fmts.add_parser("tvsub", help="TVQA/TVR subtitles: tvqa_subtitles.jsonl, streamed")
    f.add_argument("--subtitles", required=True, help="JSONL of {\"vid_name\", \"sub\": [{\"text\", \"start\", \"end\"}]}")
    f.set_defaults(import_options=("subtitles",))
    _add_import_moments(fmts)
    f = fmts.add_parser("csv", help="any CSV with one caption per row (you name the columns)")
    f.add_argument("--csv", required=True, help="the CSV file (with a header row)")
    f.add_argument("--id-col", required=True, help="column with the video id")
    f.add_argument("--text-col", required=True, help="column with the caption text")
    f.add_argument("--path-col", help="column with the file path, relative to --videos or absolute")
    f.add_argument("--start-col", help="column with the caption start in seconds (needs --end-col)")
    f.add_argument("--end-col", help="column with the caption end in seconds (needs --start-col)")
    f.add_argument("--split-col", help="column with the split (train/val/test; empty cells get --split)")
    f.add_argument("--kind", default="caption", choices=["caption", "subtitle", "asr", "query"],
                   help="kind of every caption (default caption)")
    f.set_defaults(import_options=("csv", "id_col", "text_col", "path_col", "start_col", "end_col", "split_col",
                                   "kind"))
    for f in fmts.choices.values():
        _import_common(f)
        f.set_defaults(func=_cmd_import)


def _add_import_moments(fmts):
    """ActivityNet Captions, DiDeMo, TVR: one annotation file per split."""
    files = {"activitynet": ("ActivityNet Captions: train.json, val_1.json / val_2.json (timed sentences)",
                             "train.json", "val_1.json (or val_2.json: the same videos, annotated again)", "a file "
                             "of the same shape"),
             "didemo": ("DiDeMo: {train,val,test}_data.json (5 s segment moments)", "train_data.json",
                        "val_data.json", "test_data.json"),
             "tvr": ("TVR: tvr_*_release.jsonl (moment queries), with TVQA subtitles", "tvr_train_release.jsonl",
                     "tvr_val_release.jsonl", "tvr_test_public_release.jsonl (no moments: only subtitles are kept)")}
    for fmt, (about, *names) in files.items():
        f = fmts.add_parser(fmt, help=about)
        for split, name in zip(("train", "val", "test"), names):
            f.add_argument(f"--{split}", metavar="FILE", help=f"{name}: its videos become {split}")
        f.set_defaults(import_options=("train", "val", "test"))
    f.add_argument("--subtitles", metavar="FILE", help="tvqa_preprocessed_subtitles.jsonl (the tvsub format), "
                                                        "joined by vid_name")
    f.set_defaults(import_options=("train", "val", "test", "subtitles"))


def _cmd_import(args) -> int:
    from .manifests.importers import run_import

    options = {k: getattr(args, k) for k in args.import_options}
    summary = run_import(args.format, Path(args.out), Path(args.videos), keep_missing=args.keep_missing,
                         default_split=args.split, progress=not args.quiet and sys.stderr.isatty(), **options)
    for line in summary.lines():
        print(line)
    return 0


def _add_import_checkpoint(sub):
    p = sub.add_parser("import-checkpoint", help="turn a released checkpoint (UniVL) into a videolm run directory",
                       description="Map every tensor of a released checkpoint (loaded weights-only) onto videolm's "
                                   "model of the same layout; unknown or missing keys are errors (docs/models.md).")
    p.add_argument("source", choices=["univl"], help="whose checkpoint: univl (microsoft/UniVL univl.pretrained.bin)")
    p.add_argument("path", help="the checkpoint file")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--tokenizer", help="local WordPiece vocabulary directory it was trained with (default: the "
                                       "bundled MiniLM's, which is bert-base-uncased's, UniVL's)")
    p.add_argument("--max-words", type=int, default=48, help="UniVL's max_words at training (pretraining: 48)")
    p.add_argument("--max-frames", type=int, default=64, help="most clips the model reads (UniVL pretraining: 64)")
    p.add_argument("--heads", type=int, help="attention heads per layer (not in the weights; default hidden/64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=_cmd_import_checkpoint)


def _cmd_import_checkpoint(args) -> int:
    from .pretrain.import_checkpoint import import_univl, summary_lines

    summary = import_univl(args.path, args.out, args.tokenizer, args.max_words, args.max_frames, args.heads,
                           args.overwrite)
    print("\n".join(summary_lines(summary)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videolm",
        description="videolm: from raw videos to downstream scores. Stages: synth -> extract -> quantize -> "
                    "pretrain -> finetune -> eval-retrieval, caption, eval-moments.",
    )
    parser.add_argument("--version", action="version", version=f"videolm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    _add_synth(sub)
    _add_import(sub)
    _add_extract(sub)
    _add_quantize(sub)
    _add_verify(sub)
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_import_checkpoint(sub)
    _add_eval(sub)
    _add_moments(sub)
    _add_compare(sub)
    _add_caption(sub)
    _add_eval_caption(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Only videolm's own messages at INFO: libraries (faiss's loader, matplotlib) chat at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("videolm").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.func(args)
    except VideolmError as exc:
        print(f"videolm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:  # pretraining turns a scheduler's SIGTERM into this after checkpointing
        print(f"videolm {args.command}: stopped by SIGTERM; re-run with --resume to continue", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if args.command in ("import", "import-checkpoint", "eval-retrieval", "compare-runs"):  # all-or-nothing
            print(f"videolm {args.command}: interrupted; nothing was written, re-run the command", file=sys.stderr)
        else:
            print(f"videolm {args.command}: interrupted; completed work is kept, re-run the same command "
                  f"({'with --resume ' if args.command == 'pretrain' else ''}to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
