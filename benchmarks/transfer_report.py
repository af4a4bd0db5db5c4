"""The transfer study's outputs: ``transfer.json``, ``transfer.md`` and PNG plots (``bench_transfer.py``).

Across seeds a number is ``mean ± std`` (sample std; one seed: no std). A comparison
against scratch pairs each test query's result of the recipe with scratch's under the
same seed, pools the pairs of every seed and bootstraps over them
(``retrieval.metrics.paired_bootstrap`` for R@1, ``captioning.compare.paired_mean_bootstrap``
for CIDEr-D): the interval and p-value of the seed-averaged difference on these test queries.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

N_BOOT = 10_000
MOMENT_KEY = "R@1 IoU=0.5"
MAIN = ("scratch", "joint", "univl", "hero", "videobert")  # the pretraining choices; other rows are ablations


def _ms(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": len(v)}


def _fmt(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "—"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def _pooled_ranks(runs_a: dict, runs_b: dict, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the queries both runs share, seed by seed ({seed: retrieval part}), concatenated."""
    a, b = [], []
    for seed in sorted(set(runs_a) & set(runs_b)):
        ka = dict(zip(runs_a[seed][part]["keys"], runs_a[seed][part]["ranks"]))
        kb = dict(zip(runs_b[seed][part]["keys"], runs_b[seed][part]["ranks"]))
        common = [k for k in ka if k in kb]
        a += [ka[k] for k in common]
        b += [kb[k] for k in common]
    return np.asarray(a), np.asarray(b)


def retrieval_rows(fts: list[dict], sizes: list[int]) -> dict:
    """{choice: {size: {R@1, R@5, MedR, order_R@1, pair_accuracy: mean/std}, plus by_seed parts}}."""
    parts = defaultdict(lambda: defaultdict(dict))  # choice -> size -> seed -> result["test"]
    for r in fts:
        if r["task"] == "retrieval":
            parts[r["choice"]][r["size"]][r["seed"]] = r["test"]
    rows = {}
    for choice, by_size in parts.items():
        rows[choice] = {}
        for size, by_seed in sorted(by_size.items()):
            runs = list(by_seed.values())
            rows[choice][size] = {
                **{m: _ms([p["test"]["metrics"][m] for p in runs]) for m in ("R@1", "R@5", "MedR")},
                "order_R@1": _ms([p["order"]["metrics"]["R@1"] for p in runs]),
                "pair_accuracy": _ms([p["order"]["pair_accuracy"] for p in runs]),
                "ci95_R@1_first_seed": runs[0]["test"]["ci95"]["R@1"],
            }
    return {"rows": rows, "parts": parts}


def versus_scratch(parts: dict, sizes: list[int]) -> dict:
    """Paired bootstrap of each choice's R@1 (and order pair accuracy) against scratch at each size."""
    from videolm.retrieval.metrics import paired_bootstrap
    from videolm.captioning.compare import paired_mean_bootstrap

    out = {}
    for choice in [c for c in MAIN if c in parts and c != "scratch"]:  # ablations: ablation_rows
        out[choice] = {}
        for size in sizes:
            mine, base = parts[choice].get(size, {}), parts.get("scratch", {}).get(size, {})
            if not mine or not base:
                continue
            a, b = _pooled_ranks(mine, base)
            test = paired_bootstrap(a, b, k=1, n_boot=N_BOOT)
            seeds = sorted(set(mine) & set(base))
            wins_a = np.concatenate([mine[s]["order"]["pair_wins"] for s in seeds])
            wins_b = np.concatenate([base[s]["order"]["pair_wins"] for s in seeds])
            pairs = paired_mean_bootstrap(100 * wins_b, 100 * wins_a, n_boot=N_BOOT)  # a - b
            out[choice][size] = {"R@1": test, "pair_accuracy": {**pairs, "metric": "pair accuracy"},
                                 "queries": int(len(a))}
    return out


