"""Named retrieval protocols: the split and query mode a paper's number is measured with.

``eval-retrieval --protocol NAME`` sets ``--split`` (unless given, where the protocol
allows another) and ``--query-mode``, checks that the manifest can support the
protocol before anything is encoded, and records it in the report:

* ``msrvtt-1k-a``: MSR-VTT's 1k-A test (JSFusion): the test split, one sentence per
  video (its caption of kind ``query``) against the test videos. Needs a manifest
  imported with the 1k-A split CSVs (``videolm import msrvtt --test-csv``).
* ``paragraph``: paragraph-to-video (ActivityNet Captions val_1, DiDeMo): all of a
  video's descriptions joined in time order form its one query; the val split by
  default (``--split test`` for DiDeMo's test). Needs timed captions.
* ``caption``: every caption is a query of its own video (MSR-VTT "full"); the test
  split by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError
from ..manifests.manifest import VideoEntry
from .queries import DESCRIPTION_KINDS, EvalError

log = logging.getLogger("videolm.retrieval.protocols")
MSRVTT_1KA_VIDEOS = 1000


def _needs_marked_queries(name: str, entries: list[VideoEntry], where: str) -> None:
    unmarked = [e.video_id for e in entries if not any(c.kind == "query" for c in e.captions)]
    if unmarked:
        raise EvalError(f"--protocol {name}: {len(unmarked):,} of the {len(entries):,} videos of {where} have no "
                        f"caption of kind 'query' (first: {', '.join(unmarked[:3])}); import MSR-VTT with its 1k-A "
                        f"split CSVs: videolm import msrvtt --annotations MSRVTT_data.json --train-csv "
                        f"MSRVTT_train.9k.csv --test-csv MSRVTT_JSFUSION_test.csv ...")
    if len(entries) != MSRVTT_1KA_VIDEOS:
        log.warning("--protocol %s: %s has %d videos, the 1k-A test has %d", name, where, len(entries),
                    MSRVTT_1KA_VIDEOS)


def is_timed(entry: VideoEntry) -> bool:
    """Whether a video's descriptions say *when*: not all of them span the whole video."""
    spans = {(c.start, c.end) for c in entry.captions if c.kind in DESCRIPTION_KINDS}
    whole = {(0.0, entry.duration or 0.0), (0.0, 0.0)}
    return len(spans) > 1 or bool(spans - whole)


def _needs_timed_captions(name: str, entries: list[VideoEntry], where: str) -> None:
    if not any(is_timed(e) for e in entries):
        raise EvalError(f"--protocol {name} needs timed captions (ActivityNet Captions, DiDeMo, YouCook2, TVR): "
                        f"the descriptions of all {len(entries):,} videos of {where} span their whole video "
                        f"(MSR-VTT style), so there is no paragraph to join; use --protocol caption or the default "
                        f"video queries")


def _any_manifest(name: str, entries: list[VideoEntry], where: str) -> None:
    return None


@dataclass(frozen=True)
class Protocol:
    name: str
    split: str  # the protocol's split; the default of --split
    query_mode: str
    split_fixed: bool  # --split may not name another split
    about: str
    check: Callable[[str, list[VideoEntry], str], None]  # raises EvalError when the split cannot support it

    def record(self) -> dict:
        """What the report keeps of the protocol."""
        return {"name": self.name, "split": self.split, "query_mode": self.query_mode, "about": self.about}


PROTOCOLS = {
    "msrvtt-1k-a": Protocol("msrvtt-1k-a", "test", "video", True,
                            "MSR-VTT 1k-A (JSFusion): one sentence per test video (its 'query' caption), t2v and v2t "
                            "over the 1,000 test videos", _needs_marked_queries),
    "paragraph": Protocol("paragraph", "val", "paragraph", False,
                          "paragraph-to-video (ActivityNet Captions val_1, DiDeMo): all of a video's descriptions "
                          "joined in time order are its one query", _needs_timed_captions),
    "caption": Protocol("caption", "test", "caption", False,
                        "every caption is a query of its own video (MSR-VTT 'full')", _any_manifest),
}


def protocol(name: str) -> Protocol:
    found = PROTOCOLS.get(name)
    if found is None:
        raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return found


def settings(name: str | None, split: str | None, query_mode: str | None) -> tuple[str, str]:
    """(split, query mode) of an evaluation: the protocol's unless the flags say otherwise
    (None: not given); a flag that contradicts the protocol is an error."""
    if name is None:
        return split or "test", query_mode or "video"
    p = protocol(name)
    if query_mode is not None and query_mode != p.query_mode:
        raise ConfigError(f"--protocol {name} uses --query-mode {p.query_mode}, not {query_mode}; drop --query-mode")
    if split is not None and split != p.split and p.split_fixed:
        raise ConfigError(f"--protocol {name} is measured on the {p.split} split, not {split}; drop --split")
    return split or p.split, p.query_mode


def check_entries(name: str, entries: list[VideoEntry], where: str) -> None:
    """Refuse (EvalError) a split that cannot support the protocol, e.g. paragraphs of whole-video captions."""
    p = protocol(name)
    p.check(name, entries, where)
