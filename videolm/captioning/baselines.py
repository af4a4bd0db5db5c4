"""A caption baseline that reads no video: every item gets the training split's most frequent caption.

A model that copied its training captions without looking at the video could at
best do this well on average, so a captioner has learnt something from the pixels
only where it beats this row (UniVL and HERO report no such row; on synthetic data,
where each caption names a few attributes, it shows what chance agreement is worth).
"""

from __future__ import annotations

from collections import Counter

from ..manifests.manifest import VideoEntry
from .job import REFERENCE_KINDS


def most_frequent_caption(entries: list[VideoEntry]) -> tuple[str, int]:
    """(the most frequent description, its count) over ``entries``; ties: the first seen."""
    counts = Counter(" ".join(c.text.split()) for e in entries for c in e.captions
                     if c.kind in REFERENCE_KINDS and c.text.strip())
    if not counts:
        raise ValueError("no descriptions in the training entries to take a caption from")
    return counts.most_common(1)[0]


def constant_rows(rows: list[dict], text: str) -> list[dict]:
    """Caption rows (``videolm caption``'s) with ``text`` as every hypothesis: same items, same references."""
    return [{**r, "hypothesis": text} for r in rows]