def task_rows(fts: list[dict]) -> dict:
    """Caption CIDEr-D and moment SVMR R@1 (IoU 0.5) per choice, with the paired CIDEr test vs scratch."""
    from videolm.captioning.compare import paired_mean_bootstrap

    caps, moms = defaultdict(dict), defaultdict(dict)
    for r in fts:
        if r["task"] == "caption":
            caps[r["choice"]][r["seed"]] = r["test"]
        elif r["task"] == "moments":
            moms[r["choice"]][r["seed"]] = r["test"]
    out = {"caption": {}, "moments": {}}
    for choice, by_seed in caps.items():
        row = {m: _ms([t["metrics"][m] for t in by_seed.values()]) for m in ("CIDEr-D", "BLEU-4", "ROUGE-L")}
        if choice != "scratch" and "scratch" in caps:
            a, b = [], []
            for s in sorted(set(by_seed) & set(caps["scratch"])):
                ka = dict(zip(caps["scratch"][s]["keys"], caps["scratch"][s]["cider"]))
                kb = dict(zip(by_seed[s]["keys"], by_seed[s]["cider"]))
                common = [k for k in ka if k in kb]
                a += [ka[k] for k in common]
                b += [kb[k] for k in common]
            row["vs_scratch"] = paired_mean_bootstrap(np.asarray(a, float), np.asarray(b, float), n_boot=N_BOOT)
        out["caption"][choice] = row
    for choice, by_seed in moms.items():
        out["moments"][choice] = {MOMENT_KEY: _ms([t["SVMR"]["metrics"][MOMENT_KEY] for t in by_seed.values()]),
                                  "ci95_first_seed": next(iter(by_seed.values()))["SVMR"]["ci95"][MOMENT_KEY]}
    return out


def zero_shot_rows(pre: list[dict]) -> dict:
    by = defaultdict(list)
    for r in pre:
        by[r["choice"]].append(r)
    return {c: {"R@1": _ms([r["zero_shot"]["test"]["metrics"]["R@1"] for r in rs]),
                "R@5": _ms([r["zero_shot"]["test"]["metrics"]["R@5"] for r in rs]),
                "MedR": _ms([r["zero_shot"]["test"]["metrics"]["MedR"] for r in rs]),
                "pair_accuracy": _ms([r["zero_shot"]["order"]["pair_accuracy"] for r in rs]),
                "pretrain_s": _ms([r["seconds"] for r in rs]), "examples": rs[0]["examples"]}
            for c, rs in by.items()}


def ablation_rows(pre: list[dict], fts: list[dict], size: int) -> dict:
    """Each ablated recipe (seed 0, fine-tuned on ``size`` videos) against its full recipe, paired."""
    from videolm.retrieval.metrics import paired_bootstrap

    full = {r["choice"]: r for r in fts if r["task"] == "retrieval" and r["seed"] == 0 and r["size"] == size}
    zero = {r["choice"]: r for r in pre if r["seed"] == 0}
    out = {}
    for choice, r in full.items():
        if " - " not in choice and "(" not in choice:
            continue
        parent = choice.split(" ")[0]
        if parent not in full:
            continue
        a, b = _pooled_ranks({0: r["test"]}, {0: full[parent]["test"]})
        za, zb = _pooled_ranks({0: zero[choice]["zero_shot"]}, {0: zero[parent]["zero_shot"]})
        out[choice] = {"parent": parent, "R@1": r["test"]["test"]["metrics"]["R@1"],
                       "parent_R@1": full[parent]["test"]["test"]["metrics"]["R@1"],
                       "vs_parent": paired_bootstrap(a, b, k=1, n_boot=N_BOOT),
                       "zero_shot_vs_parent": paired_bootstrap(za, zb, k=1, n_boot=N_BOOT),
                       "pair_accuracy": r["test"]["order"]["pair_accuracy"]}
    return out


