"""``videolm compare-runs`` on two caption reports: metrics side by side, paired bootstrap on CIDEr-D.

Items are matched by key (``per_item.keys``); the test resamples the shared items,
keeping each item's two CIDEr-D scores together, as the retrieval test keeps a
query's two ranks together.
"""

from __future__ import annotations

import numpy as np

from ..retrieval.metrics import _resamples
from .metrics import METRICS


def paired_cider(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """CIDEr-D of the items both reports share (A's order), and how many were unmatched."""
    ka = dict(zip(a["per_item"]["keys"], a["per_item"]["CIDEr-D"]))
    kb = dict(zip(b["per_item"]["keys"], b["per_item"]["CIDEr-D"]))
    common = [k for k in ka if k in kb]
    return (np.array([ka[k] for k in common], np.float64), np.array([kb[k] for k in common], np.float64),
            len(ka) + len(kb) - 2 * len(common))


def paired_mean_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Mean of B - A over shared items, its percentile interval and a two-sided bootstrap p-value
    (twice the smaller tail on either side of zero, at least 1/n_boot)."""
    diff = b - a
    deltas = np.concatenate([diff[idx].mean(1) for idx in _resamples(len(diff), n_boot, seed)])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    p = 2 * min((deltas <= 0).mean(), (deltas >= 0).mean())
    return {"metric": "CIDEr-D", "delta": float(diff.mean()),
            "ci": [float(np.percentile(deltas, lo)), float(np.percentile(deltas, hi))],
            "p_value": float(min(1.0, max(p, 1.0 / n_boot))), "n_boot": n_boot}


def compare_caption_reports(a: dict, b: dict, names: tuple[str, str], n_boot: int, seed: int,
                            format_p) -> tuple[list[str], dict]:
    """Table lines and the paired test of two caption reports (``format_p`` prints a p-value)."""
    lines = []
    if a.get("tokenizer") != b.get("tokenizer"):
        lines.append(f"warning: tokenizer differs: A {a.get('tokenizer')!r}, B {b.get('tokenizer')!r}")
    w = max(10, *(len(n) for n in names))
    lines.append(f"{'':12}{names[0]:>{w}}{names[1]:>{w}}{'B - A':>{w}}")
    for m in METRICS:
        va, vb = a["metrics"].get(m), b["metrics"].get(m)
        if va is None or vb is None:
            lines.append(f"{m:12}{'n/a' if va is None else f'{va:.2f}':>{w}}{'n/a' if vb is None else f'{vb:.2f}':>{w}}")
            continue
        lines.append(f"{m:12}{va:>{w}.2f}{vb:>{w}.2f}{vb - va:>+{w}.2f}")
    ca, cb, unmatched = paired_cider(a, b)
    if len(ca) == 0:
        lines.append("no items in common; no paired test")
        return lines, {}
    t = paired_mean_bootstrap(ca, cb, n_boot, seed)
    t["items"], t["unmatched"] = len(ca), unmatched
    lines.append(f"paired bootstrap on CIDEr-D ({len(ca)} shared items"
                 + (f", {unmatched} unmatched left out" if unmatched else "")
                 + f"): B - A = {t['delta']:+.3f}, 95% CI [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], " + format_p(t))
    return lines, {"CIDEr-D": t}
