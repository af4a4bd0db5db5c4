"""Subcommands that make manifests and run directories from outside data: synth, import, import-checkpoint."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_synth(sub):
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
    from ..manifests.synthetic import synthesize

    t0 = time.monotonic()
    manifest = synthesize(args.out, args.videos, args.seed, split=args.split, id_prefix=args.id_prefix,
                          progress=sys.stderr.isatty(), workers=args.workers, style=args.style)
    print(f"synth: {args.videos} videos in {time.monotonic() - t0:.1f} s; manifest {manifest}")
    return 0


def _import_common(p, videos: bool = True):
    g = p.add_argument_group("common to every format")
    if videos:  # a format whose input names its own files (webdataset) has no --videos
        g.add_argument("--videos", required=True, metavar="DIR",
                       help="folder holding the video files, searched recursively for <id>.mp4/.webm/.mkv/.avi")
    g.add_argument("--out", required=True, metavar="PATH", help="manifest .jsonl to write")
    g.add_argument("--keep-missing", action="store_true",
                   help="keep videos whose file is not found (path = the expected DIR/<id>.mp4)")
    g.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="split for videos the format gives none (default train)")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def add_import(sub):
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
    _add_import_webdataset(fmts)
    for name, f in fmts.choices.items():
        _import_common(f, videos=name != "webdataset")
        f.set_defaults(func=_cmd_import)


def _add_import_webdataset(fmts):
    f = fmts.add_parser("webdataset", help="WebDataset tars (video2dataset's output): one video per sample, "
                                           "read in place from its tar",
                        description="One manifest line per sample of uncompressed WebDataset tars; the video stays "
                                    "in its tar, addressed as <tar>#<member>. video2dataset's .json: samples whose "
                                    "status is not success are dropped and counted, clipped samples get their "
                                    "span's duration (data_manifests/README.md).")
    f.add_argument("shards", nargs="+", metavar="SHARDS",
                   help="tar paths, globs or brace patterns, quoted: 'shards/{00000..00099}.tar'")
    f.add_argument("--caption-field", metavar="FIELD",
                   help="take the caption from this field of each sample's .json (default: the sample's .txt)")
    f.set_defaults(import_options=("shards", "caption_field"))


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
    from ..manifests.importers import run_import

    options = {k: getattr(args, k) for k in args.import_options}
    videos = Path(args.videos) if getattr(args, "videos", None) else None
    summary = run_import(args.format, Path(args.out), videos, keep_missing=args.keep_missing,
                         default_split=args.split, progress=not args.quiet and sys.stderr.isatty(), **options)
    for line in summary.lines():
        print(line)
    return 0


def add_import_checkpoint(sub):
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
    from ..pretrain.import_checkpoint import import_univl, summary_lines

    summary = import_univl(args.path, args.out, args.tokenizer, args.max_words, args.max_frames, args.heads,
                           args.overwrite)
    print("\n".join(summary_lines(summary)))
    return 0