@contextmanager
def _figure(path: Path, height: float):
    """A matplotlib axis whose figure is laid out, saved to ``path`` and closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, height))
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_curves(rows: dict, sizes: list[int], path: Path, metric: str = "R@1", ylabel: str = "test R@1 (%)") -> Path:
    with _figure(path, 4.2) as ax:
        for choice in [c for c in MAIN if c in rows]:
            xs = [n for n in sizes if n in rows[choice]]
            ys = [rows[choice][n][metric]["mean"] for n in xs]
            err = [rows[choice][n][metric]["std"] or 0.0 for n in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=choice, ls="--" if choice == "scratch" else "-")
        ax.set_xscale("log")
        ax.minorticks_off()  # log-scale minor labels (3x10^1, ...) would crowd the train sizes
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("labelled training videos (fine-tuning)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    return path


def plot_ablations(ablations: dict, path: Path) -> Path:
    names = list(ablations)
    with _figure(path, 0.45 * len(names) + 1.2) as ax:
        d = [ablations[n]["vs_parent"]["delta"] for n in names]
        lo = [d[i] - ablations[n]["vs_parent"]["ci"][0] for i, n in enumerate(names)]
        hi = [ablations[n]["vs_parent"]["ci"][1] - d[i] for i, n in enumerate(names)]
        ax.barh(range(len(names)), d, xerr=[lo, hi], capsize=3, color=["C3" if x < 0 else "C2" for x in d])
        ax.set_yticks(range(len(names)), names)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("test R@1 change vs the full recipe\n(points, 95% paired bootstrap)")
        ax.invert_yaxis()
    return path


def _p(test: dict) -> str:
    return f"{test['delta']:+.1f} [{test['ci'][0]:+.1f}, {test['ci'][1]:+.1f}], p = {test['p_value']:.3g}"


def markdown(summary: dict) -> str:
    sizes, lines = summary["plan"]["sizes"], []
    seeds = len(summary["plan"]["seeds"])
    lines.append(f"### Text-to-video retrieval on the test set ({summary['plan']['test']} videos, whole-video "
                 f"queries), test R@1 (%), mean ± std over {seeds} pretraining seed(s)")
    lines.append("")
    lines.append("| pretraining | zero-shot | " + " | ".join(f"n={n}" for n in sizes) + " |")
    lines.append("|---|---|" + "---|" * len(sizes))
    rows, zero = summary["retrieval"], summary["zero_shot"]
    for c in [c for c in MAIN if c in rows]:
        z = _fmt(zero[c]["R@1"]) if c in zero else "—"
        lines.append(f"| {c} | {z} | " + " | ".join(_fmt(rows[c].get(n, {}).get("R@1")) for n in sizes) + " |")
    lines.append("")
    lines.append(f"R@5 and MedR after fine-tuning on n={summary['plan']['task_size']}; order test "
                 f"({summary['plan']['order_pairs']} pairs: same events, opposite orders): R@1 over its videos and "
                 "pair accuracy (own video above its reversed twin; chance 50%)")
    lines.append("")
    lines.append("| pretraining | R@5 | MedR | order R@1 | pair accuracy | zero-shot pair accuracy |")
    lines.append("|---|---|---|---|---|---|")
    n = summary["plan"]["task_size"]
    for c in [c for c in MAIN if c in rows]:
        r = rows[c].get(n, {})
        zp = _fmt(zero[c]["pair_accuracy"]) if c in zero else "—"
        lines.append(f"| {c} | {_fmt(r.get('R@5'))} | {_fmt(r.get('MedR'))} | {_fmt(r.get('order_R@1'))} | "
                     f"{_fmt(r.get('pair_accuracy'))} | {zp} |")
    lines.append("")
    lines.append("Against scratch (test R@1 difference in points, paired bootstrap over the test queries of every "
                 "seed, 95% interval):")
    lines.append("")
    lines.append("| pretraining | " + " | ".join(f"n={n}" for n in sizes) + " |")
    lines.append("|---|" + "---|" * len(sizes))
    for c, by in summary["vs_scratch"].items():
        lines.append(f"| {c} | " + " | ".join(_p(by[n]["R@1"]) if n in by else "—" for n in sizes) + " |")
    tasks = summary["tasks"]
    if tasks["caption"]:
        lines += ["", f"### Captioning (fine-tuned on n={n}, greedy, test segments)", "",
                  "| pretraining | CIDEr-D | BLEU-4 | ROUGE-L | CIDEr-D vs scratch |", "|---|---|---|---|---|"]
        for c, r in tasks["caption"].items():
            vs = _p(r["vs_scratch"]) if "vs_scratch" in r else "—"
            lines.append(f"| {c} | {_fmt(r['CIDEr-D'], 3)} | {_fmt(r['BLEU-4'])} | {_fmt(r['ROUGE-L'])} | {vs} |")
    if tasks["moments"]:
        lines += ["", f"### Moment retrieval (SVMR, fine-tuned on n={n} with vsm, context: video)", "",
                  f"| pretraining | {MOMENT_KEY} | 95% interval (first seed) |", "|---|---|---|"]
        for c, r in tasks["moments"].items():
            ci = r["ci95_first_seed"]
            lines.append(f"| {c} | {_fmt(r[MOMENT_KEY])} | [{ci[0]:.1f}, {ci[1]:.1f}] |")
    if summary["ablations"]:
        lines += ["", f"### Ablations (seed 0, fine-tuned on n={n}): test R@1 against the full recipe", "",
                  "| recipe | R@1 | full recipe | change (paired bootstrap) | zero-shot change | pair accuracy |",
                  "|---|---|---|---|---|---|"]
        for c, r in summary["ablations"].items():
            lines.append(f"| {c} | {r['R@1']:.1f} | {r['parent_R@1']:.1f} | {_p(r['vs_parent'])} | "
                         f"{_p(r['zero_shot_vs_parent'])} | {r['pair_accuracy']:.1f} |")
    lines += ["", "Pretraining budget: every recipe sees the same number of examples "
              f"({summary['plan']['pretrain_steps']} steps x batch {summary['plan']['batch']}); wall time per "
              "pretraining run (s): " + ", ".join(f"{c} {_fmt(z['pretrain_s'], 0)}" for c, z in zero.items()
                                                   if " " not in c) + "."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, plan: dict, pre: list[dict], fts: list[dict], timing: dict, quick: bool,
                 device: str) -> dict:
    sizes = list(plan["sizes"])
    ret = retrieval_rows(fts, sizes)
    summary = {
        "plan": plan, "quick": quick, "device": device,
        # timing is this invocation's (a resumed study's is short); run_seconds add up every run's training
        "timing": {**timing, "pretrain_run_s": round(sum(r["seconds"] for r in pre), 1),
                   "finetune_run_s": round(sum(r["seconds"] for r in fts), 1)},
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "zero_shot": zero_shot_rows(pre),
        "retrieval": ret["rows"],
        "vs_scratch": versus_scratch(ret["parts"], sizes),
        "tasks": task_rows(fts),
        "ablations": ablation_rows(pre, fts, plan["task_size"]),
    }
    written = {"json": out / "transfer.json", "markdown": out / "transfer.md",
               "curve": plot_curves(ret["rows"], sizes, out / "transfer_r1.png"),
               "pair_curve": plot_curves(ret["rows"], sizes, out / "transfer_pairs.png", "pair_accuracy",
                                         "order test pair accuracy (%)")}
    if summary["ablations"]:
        written["ablations"] = plot_ablations(summary["ablations"], out / "transfer_ablations.png")
    summary["written"] = {k: str(v) for k, v in written.items()}
    (out / "transfer.md").write_text(markdown(summary))
    (out / "transfer.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
