"""``videolm compare-runs``: two retrieval reports side by side, with a paired bootstrap test
(two caption reports: ``captioning.compare``, paired on CIDEr-D).

Queries are matched by key (``per_query.keys`` of each direction), so two
reports on the same split compare query for query even if one left some out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .evaluate import DIRECTIONS
from .metrics import paired_bootstrap


def _load_report(path: Path) -> dict:
    try:
        rep = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such report") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a JSON report ({exc})") from None
    if rep.get("kind") == "caption":
        if "per_item" not in rep:
            raise ConfigError(f"{path}: a caption report without per-item scores")
        return rep
    if not all(d in rep and "per_query" in rep[d] for d in DIRECTIONS):
        raise ConfigError(f"{path}: not a videolm retrieval or caption report (no per-query ranks)")
    return rep


def paired_ranks(a: dict, b: dict, direction: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Ranks of the queries both reports share (matched by key), and how many were unmatched."""
    ka = dict(zip(a[direction]["per_query"]["keys"], a[direction]["per_query"]["ranks"]))
    kb = dict(zip(b[direction]["per_query"]["keys"], b[direction]["per_query"]["ranks"]))
    common = [k for k in ka if k in kb]
    return (np.array([ka[k] for k in common]), np.array([kb[k] for k in common]),
            len(ka) + len(kb) - 2 * len(common))


def format_p(test: dict) -> str:
    """A bootstrap p-value at its resolution: none of n resamples crossing zero reads "p < 1/n"."""
    if test["p_value"] * test["n_boot"] <= 1.0:
        return f"p < {1.0 / test['n_boot']:.4g}"
    return f"p = {test['p_value']:.4f}"


def compare_runs(path_a: Path, path_b: Path, n_boot: int = 10000, seed: int = 0) -> tuple[str, dict]:
    """Side-by-side table of two reports and a paired bootstrap test of R@1 per direction."""
    a, b = _load_report(path_a), _load_report(path_b)
    name_a, name_b = Path(path_a).stem, Path(path_b).stem
    if name_a == name_b:
        name_a, name_b = "A", "B"
    lines = [f"A = {path_a}", f"B = {path_b}"]
    if (a.get("kind") == "caption") != (b.get("kind") == "caption"):
        raise ConfigError(f"{path_a} and {path_b}: one is a caption report, the other a retrieval report")
    if a.get("kind") == "caption":  # videolm eval-caption reports: paired bootstrap on CIDEr-D
        from ..captioning.compare import compare_caption_reports

        more, tests = compare_caption_reports(a, b, (name_a, name_b), n_boot, seed, format_p)
        return "\n".join(lines + more), tests
    for what in ("split", "query_mode", "n_videos"):
        if a.get(what) != b.get(what):
            lines.append(f"warning: {what} differs: A {a.get(what)!r}, B {b.get(what)!r}")
    w = max(10, len(name_a), len(name_b))
    lines.append(f"{'':12}{name_a:>{w}}{name_b:>{w}}{'B - A':>{w}}")
    tests = {}
    for d in DIRECTIONS:
        for m in ("R@1", "R@5", "R@10", "MedR", "MnR"):
            va, vb = a[d]["metrics"][m], b[d]["metrics"][m]
            lines.append(f"{d + ' ' + m:12}{va:>{w}.2f}{vb:>{w}.2f}{vb - va:>+{w}.2f}")
        ra, rb, unmatched = paired_ranks(a, b, d)
        if len(ra) == 0:
            lines.append(f"{d}: no queries in common; no paired test")
            continue
        t = paired_bootstrap(rb, ra, k=1, n_boot=n_boot, seed=seed)
        t["queries"], t["unmatched"] = len(ra), unmatched
        tests[d] = t
        lines.append(f"{d} paired bootstrap on R@1 ({len(ra)} shared queries"
                     + (f", {unmatched} unmatched left out" if unmatched else "")
                     + f"): B - A = {t['delta']:+.2f} points, 95% CI [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}], "
                     + format_p(t))
    return "\n".join(lines), tests
