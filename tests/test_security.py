"""Security audit, as tests (docs/reliability.md, "Bad input and security").

(a) YAML is only ever read with ``yaml.safe_load``: a ``!!python/object`` tag gives a
    ConfigError (or at worst a YAML error), never code execution.
(b) Shard and codebook metadata are HDF5 + JSON; the only pickle use is the HowTo100M
    importer, and only with ``--trust-pickle``.
(c) Every ``torch.load`` states ``weights_only`` explicitly; ``weights_only=False``
    is allowed only for the trainer state in checkpoint.py (being converted).
(d) ``root=``: a manifest path that escapes the declared root is refused on its line.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import yaml

from videolm.errors import ConfigError
from videolm.extract.config import ExtractConfig
from videolm.config import load_yaml
from videolm.manifests.manifest import ManifestError, iter_manifest, load_manifest

PACKAGE = Path(__file__).resolve().parents[1] / "videolm"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


def _source(p: Path) -> str:
    return p.read_text(encoding="utf-8")


def _rel(p: Path) -> str:
    return p.relative_to(PACKAGE.parent).as_posix()


# ------------------------------------------------------------------ (a) YAML


def test_every_yaml_call_in_the_package_is_safe():
    allowed = {"safe_load", "safe_dump", "YAMLError"}
    used = {}
    for p in SOURCES:
        for name in re.findall(r"\byaml\.(\w+)", _source(p)):
            used.setdefault(name, set()).add(_rel(p))
        assert not re.search(r"from\s+yaml\s+import|import\s+yaml\s+as", _source(p)), f"{_rel(p)}: aliased yaml import"
    assert used, "no yaml use found: is PACKAGE right?"
    unsafe = {k: v for k, v in used.items() if k not in allowed}
    assert not unsafe, f"yaml calls other than safe_load/safe_dump: {unsafe}"


EXPLOIT = 'encoder: !!python/object/apply:os.system ["touch {marker}"]\n'


def test_python_tag_in_extract_config_is_a_config_error(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "extract.yaml"
    p.write_text(EXPLOIT.format(marker=marker))
    with pytest.raises(ConfigError, match=r"cannot read config .*extract\.yaml: could not determine a constructor "
                                          r"for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"):
        load_yaml(p, ExtractConfig)
    assert not marker.exists()


def test_python_tag_in_recipe_is_a_config_error(tmp_path):
    from videolm.pretrain.recipe import load_recipe

    marker = tmp_path / "pwned"
    p = tmp_path / "recipe.yaml"
    p.write_text("train:\n  lr: !!python/object/new:os.system [\"touch " + str(marker) + "\"]\n")
    with pytest.raises(ConfigError, match=r"cannot read recipe .*recipe\.yaml: could not determine a constructor"):
        load_recipe(p)
    assert not marker.exists()


def test_python_tag_in_recipe_override_does_not_run(tmp_path):
    from videolm.pretrain.recipe import load_recipe

    marker = tmp_path / "pwned"
    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
    with pytest.raises((ConfigError, yaml.YAMLError)):
        load_recipe(recipe, [f'lr=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


def test_bad_yaml_in_recipe_override_is_a_config_error():
    from videolm.pretrain.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(recipe, ["lr=[unclosed"])
    with pytest.raises(ConfigError):  # a python tag in an override is refused by safe_load, not run
        load_recipe(recipe, ["lr=!!python/object/apply:os.system ['true']"])


@pytest.mark.parametrize("text, problem", [
    ("encoder: [unclosed\n", "cannot read config"),
    ("- just\n- a list\n", "expected a mapping"),
    ("encoder: pixels\nbogus: 1\n", "unknown key(s) bogus"),
])
def test_malformed_extract_config_is_a_config_error(tmp_path, text, problem):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_yaml(p, ExtractConfig)


def test_unreadable_extract_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(tmp_path / "missing.yaml", ExtractConfig)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(tmp_path / "bin.yaml", ExtractConfig)


# ------------------------------------------------------------------ (b) pickle


PICKLE_ALLOWED = {"videolm/manifests/importers/streamed.py"}


def test_pickle_is_used_only_by_the_howto100m_importer():
    # Loading, not naming: `except pickle.UnpicklingError` (checkpoint.py) is fine; np.load refuses pickles by
    # default; torch.load is checked in (c).
    pattern = re.compile(r"\b_?pickle\.(load|loads|Unpickler)\b|\bimport\s+(dill|joblib|marshal|shelve|cloudpickle)\b"
                         r"|allow_pickle\s*=\s*True|\bpd\.read_pickle\b")
    hits = {_rel(p) for p in SOURCES if pattern.search(_source(p))}
    assert hits <= PICKLE_ALLOWED, f"pickle-capable loads outside the importer: {sorted(hits - PICKLE_ALLOWED)}"


H5PY_IMPORT = re.compile(r"^\s*(import h5py\b|from h5py\b)", re.M)


def h5py_users() -> set[str]:
    return {_rel(p) for p in SOURCES if H5PY_IMPORT.search(_source(p))}


def test_only_the_feature_store_imports_h5py():
    users = h5py_users()
    assert users, "no module imports h5py: the scan is broken"
    outside = sorted(u for u in users if not u.startswith("videolm/features/"))
    assert not outside, f"h5py imported outside videolm/features/: {outside}"


def test_shard_and_codebook_metadata_are_json():
    # h5py never pickles; what is not an array is stored as a JSON string attribute.
    for rel in sorted(h5py_users()) + ["videolm/quantize/job.py"]:
        assert "pickle" not in _source(PACKAGE.parent / rel), rel
    for rel in ("features/shards.py", "features/hdf5.py", "quantize/job.py"):  # config keys, checksums, codebook attrs
        assert "json.dumps" in _source(PACKAGE / rel), rel


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["VIDEOLM_TEST_MARKER"],))


@pytest.mark.parametrize("name", ["caption.pickle", "caption.json"])  # detected by content as well as by name
def test_malicious_pickle_is_refused_without_trust_pickle(tmp_path, monkeypatch, name):
    # The benign case, and that --trust-pickle then loads it: tests/test_importers.py::test_howto100m_pickle_needs_trust
    from videolm.manifests.importers import ImporterError, run_import

    marker = tmp_path / "pwned"
    monkeypatch.setenv("VIDEOLM_TEST_MARKER", str(marker))
    src = tmp_path / name
    src.write_bytes(pickle.dumps({"v": _Boom()}, protocol=4))
    with pytest.raises(ImporterError, match="can run arbitrary code.*--trust-pickle"):
        run_import("howto100m", tmp_path / "m.jsonl", tmp_path, keep_missing=True, captions=src)
    assert not marker.exists()
    assert not (tmp_path / "m.jsonl").exists()


# ------------------------------------------------------------------ (c) torch.load


def torch_load_calls() -> list[tuple[str, int, object]]:
    """(file, line, weights_only value or 'MISSING') for every torch.load call in the package."""
    calls = []
    for p in SOURCES:
        for node in ast.walk(ast.parse(_source(p))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                value = kw.get("weights_only")
                calls.append((_rel(p), node.lineno,
                              "MISSING" if value is None else ast.literal_eval(value)
                              if isinstance(value, ast.Constant) else ast.unparse(value)))
    return calls


def test_every_torch_load_states_weights_only():
    calls = torch_load_calls()
    assert calls, "no torch.load found: is PACKAGE right?"
    assert all(w != "MISSING" for _, _, w in calls), [c for c in calls if c[2] == "MISSING"]
    unsafe = [c for c in calls if c[2] is not True]
    # checkpoint.py's trainer state (optimizer, RNG states) is the one exception, being moved to weights_only=True.
    assert all(f == "videolm/pretrain/checkpoint.py" for f, _, _ in unsafe), unsafe


# ------------------------------------------------------------------ (d) --root


def _manifest(folder: Path, *paths: str) -> Path:
    p = folder / "m.jsonl"
    p.write_text("".join(json.dumps({"video_id": f"v{i}", "path": path, "split": "train"}) + "\n"
                         for i, path in enumerate(paths)))
    return p


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "a.mp4").write_bytes(b"")
    (tmp_path / "secret.mp4").write_bytes(b"")
    return tmp_path, root


def test_paths_inside_root_are_accepted(tree):
    tmp, root = tree
    (root / "videos" / "inner_link.mp4").symlink_to(root / "videos" / "a.mp4")
    m = _manifest(root, "videos/a.mp4", str(root / "videos" / "a.mp4"), "videos/../videos/a.mp4",
                  "videos/inner_link.mp4", "videos/not_there_yet.mp4")
    entries = load_manifest(m, root=root)
    assert entries[0].path == str(root / "videos" / "a.mp4")  # relative: against the manifest's folder, as before
    assert len(entries) == 5
    assert load_manifest(m, root=str(root) + os.sep)  # trailing slash
    # the manifest itself may live outside the root, relative paths still resolve against its folder
    assert load_manifest(_manifest(tmp, "data/videos/a.mp4"), root=root)[0].path == str(root / "videos" / "a.mp4")


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink_file", "symlink_dir", "prefix_sibling"])
def test_paths_escaping_root_are_refused_on_their_line(tree, how):
    tmp, root = tree
    if how == "absolute":
        bad = str(tmp / "secret.mp4")
    elif how == "dotdot":
        bad = "videos/../../secret.mp4"
    elif how == "symlink_file":
        (root / "videos" / "link.mp4").symlink_to(tmp / "secret.mp4")
        bad = "videos/link.mp4"
    elif how == "symlink_dir":
        (root / "elsewhere").symlink_to(tmp, target_is_directory=True)
        bad = "elsewhere/secret.mp4"
    else:  # /x/data_evil is not inside /x/data although it starts with the same characters
        (tmp / "data_evil").mkdir()
        bad = "../data_evil/v.mp4"
    m = _manifest(root, "videos/a.mp4", bad)
    with pytest.raises(ManifestError) as err:
        load_manifest(m, root=root)
    assert err.value.line == 2
    msg = str(err.value)
    assert msg.startswith(f"{m}:2: path ") and "outside the allowed root" in msg and "(video_id 'v1')" in msg
    if how.startswith("symlink"):
        assert "resolves through a symlink to" in msg
    assert load_manifest(m)[1].video_id == "v1"  # without a root nothing changes


def test_root_applies_to_iter_manifest_and_must_be_a_directory(tree):
    tmp, root = tree
    m = _manifest(root, "/etc/passwd")
    with pytest.raises(ManifestError, match=r":1: path '/etc/passwd' resolves to '/etc/passwd', outside the allowed root"):
        list(iter_manifest(m, root=root))
    with pytest.raises(ManifestError, match="root .* is not a directory"):
        load_manifest(m, root=tmp / "secret.mp4")


def test_root_flag_on_the_command_line(tree, tmp_path, capsys):
    from videolm.cli import main

    tmp, root = tree
    m = _manifest(root, "videos/a.mp4", "videos/../../secret.mp4")
    for cmd in (["extract", "--manifest", str(m), "--out", str(tmp_path / "f")],
                ["pretrain", "--config", "pipelines/demo.yaml", "--features", str(tmp_path / "f"), "--manifest",
                 str(m), "--out", str(tmp_path / "r")],
                ["eval-retrieval", "--checkpoint", str(tmp_path / "r"), "--features", str(tmp_path / "f"),
                 "--manifest", str(m)]):
        assert main(cmd + ["--root", str(root)]) == 2
        assert "outside the allowed root" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()  # refused before anything was written
