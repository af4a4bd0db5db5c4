"""Retrieval evaluation: queries from manifests, re-ranking, reports, CLI, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from test_train import ROOT, tiny, write_data
from videolm.cli import main
from videolm.features.shards import FeatureStore
from videolm.manifests.manifest import Caption, VideoEntry, load_manifest, write_manifest
from videolm.retrieval.evaluate import EvalConfig, rerank
from videolm.retrieval.metrics import GroundTruth
from videolm.retrieval.queries import EvalError, build_queries
from videolm.retrieval.search import search
from videolm.pretrain.trainer import run_pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pretrained run over 16 random videos (all in split 'train')."""
    root = tmp_path_factory.mktemp("eval")
    features, manifest = write_data(root, quantize=False)
    run_pretrain(tiny({"joint": {"weight": 1.0}, "align": {"weight": 1.0, "negatives": 1}}), features, manifest,
                 root / "run", progress=False)
    return root, features, manifest


class FakeStore:
    def __init__(self, ids):
        self.ids, self.directory = set(ids), Path("feats")

    def __contains__(self, vid):
        return vid in self.ids


def entry(vid, *caps):
    return VideoEntry(vid, f"{vid}.mp4", "test", 10.0, tuple(Caption(s, e, t, k) for s, e, t, k in caps))


def test_queries_per_video_and_per_caption():
    entries = [
        entry("a", (5, 6, "then blue", None), (0, 1, "first red", "caption"), (0, 9, "spoken words", "asr")),
        entry("b", (0, 2, "a caption", None), (0, 9, "the official sentence", "query")),
        entry("c", (0, 9, "only subtitles", "subtitle")),
        entry("d", (0, 1, "   ", None)),
        entry("gone", (0, 1, "no features", None)),
        entry("e", (0, 10, "one description", None), (0, 10, "another description", None)),
    ]
    store = FakeStore(["a", "b", "c", "d", "e"])
    qs = build_queries(entries, store, "video")
    assert qs.video_ids == ["a", "b", "c", "d", "e"] and qs.missing == ["gone"]
    # time order; a marked query wins; alternative whole-video descriptions: the first
    assert qs.texts == ["first red then blue", "the official sentence", "one description"]
    assert qs.targets.tolist() == [0, 1, 4] and qs.no_query == 1 and qs.empty == ["d"]
    qs = build_queries(entries, store, "caption")
    assert qs.keys == ["a#0", "a#1", "b#0", "b#1", "e#0", "e#1"] and qs.targets.tolist() == [0, 0, 1, 1, 4, 4]
    queried, gt = qs.v2t()
    assert queried.tolist() == [0, 1, 4] and [gt.of(i).tolist() for i in range(3)] == [[0, 1], [2, 3], [4, 5]]


def test_no_usable_queries_or_videos_is_a_clear_error():
    with pytest.raises(EvalError, match="none of the 1 videos of the split have features"):
        build_queries([entry("x", (0, 1, "t", None))], FakeStore([]), "video")
    with pytest.raises(EvalError, match="no queries"):
        build_queries([entry("x", (0, 1, " ", None))], FakeStore(["x"]), "video")


def test_rerank_matches_naive_reordering():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(30, 8)).astype(np.float32), rng.normal(size=(25, 8)).astype(np.float32)
    gt = GroundTruth.single(rng.integers(0, 25, 30))
    base = search(q, g, gt, top=12)
    cross = rng.normal(size=(30, 25)).astype(np.float32)  # a made-up cross-encoder score per pair
    out = rerank(base, gt, 5, lambda qi, ci: cross[qi, ci])
    full = q @ g.T
    for i in range(30):
        order = sorted(range(25), key=lambda j: (-full[i, j], j))
        top5 = sorted(order[:5], key=lambda j: (-cross[i, j], j))
        want = (top5.index(gt.of(i)[0]) + 1) if gt.of(i)[0] in top5 else base.ranks[i]
        assert out.ranks[i] == want
        assert out.top_ids[i].tolist() == top5 + order[5:12]


