"""Subcommands that score: eval-retrieval, eval-moments, compare-runs, caption, eval-caption."""

from __future__ import annotations

from pathlib import Path
from ..errors import ConfigError
from .common import check_root


def add_eval(sub):
    p = sub.add_parser(
        "eval-retrieval", help="score a pretrained model on text-to-video (and video-to-text) retrieval",
        description="Encode the split's queries and videos with a checkpoint, rank, and report R@1/5/10, MedR and "
                    "MnR with bootstrap 95% intervals in both directions. Writes a JSON report, per-query "
                    "rankings (JSONL) and a recall@K plot.",
    )
    p.add_argument("--checkpoint", help="run directory (its latest checkpoint) or one checkpoint dir")
    p.add_argument("--zero-shot", choices=["clip"],
                   help="instead of --checkpoint: CLIP as released (--weights DIR), no training: its text "
                        "embeddings against mean-pooled, normalised clip features extracted with the same weights")
    p.add_argument("--weights", help="--zero-shot clip: the local CLIP directory (as given to extract --weights)")
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


def _check_model_args(args) -> None:
    if bool(args.checkpoint) == bool(args.zero_shot):
        raise ConfigError("eval-retrieval: give --checkpoint RUN, or --zero-shot clip --weights DIR (one of them)")
    if args.zero_shot and not args.weights:
        raise ConfigError("--zero-shot clip needs --weights DIR, the CLIP directory the features were extracted with")
    if args.zero_shot and args.untrained:
        raise ConfigError("--untrained is a checkpoint's architecture at initialisation; --zero-shot has no checkpoint")


def _cmd_eval(args) -> int:
    check_root(args)
    _check_model_args(args)
    from ..retrieval.job import print_report, run_eval
    from ..retrieval.zero_shot import run_zero_shot
    from ..retrieval.evaluate import EvalConfig
    from ..retrieval.protocols import settings
    from ..retrieval.search import SearchConfig

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
    if args.zero_shot:
        report = run_zero_shot(args.zero_shot, Path(args.weights), Path(args.features), Path(args.manifest), cfg,
                               out, rankings, plot, progress=not args.quiet)
    else:
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


def add_moments(sub):
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
    from ..moments.job import MomentConfig, print_moments, run_moments
    from ..moments.spans import SpanConfig

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


def add_compare(sub):
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
    from ..retrieval.compare import compare_runs

    table, _ = compare_runs(Path(args.report_a), Path(args.report_b), n_boot=args.bootstrap, seed=args.seed)
    print(table)
    return 0


def add_caption(sub):
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
    from ..captioning.generate import GenerateConfig
    from ..captioning.job import CaptionConfig, run_caption

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


def add_eval_caption(sub):
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
    from ..captioning.job import metrics_line, run_eval_caption

    report = run_eval_caption(Path(args.captions), Path(args.out), n_boot=args.bootstrap, seed=args.seed)
    for name, why in report["unavailable"].items():
        print(f"eval-caption: {name} unavailable: {why}")
    print(metrics_line(report))
    print(f"eval-caption: report {args.out}")
    return 0
