"""Subcommands over feature directories: extract, quantize, verify."""

from __future__ import annotations

import os
import sys
from .common import EXIT_RUN_FAILED, check_root, default_rank


def add_extract(sub):
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
    g.add_argument("--node-rank", type=int, default=default_rank(),
                   help="this machine's rank, 0-based (default $VIDEOLM_NODE_RANK, $SLURM_ARRAY_TASK_ID, "
                        "$JOB_COMPLETION_INDEX, or 0)")
    g.add_argument("--workers", type=int, help="decoder processes (default 2; 0 decodes in-process)")
    g.add_argument("--threads", type=int, help="decoder threads per worker (default 0: decoder's choice)")
    g.add_argument("--timeout", type=float, help="seconds a video may go without progress before it is "
                                                  "declared hung and skipped (default 120)")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_extract)


_EXTRACT_FLAGS = ("encoder", "weights", "device", "batch_size", "fps", "frames_per_clip", "clip_stride",
                  "short_side", "crop", "backend", "decode", "shard_size", "workers", "threads", "timeout")


def _cmd_extract(args) -> int:
    check_root(args)
    from ..extract.config import ExtractConfig
    from ..config import from_dict, load_yaml, to_dict
    from ..extract.job import run_extract

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


def add_quantize(sub):
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
    from ..quantize.kmeans import PRESETS, QuantizeConfig
    from ..quantize.job import run_quantize, summary_lines

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


def add_verify(sub):
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
    from ..features.verify import repair_directory, verify_directory

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
