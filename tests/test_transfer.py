"""The transfer study (benchmarks/bench_transfer.py): the quick grid's outputs have the documented
shape and a rerun resumes instead of retraining. The numbers themselves are the study's business."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_transfer  # noqa: E402


def test_without_drops_an_objective_and_keeps_the_budget():
    univl = bench_transfer.recipe_dict("univl")
    no_joint = bench_transfer.without(univl, "joint")
    assert [s["name"] for s in no_joint["stages"]] == ["stage2"] and no_joint["stages"][0]["fraction"] == 1.0
    assert "joint" not in no_joint["stages"][0]["objectives"] and "joint" in univl["stages"][0]["objectives"]
    no_mlm = bench_transfer.without(univl, "mlm")
    assert [s["fraction"] for s in no_mlm["stages"]] == [0.5, 0.5]
    assert set(no_mlm["stages"][1]["objectives"]) == {"joint", "mfm_nce", "align", "caption"}
    hero = bench_transfer.without(bench_transfer.recipe_dict("hero"), "fom")
    assert set(hero["objectives"]) == {"mlm", "mfm_nce", "vsm"}


def test_every_study_recipe_loads(tmp_path):
    from videolm.pretrain.recipe import load_recipe

    pre = bench_transfer.pretrain_runs(bench_transfer.FULL)
    fts = bench_transfer.finetune_runs(bench_transfer.FULL, pre)
    assert len(pre) == 4 * 3 + 5 + 4 + 1 and len(fts) == 5 * 3 * 4 + 3 * 3 + 2 * 3 + 10
    for n, run in enumerate(pre + fts):
        path = tmp_path / f"{n}.yaml"
        path.write_text(__import__("yaml").safe_dump(run["recipe"]))
        cfg = load_recipe(path)
        assert cfg.train.batch_size == (bench_transfer.FULL.batch if n < len(pre) else bench_transfer.FULL.ft_batch)
        assert cfg.train.threads == 1
    assert {r["recipe"]["model"]["architecture"] for r in fts if r["task"] == "moments"} == {"hierarchical"}


def test_quick_study_writes_tables_plots_and_resumes(tmp_path):
    out = tmp_path / "study"
    assert bench_transfer.main(["--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "transfer.json").read_text())
    plan = summary["plan"]
    ablated = {"univl - mlm", "hero - fom", "videobert (flat codebook)"}
    assert set(summary["retrieval"]) == set(bench_transfer.CHOICES) | ablated
    for rows in (summary["retrieval"][c] for c in bench_transfer.CHOICES):
        assert sorted(int(n) for n in rows) == plan["sizes"]
        for row in rows.values():
            assert 0 <= row["R@1"]["mean"] <= 100 and 0 <= row["pair_accuracy"]["mean"] <= 100
    assert set(summary["zero_shot"]) >= {"joint", "univl", "hero", "videobert"}
    assert set(summary["vs_scratch"]) == {"joint", "univl", "hero", "videobert"}
    assert set(summary["tasks"]["caption"]) == {"scratch", "joint", "univl"}
    assert set(summary["tasks"]["moments"]) == {"scratch", "hero"}
    assert set(summary["ablations"]) == ablated
    assert summary["retrieval"]["hero - fom"]["16"]["R@1"]["n"] == 1  # ablations: one seed, at task_size only
    for f in ("transfer_r1.png", "transfer_pairs.png", "transfer_ablations.png"):
        assert (out / f).stat().st_size > 1000
    md = (out / "transfer.md").read_text()
    for c in bench_transfer.CHOICES:
        assert f"| {c} |" in md
    assert "p = " in md and "CIDEr-D" in md and "R@1 IoU=0.5" in md
    _pair_accuracy_is_r1_in_two_video_galleries(out, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}
    assert len(stamps) > 20  # pretraining and fine-tuning runs, each with its result
    assert bench_transfer.main(["--quick", "--out", str(out)]) == 0  # resumes: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")} == stamps


def _pair_accuracy_is_r1_in_two_video_galleries(out, tmp_path):
    """Reference: each pair scored alone by eval-retrieval's evaluator; R@1 among 2 videos = pair accuracy."""
    from videolm.manifests.manifest import load_manifest, write_manifest
    from videolm.retrieval.evaluate import EvalConfig
    from videolm.retrieval.job import run_eval

    run = out / "finetune" / "joint_s0_n8"
    result = json.loads((run / "result.json").read_text())
    checkpoint = run / "best" if (run / "best").is_dir() else run
    entries = load_manifest(out / "data" / "order.jsonl")
    hits = []
    for k in range(0, len(entries), 2):
        pair = write_manifest(entries[k:k + 2], tmp_path / f"pair{k}.jsonl")
        report = run_eval(checkpoint, out / "features" / "down", pair, EvalConfig(split="test", bootstrap=10),
                          progress=False)
        hits.append(report["t2v"]["metrics"]["R@1"])
    assert sum(hits) / len(hits) == pytest.approx(result["test"]["order"]["pair_accuracy"])
