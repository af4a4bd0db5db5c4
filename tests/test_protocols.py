"""eval-retrieval --protocol: named protocols set split and query mode, refuse manifests that
cannot support them, and are recorded in the report (videolm/retrieval/protocols.py)."""

import dataclasses
import json

import pytest

from test_retrieval import FakeStore, entry
from test_train import tiny, write_data
from videolm.cli import build_parser, main
from videolm.errors import ConfigError
from videolm.manifests.manifest import Caption, load_manifest, write_manifest
from videolm.pretrain.trainer import run_pretrain
from videolm.retrieval.evaluate import EvalConfig
from videolm.retrieval.protocols import PROTOCOLS, is_timed, settings
from videolm.retrieval.queries import build_queries


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pretrained run, and its 16 videos (three timed captions each) as a val split."""
    root = tmp_path_factory.mktemp("protocols")
    features, manifest = write_data(root, quantize=False)
    run_pretrain(tiny({"joint": {"weight": 1.0}}), features, manifest, root / "run", progress=False)
    val = write_manifest([dataclasses.replace(e, split="val") for e in load_manifest(manifest)], root / "val.jsonl")
    return root, features, val


def eval_args(run, tmp_path, *extra):
    root, features, manifest = run
    return ["eval-retrieval", "--checkpoint", str(root / "run"), "--features", str(features), "--manifest",
            str(manifest), "--quiet", "--bootstrap", "50", "--out", str(tmp_path / "r.json"), *extra]


def test_paragraph_queries_join_every_description_in_time_order():
    entries = [entry("a", (5, 6, "then blue", None), (0, 1, "first red", "caption"), (0, 9, "asr words", "asr")),
               entry("b", (0, 10, "one", None), (0, 10, "two", None), (0, 10, "marked", "query")),
               entry("c", (0, 9, "only subtitles", "subtitle"))]
    qs = build_queries(entries, FakeStore(["a", "b", "c"]), "paragraph")
    # alternatives and the 'query' mark are not special here: the whole paragraph is the query
    assert qs.texts == ["first red then blue", "one two marked"] and qs.keys == ["a", "b"] and qs.no_query == 1


def test_timed_means_not_every_description_spans_the_whole_video():
    assert is_timed(entry("a", (0, 3, "x", None), (3, 10, "y", None)))
    assert is_timed(entry("b", (2, 7, "one moment", None)))
    assert not is_timed(entry("c", (0, 10, "whole", None), (0, 10, "again", "caption"), (1, 2, "sub", "subtitle")))
    assert not is_timed(dataclasses.replace(entry("d", (0, 0, "unknown duration", None)), duration=None))


def test_settings_fill_in_and_refuse_contradictions():
    assert settings(None, None, None) == ("test", "video")
    assert settings("paragraph", None, None) == ("val", "paragraph")
    assert settings("paragraph", "test", "paragraph") == ("test", "paragraph")  # DiDeMo's test
    assert settings("msrvtt-1k-a", None, None) == ("test", "video")
    assert settings("caption", "val", None) == ("val", "caption")
    with pytest.raises(ConfigError, match="--protocol paragraph uses --query-mode paragraph, not caption"):
        settings("paragraph", None, "caption")
    with pytest.raises(ConfigError, match="--protocol msrvtt-1k-a is measured on the test split, not val"):
        settings("msrvtt-1k-a", "val", None)
    with pytest.raises(ConfigError, match="unknown protocol 'lsmdc'; known: msrvtt-1k-a, paragraph, caption"):
        EvalConfig(protocol="lsmdc")
    with pytest.raises(ConfigError, match="uses --query-mode video"):
        EvalConfig(protocol="msrvtt-1k-a", query_mode="caption")
    flag = next(a for a in build_parser()._subparsers._group_actions[0].choices["eval-retrieval"]._actions
                if a.dest == "protocol")
    assert list(flag.choices) == list(PROTOCOLS)


def test_paragraph_protocol_is_recorded_and_scores_the_val_split(run, tmp_path, capsys):
    assert main(eval_args(run, tmp_path, "--protocol", "paragraph")) == 0
    assert "(protocol paragraph, split val, paragraph queries" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["protocol"]["name"] == "paragraph" and rep["eval_config"]["protocol"] == "paragraph"
    assert (rep["split"], rep["query_mode"], rep["n_queries"]["t2v"]) == ("val", "paragraph", 16)
    paragraphs = {json.loads(x)["query"]: json.loads(x)["text"] for x in (tmp_path / "r.rankings.jsonl").open()
                  if json.loads(x)["direction"] == "t2v"}
    first = load_manifest(run[2])[0]
    assert paragraphs[first.video_id] == " ".join(c.text for c in sorted(first.captions, key=lambda c: c.start))
    # caption: one query per caption, the split given on the command line
    assert main(eval_args(run, tmp_path, "--protocol", "caption", "--split", "val")) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert (rep["protocol"]["name"], rep["query_mode"], rep["n_queries"]["t2v"]) == ("caption", "caption", 48)
    assert main(eval_args(run, tmp_path, "--split", "val")) == 0  # no protocol: recorded as none
    assert json.loads((tmp_path / "r.json").read_text())["protocol"] is None


def test_protocols_refuse_manifests_that_cannot_support_them(run, tmp_path, capsys):
    root, features, val = run
    whole = [dataclasses.replace(e, split="test", captions=(Caption(0.0, e.duration, "a whole-video sentence"),
                                                            Caption(0.0, e.duration, "another one")))
             for e in load_manifest(val)]
    m = write_manifest(whole, tmp_path / "whole.jsonl")
    args = eval_args((root, features, m), tmp_path)
    assert main(args + ["--protocol", "paragraph", "--split", "test"]) == 2
    assert "--protocol paragraph needs timed captions" in capsys.readouterr().err
    assert main(args + ["--protocol", "msrvtt-1k-a"]) == 2
    err = capsys.readouterr().err
    assert "--protocol msrvtt-1k-a: 16 of the 16 videos of split test" in err and "--test-csv" in err
    assert main(args + ["--protocol", "msrvtt-1k-a", "--split", "val"]) == 2
    assert "measured on the test split, not val" in capsys.readouterr().err
    assert main(args + ["--protocol", "paragraph", "--query-mode", "video"]) == 2
    assert "drop --query-mode" in capsys.readouterr().err
    # marked queries (as the 1k-A import writes them): accepted, recorded, with a warning about the size
    marked = [dataclasses.replace(e, captions=e.captions[:1] + (Caption(0.0, e.duration, f"query {i}", "query"),))
              for i, e in enumerate(whole)]
    m = write_manifest(marked, tmp_path / "marked.jsonl")
    assert main(eval_args((root, features, m), tmp_path, "--protocol", "msrvtt-1k-a")) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["protocol"]["name"] == "msrvtt-1k-a" and rep["split"] == "test" and rep["n_queries"]["t2v"] == 16
