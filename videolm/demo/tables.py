"""The demo's three printed tables: retrieval, captioning and moments on the test split, with intervals
and, for each baseline, the paired bootstrap test against the model in the first row."""

from __future__ import annotations

from .evaluate import DemoScores


def all_tables(scores: DemoScores) -> list[str]:
    return [retrieval_table(scores.retrieval), caption_table(scores.captions),
            moments_table(scores.moments, scores.moment_baselines)]


def _ci(ci, digits: int = 1) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _cell(part: dict, key: str, digits: int = 1, width: int = 20) -> str:
    """``value [low, high]`` of ``part["metrics"][key]``, right-aligned."""
    text = f"{part['metrics'][key]:.{digits}f} {_ci(part['ci95'][key], digits)}"
    return f"{text:>{width}}"


def retrieval_table(reports: dict) -> str:
    """Text-to-video table, with each other row's paired bootstrap test against the first row."""
    from ..retrieval.compare import format_p, paired_ranks
    from ..retrieval.metrics import paired_bootstrap

    names = list(reports)
    first = reports[names[0]]
    lines = [f"text-to-video retrieval, test split: {first['n_videos']} videos, {first['n_queries']['t2v']} queries "
             f"(chance R@1 {100 / first['n_videos']:.1f}%)",
             f"  {'model':14}{'R@1':>7}{'95% CI':>15}{'R@5':>7}{'R@10':>7}{'MedR':>7}{'MnR':>8}   "
             f"this row - {names[0]} (paired bootstrap, R@1)"]
    for name in names:
        m, ci = reports[name]["t2v"]["metrics"], reports[name]["t2v"]["ci95"]["R@1"]
        line = (f"  {name:14}{m['R@1']:7.1f}{_ci(ci):>15}{m['R@5']:7.1f}{m['R@10']:7.1f}"
                f"{m['MedR']:7g}{m['MnR']:8.1f}")
        if name != names[0]:
            a, b, _ = paired_ranks(reports[name], first, "t2v")
            t = paired_bootstrap(a, b, n_boot=2000)
            line += f"   {t['delta']:+.1f} points, {format_p(t)}"
        lines.append(line)
    lines.append("  (pretrained: scored zero-shot, as pretraining left it; fine-tuned: its best val checkpoint)")
    return "\n".join(lines)


def caption_table(reports: dict) -> str:
    """BLEU-4, METEOR, ROUGE-L and CIDEr-D per row, paired bootstrap on CIDEr-D against the first row."""
    from ..captioning.compare import paired_cider, paired_mean_bootstrap
    from ..retrieval.compare import format_p

    names = list(reports)
    first = reports[names[0]]
    cols = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
    lines = [f"captioning, test split: {first['n_items']} timed segments, greedy; tokenizer "
             f"{first['tokenizer'].split(':')[0]}",
             f"  {'model':22}" + "".join(f"{c:>20}" for c in cols) + f"   CIDEr-D, this row - {names[0]}"]
    for name in names:
        rep = reports[name]
        cells = [f"{'n/a (no java)':>20}" if rep["metrics"].get(c) is None else
                 _cell(rep, c, 2 if c == "CIDEr-D" else 1) for c in cols]
        line = f"  {name:22}" + "".join(cells)
        if name != names[0]:
            a, b, _ = paired_cider(first, rep)
            t = paired_mean_bootstrap(a, b, n_boot=2000)
            line += f"   {t['delta']:+.2f}, {format_p(t)}"
        lines.append(line)
    base = reports[names[-1]].get("baseline")
    if base:
        lines.append(f"  ({names[-1]}: {base['caption']!r}, {base['train_count']} times in the train split)")
    return "\n".join(lines)


def moments_table(report: dict, baselines: dict) -> str:
    """SVMR R@1 at IoU 0.5/0.7 and mIoU for the model and the baselines; the model's VCMR and VR beside."""
    keys = ("R@1 IoU=0.5", "R@1 IoU=0.7", "mIoU")
    lines = [f"moment retrieval, test split: {report['n_queries']} timed captions in {report['n_videos']} videos "
             "(clips alone: no subtitles)",
             f"  {'SVMR (right video given)':28}" + "".join(f"{k:>20}" for k in keys)]
    rows = {"vsm model": report["SVMR"], **{n: b["SVMR"] for n, b in baselines.items()}}
    for name, s in rows.items():
        lines.append(f"  {name:28}" + "".join(_cell(s, k) for k in keys))
    v, c = report["VCMR"], report["VR"]
    lines.append(f"  {'VCMR (whole corpus)':28}" + "".join(_cell(v, k) for k in keys)
                 + f"   (VR R@1 {c['metrics']['R@1']:.1f}, chance {100 / report['n_videos']:.1f})")
    return "\n".join(lines)
