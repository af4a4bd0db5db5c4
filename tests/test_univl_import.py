"""``videolm import-checkpoint univl``: UniVL's own code against ours, key errors, and the imported run's uses.

The equivalence test builds microsoft/UniVL's reference model from a local checkout
(``benchmarks/univl_reference.py``; skipped with the reason when there is none),
saves its random weights, imports them through the command line and compares every
output (``benchmarks/univl_equivalence.py``). The other tests need no checkout: they
write a UniVL-format state dict from a videolm model (the key names UniVL's modules
use, with its tied copies) and check what the importer does with it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from test_train import TINY_OVERRIDES, write_data
from videolm.cli import main
from videolm.errors import ConfigError
from videolm.model.univl_checkpoint import DECODER_LAYER, RENAMES, SINGLE
from videolm.model.video_text import ModelConfig, build_model
from videolm.pretrain.checkpoint import load_objective_state, load_pretrained
from videolm.pretrain.import_checkpoint import import_univl
from videolm.pretrain.objectives import TextVocab, build_objective
from videolm.model.text import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
D = 8
CFG = ModelConfig(architecture="two_stream", hidden=32, heads=2, text_init="none", text_layers=2, video_layers=2,
                  cross_layers=1, decoder_layers=1, max_frames=16, max_text_len=24, embed_dim=0, feature_dim=D,
                  dropout=0.0)


def univl_keys(model_state: dict, mlm_state: dict, video_positions: int = 40) -> dict:
    """A state dict laid out as UniVL's ``univl.pretrained.bin`` (names, tied copies, unused poolers and heads)."""
    out = {}
    back = [(new, old) for old, new in RENAMES] + [("mlm.", "cls.predictions.")]
    flat = {**model_state, **{f"mlm.{k}": v for k, v in mlm_state.items()}}
    single = {v: k for k, v in SINGLE.items()}
    for key, value in flat.items():
        if key == "joint.logit_scale":
            continue
        if key in single:
            out[single[key]] = value
            continue
        new, old = next((n, o) for n, o in back if key.startswith(n))
        rest = key[len(new):]
        if old == "decoder.decoder.":
            for a, b in DECODER_LAYER:
                rest = re.sub(r"^(layer\.\d+\.)" + re.escape(b), r"\g<1>" + a, rest)
        out[old + rest] = value
    g = torch.Generator().manual_seed(1)
    pos = out["visual.embeddings.position_embeddings.weight"]
    out["visual.embeddings.position_embeddings.weight"] = torch.cat(  # UniVL's table is longer than max_frames
        [pos, torch.randn(video_positions - len(pos), pos.shape[1], generator=g)])
    words, positions = out["bert.embeddings.word_embeddings.weight"], out["bert.embeddings.position_embeddings.weight"]
    H = words.shape[1]
    out.update({"decoder.embeddings.word_embeddings.weight": words.clone(),
                "decoder.classifier.cls.predictions.decoder.weight": words.clone(),
                "cls.predictions.decoder.weight": words.clone(),
                "decoder.embeddings.position_embeddings.weight": positions.clone(),
                "bert.pooler.dense.weight": torch.randn(H, H, generator=g), "bert.pooler.dense.bias": torch.zeros(H),
                "visual.pooler.dense.weight": torch.randn(H, H, generator=g), "visual.pooler.dense.bias": torch.zeros(H),
                "cls_visual.predictions.weight": out["visual.embeddings.word_embeddings.weight"].clone(),
                "cls_visual.predictions.bias": torch.zeros(D)})
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(UniVL-format file, the videolm model it came from, its mlm head state)."""
    torch.manual_seed(3)
    model = build_model(CFG)
    mlm = build_objective("mlm", model, TextVocab.from_tokenizer(load_tokenizer(None)), {})
    with torch.no_grad():  # not the init values, so a skipped tensor would show
        for p in list(model.parameters()) + list(mlm.parameters()):
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path_factory.mktemp("univl") / "univl.pretrained.bin"
    torch.save(univl_keys(model.state_dict(), mlm.state_dict()), path)
    return path, model, mlm


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory):
    path, _, _ = source
    run = tmp_path_factory.mktemp("imported") / "run"
    assert main(["import-checkpoint", "univl", str(path), "--out", str(run), "--heads", "2", "--max-words", "24",
                 "--max-frames", "16"]) == 0
    return run


def test_every_tensor_lands_where_it_came_from(source, imported):
    _, model, mlm = source
    loaded, tok, cfg = load_pretrained(imported)
    assert cfg.model.architecture == "two_stream" and cfg.model.embed_dim == 0
    assert (cfg.model.text_layers, cfg.model.video_layers, cfg.model.cross_layers, cfg.model.decoder_layers) == (0, 2, 1, 1)
    assert loaded.text.config.num_hidden_layers == 2 and cfg.model.feature_dim == D
    want, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        if k != "joint.logit_scale":  # videolm's own temperature: UniVL has none (documented value)
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    heads = load_objective_state(sorted((imported / "checkpoints").glob("step_*"))[0])
    for k, v in mlm.state_dict().items():
        torch.testing.assert_close(heads[f"0:mlm.{k}"], v, rtol=0, atol=0)
    report = json.loads((imported / "import.json").read_text())
    notes = " ".join(report["notes"])
    assert "cls_visual" in notes and "bert.pooler" in notes and "first 16 of 40 positions" in notes
    assert "0:mfm_nce" in notes  # a head that starts fresh is said to
    assert tok.vocab_size == 30522


def test_unknown_missing_and_untied_keys_are_named(source, tmp_path):
    path, _, _ = source
    state = torch.load(path, weights_only=True)
    cases = {
        "unknown": ({**state, "visual.extra_gate.weight": torch.zeros(2)}, "visual.extra_gate.weight"),
        "missing": ({k: v for k, v in state.items() if k != "cross.encoder.layer.0.output.dense.bias"},
                    "cross_encoder.encoder.layer.0.output.dense.bias"),
        "untied": ({**state, "cls.predictions.decoder.weight": state["cls.predictions.decoder.weight"] + 1},
                   "cls.predictions.decoder.weight"),
        "shape": ({**state, "similarity_dense.weight": torch.zeros(2, 32)}, "align_head.weight"),
    }
    for name, (bad, mentioned) in cases.items():
        f = tmp_path / f"{name}.bin"
        torch.save(bad, f)
        with pytest.raises(ConfigError, match=re.escape(mentioned)):
            import_univl(f, tmp_path / f"run_{name}", heads=2, max_words=24, max_frames=16)
        assert not (tmp_path / f"run_{name}").exists(), "a failed import must leave no half-written run"


def test_files_that_are_not_weights_are_refused(tmp_path):
    import argparse  # any class outside torch's weights-only allow-list stands for code in a pickle

    torch.save({"bert.embeddings.word_embeddings.weight": argparse.Namespace(x=1)}, tmp_path / "code.bin")
    with pytest.raises(ConfigError, match="weights-only"):
        import_univl(tmp_path / "code.bin", tmp_path / "r1")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="weights-only"):
        import_univl(tmp_path / "junk.bin", tmp_path / "r2")
    torch.save({"model.weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(ConfigError, match="not a UniVL checkpoint"):
        import_univl(tmp_path / "other.bin", tmp_path / "r3")


def test_imported_run_evaluates_and_trains_on(imported, tmp_path, capsys, caplog):
    features, manifest = write_data(tmp_path, dim=D, quantize=False)
    assert main(["eval-retrieval", "--checkpoint", str(imported), "--features", str(features), "--manifest",
                 str(manifest), "--split", "train", "--quiet", "--rerank-top", "3", "--bootstrap", "50",
                 "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["rerank_top"] == 3 and 0 <= report["t2v"]["metrics"]["R@1"] <= 100
    # resuming is refused (no optimiser state), starting a new run from it works
    assert main(["pretrain", "--features", str(features), "--manifest", str(manifest), "--out", str(imported),
                 "--resume", "--quiet"]) == 2
    assert "init-from" in capsys.readouterr().err
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("model.")] + ["max_steps=2", "checkpoint_every=2"]
    with caplog.at_level("INFO", logger="videolm.pretrain.run"):
        assert main(["pretrain", "--config", str(imported / "config.yaml"), "--features", str(features),
                     "--manifest", str(manifest), "--out", str(tmp_path / "more"), "--init-from", str(imported),
                     "--quiet", *overrides]) == 0
    assert f"started from {imported}" in caplog.text and "fresh" not in caplog.text  # every key and head found
    trained, _, cfg = load_pretrained(tmp_path / "more")
    assert cfg.train.init_from == str(imported.resolve()) and cfg.model.text_init == load_pretrained(imported)[2].model.text_init


def test_univl_reference_code_and_videolm_agree(tmp_path):
    from univl_equivalence import TOLERANCE, compare
    from univl_reference import find_checkout

    checkout = find_checkout()
    if checkout is None:
        pytest.skip("no microsoft/UniVL checkout: set UNIVL_CHECKOUT to one (or a bare git mirror) to compare")
    result = compare(checkout, tmp_path)
    assert result["ok"], result["max_abs_diff"]
    assert max(result["max_abs_diff"].values()) <= TOLERANCE
    assert max(result["padding_invariant"].values()) <= 1e-6
