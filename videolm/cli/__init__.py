"""The ``videolm`` command line: one subcommand per pipeline stage.

Each subcommand parses flags into the stage's frozen config and calls one library
function; nothing here holds pipeline logic. Errors a user can fix (bad manifest,
missing weights, mismatched output directory) print one clear line and exit 2;
a run that completes with some failed videos exits 0 and says so.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import Terminated, VideolmError
from .common import EXIT_RUN_FAILED, EXIT_USER_ERROR
from .data import add_import, add_import_checkpoint, add_synth
from .evaluation import add_caption, add_compare, add_eval, add_eval_caption, add_moments
from .features import _EXTRACT_FLAGS, add_extract, add_quantize, add_verify
from .training import add_demo, add_finetune, add_pretrain

__all__ = ["EXIT_RUN_FAILED", "EXIT_USER_ERROR", "_EXTRACT_FLAGS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videolm",
        description="videolm: from raw videos to downstream scores. Stages: synth -> extract -> quantize -> "
                    "pretrain -> finetune -> eval-retrieval, caption, eval-moments.",
    )
    parser.add_argument("--version", action="version", version=f"videolm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    add_synth(sub)
    add_import(sub)
    add_extract(sub)
    add_quantize(sub)
    add_verify(sub)
    add_pretrain(sub)
    add_finetune(sub)
    add_import_checkpoint(sub)
    add_eval(sub)
    add_moments(sub)
    add_compare(sub)
    add_caption(sub)
    add_eval_caption(sub)
    add_demo(sub)
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