def test_eval_cli_writes_report_rankings_plot_and_compares(run, tmp_path, capsys):
    root, features, manifest = run
    common = ["eval-retrieval", "--checkpoint", str(root / "run"), "--features", str(features), "--manifest",
              str(manifest), "--split", "train", "--quiet", "--bootstrap", "200"]
    assert main(common + ["--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "t2v: R@1" in out and "v2t: R@1" in out and str(tmp_path / "a.rankings.jsonl") in out
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["n_videos"] == 16 and rep["n_queries"]["t2v"] == 16 and rep["model"]["step"] == 4
    assert rep["search"]["mode"] == "exact" and rep["dsl"] is False and rep["split"] == "train"
    assert rep["t2v"]["ci95"]["R@1"][0] <= rep["t2v"]["metrics"]["R@1"] <= rep["t2v"]["ci95"]["R@1"][1]
    rows = [json.loads(x) for x in (tmp_path / "a.rankings.jsonl").read_text().splitlines()]
    t2v = [r for r in rows if r["direction"] == "t2v"]
    assert len(t2v) == 16 and all(len(r["top"]) == 10 for r in t2v)
    ranks = {r["query"]: r["rank"] for r in t2v}
    assert ranks == dict(zip(rep["t2v"]["per_query"]["keys"], rep["t2v"]["per_query"]["ranks"]))
    for r in t2v:  # a rank <= 10 means the target is at that position (no ties with random features)
        ids = [t["id"] for t in r["top"]]
        assert (r["target"][0] in ids) == (r["rank"] <= 10)
        if r["rank"] <= 10:
            assert ids.index(r["target"][0]) + 1 == r["rank"]
    assert (tmp_path / "a.recall.png").stat().st_size > 1000

    # faiss-flat gives the same numbers; dual softmax and re-ranking are recorded
    assert main(common + ["--out", str(tmp_path / "b.json"), "--search", "faiss-flat", "--search-k", "5"]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["t2v"]["per_query"]["ranks"] == rep["t2v"]["per_query"]["ranks"]
    assert b["search"] == {"mode": "faiss-flat", "k": 10}
    assert main(common + ["--out", str(tmp_path / "c.json"), "--dsl", "--rerank-top", "3"]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["dsl"] is True and c["rerank_top"] == 3 and c["search"]["dsl_temperature"] == 100.0
    capsys.readouterr()
    assert main(["compare-runs", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--bootstrap", "300"]) == 0
    table = capsys.readouterr().out
    assert "t2v R@1" in table and "paired bootstrap on R@1 (16 shared queries)" in table


def test_eval_bad_input_messages(run, tmp_path, capsys):
    root, features, manifest = run
    args = ["eval-retrieval", "--checkpoint", str(root / "run"), "--manifest", str(manifest), "--quiet",
            "--out", str(tmp_path / "r.json")]
    # no videos in the split
    assert main(args + ["--features", str(features), "--split", "test"]) == 2
    assert "no videos in split 'test' (videos per split: train: 16)" in capsys.readouterr().err
    # features of another dimension
    other, _ = write_data(tmp_path / "other", dim=5, quantize=False)
    assert main(args + ["--features", str(other), "--split", "train"]) == 2
    assert "expects 8-d clip features" in capsys.readouterr().err
    # no checkpoint
    assert main(["eval-retrieval", "--checkpoint", str(tmp_path), "--features", str(features), "--manifest",
                 str(manifest), "--split", "train", "--out", str(tmp_path / "r.json")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    # not a report
    (tmp_path / "x.json").write_text("{}")
    assert main(["compare-runs", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    assert "not a videolm retrieval or caption report" in capsys.readouterr().err


def test_missing_test_videos_are_reported_excluded_and_counted(run, tmp_path):
    from videolm.retrieval.job import run_eval

    root, features, manifest = run
    entries = load_manifest(manifest)
    extra = VideoEntry("never-extracted", "x.mp4", "train", 5.0, (Caption(0, 1, "red moves"),))
    m2 = write_manifest(entries + [extra], tmp_path / "m.jsonl")
    rep = run_eval(root / "run", features, m2, EvalConfig(split="train", bootstrap=50), progress=False)
    assert rep["excluded"]["missing_features"] == 1 and rep["excluded"]["missing_examples"] == ["never-extracted"]
    assert rep["n_videos"] == 16


def test_untrained_model_is_the_same_architecture(run):
    from videolm.retrieval.job import run_eval

    root, features, manifest = run
    cfg = EvalConfig(split="train", bootstrap=50)
    a = run_eval(root / "run", features, manifest, cfg, progress=False, untrained=True)
    b = run_eval(root / "run", features, manifest, cfg, progress=False, untrained=True)
    assert a["model"]["kind"] == "untrained" and a["t2v"]["per_query"] == b["t2v"]["per_query"]  # seeded init
    store = FeatureStore(features)
    assert a["n_videos"] == len(store)


def test_tiny_end_to_end_beats_the_untrained_model(tmp_path, capsys):
    """synth -> extract -> pretrain -> eval through the CLI on held-out videos, in well under two minutes."""
    for split, seed, n in (("train", 0, 48), ("test", 1, 20)):
        assert main(["synth", "--out", str(tmp_path / split), "--videos", str(n), "--seed", str(seed),
                     "--split", split]) == 0
    manifest = write_manifest(load_manifest(tmp_path / "train" / "manifest.jsonl")
                              + load_manifest(tmp_path / "test" / "manifest.jsonl"), tmp_path / "manifest.jsonl")
    features = tmp_path / "features"
    assert main(["extract", "--manifest", str(manifest), "--out", str(features), "--workers", "1"]) == 0
    small = [f"model.{k}={v}" for k, v in {"hidden": 64, "heads": 2, "text_init": "none", "text_layers": 2,
                                             "video_layers": 1, "max_frames": 24, "embed_dim": 32}.items()]
    assert main(["pretrain", "--config", str(ROOT / "pipelines" / "demo.yaml"), "--features", str(features),
                 "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--quiet", *small,
                 "data.max_frames=24", "batch_size=16", "max_steps=150", "warmup_steps=10", "lr=1e-3",
                 "num_workers=0", "threads=1", "checkpoint_every=1000"]) == 0
    reports = {}
    for name, extra in (("trained", []), ("untrained", ["--untrained"])):
        assert main(["eval-retrieval", "--checkpoint", str(tmp_path / "run"), "--features", str(features),
                     "--manifest", str(manifest), "--quiet", "--out", str(tmp_path / f"{name}.json"), *extra]) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["t2v"]["metrics"]
    assert reports["trained"]["MnR"] < 0.7 * reports["untrained"]["MnR"], reports
    assert reports["trained"]["R@5"] > reports["untrained"]["R@5"], reports


def test_visual_word_model_needs_a_matching_codebook_and_an_align_head_to_rerank(tmp_path):
    from videolm.retrieval.job import run_eval

    features, manifest = write_data(tmp_path / "q", quantize=True)
    cfg = tiny({"joint": {"weight": 1.0}}, extra=["model.video_input=tokens", "max_steps=2"])
    run_pretrain(cfg, features, manifest, tmp_path / "run", progress=False)
    rep = run_eval(tmp_path / "run", features, manifest, EvalConfig(split="train", bootstrap=20), progress=False)
    assert rep["n_videos"] == 16 and rep["model"]["objectives"] == ["joint"]
    # a joint-only recipe builds no optional part: no cross encoder, no align head
    with pytest.raises(EvalError, match="recipe had no align objective .objectives: joint., so the model has no align"):
        run_eval(tmp_path / "run", features, manifest, EvalConfig(split="train", bootstrap=20, rerank_top=2),
                 progress=False)
    plain, _ = write_data(tmp_path / "plain", quantize=False)
    with pytest.raises(EvalError, match="has no codebook"):
        run_eval(tmp_path / "run", plain, manifest, EvalConfig(split="train", bootstrap=20), progress=False)


def test_reranking_with_an_align_head_that_was_never_trained_warns(tmp_path, caplog):
    from videolm.retrieval.job import run_eval

    features, manifest = write_data(tmp_path / "d", quantize=False)
    cfg = tiny({"joint": {"weight": 1.0}}, extra=["model.parts=[align]", "max_steps=2"])  # kept, not trained
    run_pretrain(cfg, features, manifest, tmp_path / "run", progress=False)
    rep = run_eval(tmp_path / "run", features, manifest, EvalConfig(split="train", bootstrap=20, rerank_top=2),
                   progress=False)
    assert rep["t2v"]["n_queries"] == 16
    assert "align head the run never trained (objectives: joint)" in caplog.text
