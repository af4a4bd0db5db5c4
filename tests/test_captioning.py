"""Captioning: metrics against pycocoevalcap and by hand, greedy vs beam search, an overfit run that
regenerates its captions, the no-Java fallback, and the caption / eval-caption / compare-runs commands."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from test_train import tiny
from videolm.features.layout import shard_name
from videolm.features.shards import ShardWriter
from videolm.captioning import metrics as cm
from videolm.captioning.generate import GenerateConfig, SpecialIds, ban_repeats, beam_search, caption_memory, greedy
from videolm.captioning.job import CaptionConfig, build_items, run_caption, run_eval_caption
from videolm.cli import main
from videolm.features.shards import FeatureStore
from videolm.manifests.manifest import Caption, VideoEntry, write_manifest
from videolm.pretrain.trainer import run_pretrain

HAS_JAVA = shutil.which("java") is not None
ROWS = [  # hand-made: alternatives, one reference, punctuation, clitics
    {"key": "v0", "hypothesis": "a man is slicing a tomato", "references": ["a man slices a tomato",
                                                                            "someone is cutting a tomato"]},
    {"key": "v1", "hypothesis": "the cat sits on the mat", "references": ["the cat is sitting on the mat",
                                                                          "a cat sits on a mat"]},
    {"key": "v2", "hypothesis": "Add the oil, then stir.", "references": ["add oil to the pan and stir",
                                                                          "pour the oil and stir it"]},
    {"key": "v3", "hypothesis": "a dog runs", "references": ["a dog is running in the park"]},
    {"key": "v4", "hypothesis": "he doesn't like it's taste", "references": ["he does not like the taste",
                                                                             "he didn't like its taste"]},
]
CAPTIONS = ["red seven moves left", "blue two moves up", "green seven moves down", "red two moves right",
            "blue seven moves left fast", "green two moves up", "two red sevens move down", "a blue two"]


def _direct(rows):
    """pycocoevalcap called directly, its own tokenizer and scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({r["key"]: [{"caption": c} for c in r["references"]] for r in rows})
    res = tok.tokenize({r["key"]: [{"caption": r["hypothesis"]}] for r in rows})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return gts, res, {**{f"BLEU-{k + 1}": 100 * bleu[k] for k in range(4)},
                      "ROUGE-L": 100 * Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.skipif(not HAS_JAVA, reason="pycocoevalcap's PTB tokenizer needs java")
def test_metrics_equal_pycocoevalcap_called_directly():
    rep = cm.evaluate_captions(ROWS, n_boot=200, use_java=True)
    gts, res, direct = _direct(ROWS)
    for m, v in direct.items():
        assert rep["metrics"][m] == pytest.approx(v, abs=1e-9), m
    assert rep["metrics"]["METEOR"] is not None and 0 < rep["metrics"]["METEOR"] < 100
    assert rep["tokenizer"] == cm.PTB_NAME and rep["unavailable"] == {}
    # our n-gram counts give pycocoevalcap's corpus BLEU (the bootstrap resamples those counts)
    stats = np.stack([cm.bleu_stats(res[k][0], gts[k]) for k in gts]).sum(0)
    assert 100 * cm.bleu_from_stats(stats)[0] == pytest.approx([direct[f"BLEU-{k}"] for k in range(1, 5)], abs=1e-9)
    # the Python fallback tokenises these plain captions exactly as the PTB tokenizer does
    assert cm.tokenize({r["key"]: r["references"] for r in ROWS}, use_java=False) == gts
    assert cm.tokenize({r["key"]: [r["hypothesis"]] for r in ROWS}, use_java=False) == res
    for m, (lo, hi) in rep["ci95"].items():
        assert lo <= rep["metrics"][m] + 1e-9 and rep["metrics"][m] <= hi + 1e-9 or m.startswith("BLEU"), m


@pytest.mark.skipif(not HAS_JAVA, reason="METEOR runs java")
def test_meteor_corpus_score_from_summed_statistics_equals_the_jar():
    from pycocoevalcap.meteor.meteor import Meteor
    from videolm.captioning import meteor

    rows = ROWS + [{"key": f"s{i}", "hypothesis": h, "references": [r]} for i, (h, r) in enumerate(
        [("a red 6 moves left", "a red 6 moves left"), ("a blue 2 moves up", "a blue 7 moves up"),
         ("nothing", "a green 3 moves down"), ("a yellow 5 moves down", "a yellow 5 moves right")])]
    gts = cm.tokenize({r["key"]: r["references"] for r in rows}, use_java=False)
    res = cm.tokenize({r["key"]: [r["hypothesis"]] for r in rows}, use_java=False)
    keys = list(gts)
    corpus, items, stats = meteor.jar_scores(gts, res, keys)
    direct, direct_items = Meteor().compute_score(gts, res)
    assert corpus == pytest.approx(direct, abs=1e-12) and items == pytest.approx(direct_items, abs=1e-12)
    assert corpus != pytest.approx(np.mean(items), abs=1e-3)  # the corpus score is not the mean of the items
    assert meteor.corpus_from_stats(stats.sum(0))[0] == pytest.approx(corpus, abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):  # any resample (repeats included) as the jar scores it
        idx = rng.integers(0, len(keys), rng.integers(1, 2 * len(keys)))
        sub = {f"{n}": gts[keys[i]] for n, i in enumerate(idx)}, {f"{n}": res[keys[i]] for n, i in enumerate(idx)}
        assert meteor.corpus_from_stats(stats[idx].sum(0))[0] == pytest.approx(Meteor().compute_score(*sub)[0],
                                                                                abs=1e-12)
    rep = cm.evaluate_captions(rows, n_boot=300, use_java=True)
    lo, hi = rep["ci95"]["METEOR"]
    assert lo <= rep["metrics"]["METEOR"] <= hi


def test_one_sentence_worked_by_hand():
    # hyp "the cat sat on the mat", ref "the cat is on the mat": 6 words each (no brevity penalty)
    # 1-grams 5/6 (all but "sat"), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3
    rows = [{"key": "a", "hypothesis": "the cat sat on the mat", "references": ["the cat is on the mat"]}]
    rep = cm.evaluate_captions(rows, n_boot=10, use_java=False)
    m = rep["metrics"]
    assert m["BLEU-1"] == pytest.approx(100 * 5 / 6, abs=1e-6)
    assert m["BLEU-2"] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert m["BLEU-3"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)  # 50.0
    # no 4-gram matches: what is left is pycocoevalcap's smoothing, (1e-15 + 0) / (3 + 1e-9) for 4-grams
    assert m["BLEU-4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** (1 / 4), rel=1e-6)
    # LCS "the cat on the mat" = 5 of 6 both ways: P = R = 5/6, so F (any beta) = 5/6
    assert m["ROUGE-L"] == pytest.approx(100 * 5 / 6, abs=1e-6)
    # CIDEr-D over one item: every n-gram's document frequency is 1 of 1 reference set, idf log(1/1) = 0
    assert m["CIDEr-D"] == 0.0


def test_without_java_meteor_is_unavailable_and_the_fallback_is_recorded(monkeypatch, caplog):
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    monkeypatch.setattr(cm, "_warned_no_java", False)
    rep = cm.evaluate_captions(ROWS, n_boot=50)
    again = cm.evaluate_captions(ROWS, n_boot=50)
    assert rep["metrics"]["METEOR"] is None and "METEOR" not in rep["ci95"]
    assert rep["unavailable"] == {"METEOR": "java not found on PATH (METEOR runs Java)"}
    assert rep["tokenizer"] == cm.FALLBACK_NAME and rep["java"] is None
    assert sum("java not found" in r.message for r in caplog.records) == 1  # said once
    assert again["metrics"] == rep["metrics"] and rep["metrics"]["CIDEr-D"] > 0


def test_fallback_tokenizer_rules():
    assert cm.python_tokenize("He doesn't like it's taste...") == "he does n't like it 's taste"
    assert cm.python_tokenize("A well-known 3.5 cm cut; then (stir)!") == "a well-known 3.5 cm cut then ( stir )"


def test_bootstrap_intervals_cover_the_values_and_are_seeded():
    rows = [{"key": f"k{i}", "hypothesis": r["hypothesis"], "references": r["references"]}
            for i, r in enumerate(ROWS * 4)]
    a = cm.evaluate_captions(rows, n_boot=300, seed=1, use_java=False)
    b = cm.evaluate_captions(rows, n_boot=300, seed=1, use_java=False)
    assert a["ci95"] == b["ci95"]
    for m in ("BLEU-1", "BLEU-2", "ROUGE-L", "CIDEr-D"):
        lo, hi = a["ci95"][m]
        assert lo < a["metrics"][m] < hi, m


# ---------------------------------------------------------------------------------------------- search


class ToyDecoder:
    """A fixed random next-token table over (previous token, memory row): decode() with no network."""

    parts = ("decoder",)

    def __init__(self, vocab=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * 3

    def decode(self, ids, mask, memory, memory_mask, last_only=False):
        out = self.table[ids] + memory[:, :1, : self.table.shape[0]]
        return out[:, -1:] if last_only else out


SPECIAL = SpecialIds(cls=1, sep=2, pad=0, mask=3)


@pytest.mark.parametrize("no_repeat", [0, 2])
def test_beam_of_one_is_greedy(no_repeat):
    model = ToyDecoder()
    memory = torch.randn(6, 3, 12, generator=torch.Generator().manual_seed(1))
    mm = torch.ones(6, 3, dtype=torch.bool)
    for lp in (0.0, 1.0, 2.0):
        cfg = GenerateConfig(beam_size=1, max_len=9, length_penalty=lp, no_repeat_ngram=no_repeat)
        assert beam_search(model, memory, mm, SPECIAL, cfg) == greedy(model, memory, mm, SPECIAL, cfg)


def test_beam_search_finds_a_better_sequence_than_greedy_and_respects_no_repeat():
    model, g = ToyDecoder(seed=3), torch.Generator().manual_seed(4)
    memory, mm = torch.randn(32, 3, 12, generator=g), torch.ones(32, 3, dtype=torch.bool)

    def logprob(rows):
        total = []
        for i, row in enumerate(rows):
            ids = torch.tensor([[SPECIAL.cls, *row, SPECIAL.sep]])[:, : 1 + min(len(row) + 1, 8)]
            logits = model.decode(ids[:, :-1], None, memory[i : i + 1], None)[0]
            logits[:, SPECIAL.banned] = float("-inf")
            total.append(float(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum()))
        return np.array(total)

    cfg = GenerateConfig(beam_size=5, max_len=8, length_penalty=0.0)
    g1, b5 = greedy(model, memory, mm, SPECIAL, cfg), beam_search(model, memory, mm, SPECIAL, cfg)
    assert (logprob(b5) >= logprob(g1) - 1e-5).all() and (logprob(b5) > logprob(g1) + 1e-5).any()
    rep = beam_search(model, memory, mm, SPECIAL, GenerateConfig(beam_size=3, max_len=8, no_repeat_ngram=1))
    assert all(len(set(r)) == len(r) for r in rep)


def test_ban_repeats_bans_the_token_that_would_repeat_an_ngram():
    prefix = torch.tensor([[1, 5, 6, 7, 5, 6], [1, 5, 6, 7, 8, 9]])
    logp = torch.zeros(2, 12)
    ban_repeats(prefix, logp, 3)  # row 0 ends "5 6": "5 6 7" exists, so 7 is banned
    assert torch.isinf(logp[0, 7]) and torch.isinf(logp[0]).sum() == 1 and not torch.isinf(logp[1]).any()


# ---------------------------------------------------------------------------------------------- end to end


def write_caption_data(root, captions=CAPTIONS, dim=8, subtitle=False):
    """One shard of len(captions) videos with distinct random clips, one whole-video caption each."""
    rng = np.random.default_rng(0)
    features = root / "features"
    features.mkdir(parents=True)
    w = ShardWriter(features / shard_name(0), dim, {"encoder": "pixels", "config": "{}"})
    entries = []
    for i, text in enumerate(captions):
        n = 6
        w.add_video(f"v{i}", rng.normal(size=(n, dim)).astype(np.float32), np.arange(n, dtype=float),
                    np.arange(n) + 1.0, float(n))
        caps = [Caption(0.0, float(n), text, "caption")]
        if subtitle:
            caps.append(Caption(1.0, 3.0, f"now number {i}", "subtitle"))
        entries.append(VideoEntry(f"v{i}", f"v{i}.mp4", "train", float(n), tuple(caps)))
    w.finish()
    return features, write_manifest(entries, root / "manifest.jsonl")


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    features, manifest = write_caption_data(root)
    cfg = tiny({"caption": {"weight": 1.0, "condition": "video"}},
               extra=["data.mode=segment", "batch_size=8", "max_steps=250", "lr=3e-3", "warmup_steps=10",
                      "model.hidden=64", "model.dropout=0.0", "checkpoint_every=1000", "log_every=50"])
    run_pretrain(cfg, features, manifest, root / "run", progress=False)
    return root, features, manifest


def test_tiny_model_regenerates_its_8_training_captions(overfit, tmp_path):
    root, features, manifest = overfit
    for beam in (1, 3):
        cfg = CaptionConfig(split="train", batch_size=3, generate=GenerateConfig(beam_size=beam, max_len=12))
        meta = run_caption(root / "run", features, manifest, cfg, tmp_path / f"b{beam}.jsonl", progress=False)
        rows = [json.loads(line) for line in (tmp_path / f"b{beam}.jsonl").read_text().splitlines()]
        assert meta["n_items"] == 8 and meta["model"]["caption_condition_trained"] == "video"
        assert [r["hypothesis"] for r in rows] == CAPTIONS, beam
        assert [r["references"] for r in rows] == [[c] for c in CAPTIONS]


def test_generation_reads_what_the_objective_trained_on(overfit):
    """caption_memory over [CLS] [SEP] + video is the objective's memory with condition: video."""
    from videolm.pretrain.checkpoint import load_pretrained
    from videolm.pretrain.objectives import TextVocab, build_objective
    from videolm.captioning.job import item_inputs

    root, features, manifest = overfit
    model, tok, _ = load_pretrained(root / "run")
    store = FeatureStore(features)
    from videolm.manifests.manifest import load_manifest

    items, _ = build_items(load_manifest(manifest, "train"), store, "video")
    inputs = item_inputs(store, items[:4], tok, model.cfg, with_transcript=False)
    obj = build_objective("caption", model, TextVocab.from_tokenizer(tok), {"condition": "video"})
    with torch.no_grad():
        ours = caption_memory(model, inputs)
        theirs = obj.memory(model, {**inputs, "text_ids": torch.zeros(4, 7, dtype=torch.long)}, None)
    assert torch.equal(ours[1], theirs[1]) and torch.allclose(ours[0], theirs[0], atol=1e-6)
    ids = torch.tensor([[tok.cls_token_id, 2000, 2001, 2002]] * 4)
    with torch.no_grad():
        full = model.decode(ids, torch.ones_like(ids, dtype=torch.bool), *ours)
        last = model.decode(ids, torch.ones_like(ids, dtype=torch.bool), *ours, last_only=True)
    assert last.shape == (4, 1, full.shape[-1]) and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)


def test_segments_and_transcripts(tmp_path):
    features, manifest = write_caption_data(tmp_path, captions=["a b", "c d"], subtitle=True)
    from videolm.manifests.manifest import load_manifest

    store = FeatureStore(features)
    entries = list(load_manifest(manifest, "train"))
    extra = VideoEntry("v0", "v0.mp4", "train", 6.0, (Caption(0.0, 2.0, "first", "caption"),
                                                       Caption(0.0, 2.0, "first again"),
                                                       Caption(3.0, 5.0, "second", "caption"),
                                                       Caption(2.5, 4.0, "spoken words", "asr"),
                                                       Caption(9.0, 10.0, "after the clips", "caption")))
    items, left = build_items([extra, entries[1]], store, "segment")
    assert [(i.key, i.first, i.last, i.references, i.transcript) for i in items] == [
        ("v0#0", 0, 1, ("first", "first again"), ""), ("v0#1", 3, 4, ("second",), "spoken words"),
        ("v1#0", 0, 5, ("c d",), "now number 1")]
    items, _ = build_items([extra], store, "video")  # timed sequential descriptions: one paragraph reference
    assert items[0].references == ("first first again second after the clips",) and items[0].first == 0


def test_caption_eval_caption_and_compare_runs_cli(overfit, tmp_path, capsys):
    root, features, manifest = overfit
    common = ["--checkpoint", str(root / "run"), "--features", str(features), "--manifest", str(manifest),
              "--split", "train", "--quiet", "--max-len", "12"]
    assert main(["caption", *common, "--out", str(tmp_path / "g.jsonl")]) == 0
    assert main(["caption", *common, "--beam-size", "5", "--no-repeat-ngram", "3", "--with-transcript",
                 "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "g.meta.json").is_file() and "captions/s" in capsys.readouterr().out
    for name in ("g", "b"):
        assert main(["eval-caption", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / f"{name}.json"),
                     "--bootstrap", "100"]) == 0
    rep = json.loads((tmp_path / "g.json").read_text())
    assert rep["kind"] == "caption" and rep["generation"]["caption_config"]["generate"]["beam_size"] == 1
    assert rep["metrics"]["CIDEr-D"] > 5 and rep["metrics"]["BLEU-4"] > 99  # it regenerates its captions
    out = capsys.readouterr().out
    assert "CIDEr-D" in out and "BLEU-4" in out
    assert main(["compare-runs", str(tmp_path / "g.json"), str(tmp_path / "b.json"), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "paired bootstrap on CIDEr-D (8 shared items)" in out and "ROUGE-L" in out


def test_compare_refuses_a_caption_report_against_a_retrieval_report(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"kind": "caption", "per_item": {}}))
    (tmp_path / "r.json").write_text(json.dumps({"t2v": {"per_query": {}}, "v2t": {"per_query": {}}}))
    assert main(["compare-runs", str(tmp_path / "c.json"), str(tmp_path / "r.json")]) == 2
    assert "one is a caption report, the other a retrieval report" in capsys.readouterr().err


def test_a_model_without_decoder_is_refused(tmp_path, capsys):
    features, manifest = write_caption_data(tmp_path)
    run_pretrain(tiny({"joint": {"weight": 1.0}}, extra=["max_steps=1"]), features, manifest, tmp_path / "run",
                 progress=False)
    assert main(["caption", "--checkpoint", str(tmp_path / "run"), "--features", str(features), "--manifest",
                 str(manifest), "--split", "train", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "no caption decoder" in capsys.readouterr().err
