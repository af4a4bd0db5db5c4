"""The documentation's commands are checked against the code, so the docs cannot rot.

* Every command of a fenced ``sh`` / ``bash`` / ``shell`` block in README.md,
  docs/*.md and data_manifests/README.md whose program is videolm (``videolm``,
  ``.venv/bin/videolm``, ``python -m videolm``, ``torchrun ... -m videolm.cli``)
  is parsed by the real parser, ``videolm.cli.build_parser()``. A recipe given with
  ``--config pipelines/X.yaml`` is loaded with the command's ``key=value``
  overrides, an extraction config is built as ``videolm extract`` builds it, and
  torchrun's own flags go through torchrun's parser.
* Shorthand lines (an argument ``...`` or a ``[--flag X]`` synopsis) cannot be
  parsed whole; every ``--flag`` on them must still be a flag of that subcommand.
* ``yaml`` blocks that are recipes, extraction configs or Kubernetes Jobs are
  loaded the way videolm (or the Job's command) would load them.
* The quickstart's "your own videos" block, found by its marker comment, is run
  for real on a dozen generated videos, with the small substitutions listed in
  ``QUICKSTART_SUBSTITUTIONS`` to make it take seconds instead of hours.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data_manifests" / "README.md"]
SHELL_LANGS = {"sh", "bash", "shell"}
VIDEOLM_MODULES = {"videolm", "videolm.cli"}
LAUNCHERS = {"srun", "exec", "time", "nohup", "env"}  # run the command that follows them
SEPARATORS = {"&&", "||", "|", ";"}
# A shell variable in a fully parsed videolm command (e.g. --node-rank $SLURM_ARRAY_TASK_ID)
# is replaced by this value before parsing.
SHELL_VARIABLE_VALUE = "0"

QUICKSTART_MARKER = "quickstart-own-videos"
# Applied, in this order, to each command of the quickstart block before it runs: the
# block is written for a real dataset; these make it finish in seconds on 12 tiny videos.
QUICKSTART_SUBSTITUTIONS = {
    "max_steps=2000": "max_steps=3 threads=1 num_workers=0 batch_size=4 model.text_layers=1",
}


# --------------------------------------------------------------------------- reading the docs


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # line of the first content line
    lang: str
    lines: tuple[str, ...]
    marker: str | None  # name in a `<!-- doc-test: NAME -->` comment just above the fence


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"<!--\s*doc-test:\s*([\w.-]+)\s*-->")


def read_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(text):
        m = _FENCE.match(text[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        marker = None
        j = i - 1
        while j >= 0 and not text[j].strip():
            j -= 1
        if j >= 0 and _MARKER.search(text[j]):
            marker = _MARKER.search(text[j]).group(1)
        body, k = [], i + 1
        while k < len(text) and not text[k].strip().startswith(fence[0] * len(fence)):
            line = text[k]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            k += 1
        blocks.append(Block(str(path.relative_to(ROOT)), i + 2, lang, tuple(body), marker))
        i = k + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for p in DOC_FILES if p.exists() for b in read_blocks(p)]


def block_commands(block: Block) -> list[tuple[int, str]]:
    """(line number, command) for each command of a shell block: continuation lines
    joined, comments stripped, split at && || | ;"""
    out, pending, first = [], "", None
    for offset, raw in enumerate(block.lines):
        if first is None:
            first = block.line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        joined, pending = pending + raw, ""
        try:
            tokens = shlex.split(joined, comments=True)
        except ValueError as exc:  # unbalanced quotes: a broken command if it runs videolm
            if "videolm" in joined:
                out.append((first, f"<unparseable: {exc}> {joined.strip()}"))
            first = None
            continue
        part: list[str] = []
        for tok in _drop_redirections(tokens) + [";"]:
            if tok in SEPARATORS or tok == "&" or tok.endswith(";"):
                if tok.endswith(";") and tok != ";":
                    part.append(tok[:-1])
                if part:
                    out.append((first, shlex.join(part)))
                part = []
            else:
                part.append(tok)
        first = None
    return out


_REDIRECT = re.compile(r"^\d*(>>?|<)$")  # the target is the next token
_REDIRECT_WITH_TARGET = re.compile(r"^(\d*>>?|<|&>|\d*>&)\S+$")  # 2>&1, >out.log


def _drop_redirections(tokens: list[str]) -> list[str]:
    out, skip = [], False
    for tok in tokens:
        if skip:
            skip = False
        elif _REDIRECT.match(tok):
            skip = True
        elif not _REDIRECT_WITH_TARGET.match(tok):
            out.append(tok)
    return out


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # the command as written (joined, without comments)
    launcher: tuple[str, ...]  # what came before videolm's argv (torchrun and its flags, ...)
    argv: tuple[str, ...]  # videolm's own arguments

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"

    @property
    def shorthand(self) -> bool:
        return any(t == "..." or "..." in t or t.startswith("[") or t.endswith("]") for t in self.argv)


def videolm_argv(tokens: list[str]) -> tuple[list[str], list[str]] | None:
    """(launcher, argv) when the command runs videolm, else None."""
    i = 0
    while i < len(tokens) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[i]):
        i += 1  # VAR=value prefixes
    tokens = tokens[i:]
    if not tokens:
        return None
    prog = os.path.basename(tokens[0])
    if prog == "videolm":
        return [], tokens[1:]
    if prog in LAUNCHERS:
        rest = tokens[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        found = videolm_argv(rest)
        return None if found is None else ([tokens[0], *found[0]], found[1])
    if prog.startswith("python") or prog == "torchrun":
        for j in range(1, len(tokens) - 1):
            if tokens[j] == "-m" and tokens[j + 1] in VIDEOLM_MODULES:
                return tokens[: j + 2], tokens[j + 2 :]
    return None


def collect_commands() -> list[Command]:
    commands = []
    for block in all_blocks():
        if block.lang not in SHELL_LANGS:
            continue
        for line, text in block_commands(block):
            if text.startswith("<unparseable"):
                commands.append(Command(block.doc, line, text, (), ("<unparseable>",)))
                continue
            found = videolm_argv(shlex.split(text))
            if found is not None:
                commands.append(Command(block.doc, line, text, tuple(found[0]), tuple(found[1])))
    return commands


COMMANDS = collect_commands()


def _ids(commands: list[Command]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for c in commands:
        base = f"{c.doc}:{c.line}:{' '.join(c.argv[:2])}"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return ids


# --------------------------------------------------------------------------- parsing commands


def _parse(argv: list[str], where: str):
    from videolm.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help / --version
            return None
        pytest.fail(f"{where}\n  videolm's parser rejects it: {err.getvalue().strip().splitlines()[-1]}",
                    pytrace=False)


def _subparser(name: str):
    from videolm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices.get(name)


def _check_shorthand(cmd: Command) -> None:
    """`videolm extract ... --encoder s3d` or a `[--flag X]` synopsis: the subcommand
    (and, for `import`, the format) must exist and every --flag must belong to it."""
    words = [t.strip("[]") for t in cmd.argv]
    if not words or words[0].startswith("-"):
        return
    parser = _subparser(words[0])
    assert parser is not None, f"{cmd.where}\n  no subcommand {words[0]!r}"
    rest = words[1:]
    if words[0] == "import" and rest and not rest[0].startswith("-"):
        formats = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        assert rest[0] in formats.choices, f"{cmd.where}\n  no import format {rest[0]!r}"
        parser = formats.choices[rest[0]]
    known = set(parser._option_string_actions)
    for w in rest:
        if w.startswith("--"):
            flag = w.split("=", 1)[0]
            assert flag in known, f"{cmd.where}\n  {flag} is not a flag of `videolm {words[0]}`"


def _check_torchrun(cmd: Command) -> None:
    launcher = list(cmd.launcher)
    if "torchrun" in [os.path.basename(t) for t in launcher]:
        start = [os.path.basename(t) for t in launcher].index("torchrun") + 1
    elif "torch.distributed.run" in launcher:
        start = launcher.index("torch.distributed.run") + 1
    else:
        return
    from torch.distributed.run import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = get_args_parser().parse_args(launcher[start:] + list(cmd.argv))
    except SystemExit:
        pytest.fail(f"{cmd.where}\n  torchrun's parser rejects it: {err.getvalue().strip().splitlines()[-1]}",
                    pytrace=False)
    assert args.module and args.training_script in VIDEOLM_MODULES, cmd.where


def _check_sampling(cfg) -> None:
    """The sampling the job would resolve, for encoders whose defaults need no weights."""
    from videolm.extract.encoders import PixelsEncoder
    from videolm.extract.s3d import S3DEncoder

    defaults = {"pixels": PixelsEncoder.default_sampling, "s3d": S3DEncoder.default_sampling}
    if cfg.encoder in defaults:
        cfg.resolve_sampling(defaults[cfg.encoder])


def _check_configs(cmd: Command, args) -> None:
    """Recipes with their overrides, and extraction configs with their flags, load."""
    from videolm.errors import ConfigError

    try:
        if args.command == "pretrain" and args.config and args.config.startswith("pipelines/"):
            from videolm.pretrain.recipe import load_recipe

            overrides = list(args.overrides) + ([f"model.text_init={args.text_init}"] if args.text_init else [])
            load_recipe(ROOT / args.config, overrides)
        elif args.command == "demo" and args.overrides:
            from videolm.pretrain.recipe import load_recipe

            load_recipe(ROOT / "pipelines" / "demo.yaml", list(args.overrides))
        elif args.command == "extract":
            from videolm.cli import _EXTRACT_FLAGS
            from videolm.extract.config import ExtractConfig
            from videolm.config import from_dict, load_yaml, to_dict

            base = ExtractConfig()
            if args.config and args.config.startswith("pipelines/"):
                base = load_yaml(ROOT / args.config, ExtractConfig)
            flags = {k: getattr(args, k) for k in _EXTRACT_FLAGS if getattr(args, k) is not None}
            cfg = from_dict(ExtractConfig, {**to_dict(base), **flags})
            _check_sampling(cfg)
            assert 0 <= args.node_rank < args.num_nodes, (
                f"{cmd.where}\n  --node-rank {args.node_rank} is outside [0, {args.num_nodes})")
    except (ConfigError, OSError) as exc:
        pytest.fail(f"{cmd.where}\n  {exc}", pytrace=False)


def test_docs_have_videolm_commands():
    docs = {c.doc for c in COMMANDS}
    assert len(COMMANDS) > 50, "the doc collector found suspiciously few videolm commands"
    for name in ("README.md", "docs/cli.md", "docs/quickstart.md", "docs/scaling.md", "docs/pretraining.md"):
        assert name in docs, f"no videolm command found in {name}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command_parses(cmd: Command):
    assert cmd.argv != ("<unparseable>",), cmd.where
    _check_torchrun(cmd)
    if cmd.shorthand:
        _check_shorthand(cmd)
        return
    argv = [re.sub(r"\$\{?\w+\}?", SHELL_VARIABLE_VALUE, t) for t in cmd.argv]
    args = _parse(argv, cmd.where)
    if args is None:
        return
    assert getattr(args, "command", None), f"{cmd.where}\n  no subcommand"
    _check_configs(cmd, args)


# --------------------------------------------------------------------------- YAML blocks


def _yaml_blocks():
    out = []
    for block in all_blocks():
        if block.lang not in ("yaml", "yml"):
            continue
        try:
            docs = [d for d in yaml.safe_load_all("\n".join(block.lines)) if d is not None]
        except yaml.YAMLError as exc:
            out.append(pytest.param(block, None, id=f"{block.doc}:{block.line}", marks=pytest.mark.xfail(
                reason=f"invalid YAML: {exc}", strict=True)))
            continue
        for i, doc in enumerate(docs):
            out.append(pytest.param(block, doc, id=f"{block.doc}:{block.line}" + (f"#{i}" if i else "")))
    return out


@pytest.mark.parametrize("block, doc", _yaml_blocks())
def test_documented_yaml_loads(block: Block, doc):
    where = f"{block.doc}:{block.line}"
    assert doc is not None, f"{where}: invalid YAML"
    if not isinstance(doc, dict):
        return
    from videolm.errors import ConfigError
    from videolm.extract.config import ExtractConfig
    from videolm.config import from_dict

    try:
        if doc.get("kind") == "Job":
            _check_job(block, doc)
        elif block.marker == "extract-config" or "encoder" in doc:
            _check_sampling(from_dict(ExtractConfig, doc))
        elif "objectives" in doc or "stages" in doc:
            from videolm.pretrain.recipe import recipe_from_dict

            recipe_from_dict(doc)
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc}", pytrace=False)


def _check_job(block: Block, doc: dict) -> None:
    """A Kubernetes indexed Job running `videolm extract --num-nodes N` with N completions."""
    where = f"{block.doc}:{block.line}"
    spec = doc["spec"]
    assert spec.get("completionMode") == "Indexed", f"{where}: completionMode must be Indexed"
    ran = 0
    for container in spec["template"]["spec"]["containers"]:
        tokens = [str(t) for t in container.get("command", []) + container.get("args", [])]
        found = videolm_argv(tokens)
        if found is None:
            continue
        cmd = Command(block.doc, block.line, shlex.join(tokens), tuple(found[0]), tuple(found[1]))
        args = _parse(list(cmd.argv), cmd.where)
        ran += 1
        if args.command == "extract":
            assert args.num_nodes == spec["completions"], (
                f"{where}: --num-nodes {args.num_nodes} but the Job has {spec['completions']} completions")
            _check_configs(cmd, args)
    assert ran, f"{where}: no container of the Job runs videolm"


def test_slurm_array_matches_num_nodes():
    blocks = [b for b in all_blocks() if b.marker == "slurm-extract"]
    assert blocks, "docs/scaling.md lost its <!-- doc-test: slurm-extract --> sbatch script"
    for block in blocks:
        text = "\n".join(block.lines)
        array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", text, re.M)
        assert array and array.group(1) == "0", f"{block.doc}:{block.line}: the array must start at task 0"
        nodes = re.search(r"--num-nodes[ =](\d+)", text)
        assert nodes, f"{block.doc}:{block.line}: no --num-nodes"
        assert int(array.group(2)) + 1 == int(nodes.group(1)), (
            f"{block.doc}:{block.line}: --array=0-{array.group(2)} but --num-nodes {nodes.group(1)}")


# --------------------------------------------------------------------------- the quickstart, run for real


def _marked_block(name: str) -> Block:
    found = [b for b in all_blocks() if b.marker == name]
    assert len(found) == 1, f"expected one block marked <!-- doc-test: {name} -->, found {len(found)}"
    return found[0]


def _write_own_videos(work: Path) -> None:
    """my_videos/<id>.mp4 and my_captions.csv (video_id, caption, start, end, split), as the quickstart expects."""
    from videolm.manifests.manifest import load_manifest
    from videolm.manifests.synthetic import synthesize

    videos = work / "my_videos"
    videos.mkdir()
    rows = []
    for split, n, seed in (("train", 8, 0), ("test", 4, 1)):
        manifest = synthesize(work / "synth" / split, n, seed, split=split, progress=False)
        for e in load_manifest(manifest):
            shutil.move(e.path, videos / f"{e.video_id}.mp4")
            rows += [{"video_id": e.video_id, "caption": c.text, "start": c.start, "end": c.end, "split": split}
                     for c in e.captions]
    shutil.rmtree(work / "synth")
    with open(work / "my_captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["video_id", "caption", "start", "end", "split"])
        writer.writeheader()
        writer.writerows(rows)


def test_quickstart_own_videos_block_runs(tmp_path):
    block = _marked_block(QUICKSTART_MARKER)
    commands = [text for _, text in block_commands(block)]
    used = set()
    runs = []
    for text in commands:
        for old, new in QUICKSTART_SUBSTITUTIONS.items():
            if old in text:
                text, _ = text.replace(old, new), used.add(old)
        found = videolm_argv(shlex.split(text))
        assert found is not None and not found[0], f"{block.doc}: not a plain videolm command: {text}"
        runs.append((text, found[1]))
    assert used == set(QUICKSTART_SUBSTITUTIONS), (
        f"substitutions no longer match the block: {sorted(set(QUICKSTART_SUBSTITUTIONS) - used)}")

    _write_own_videos(tmp_path)
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")  # the docs run from the checkout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for text, argv in runs:
        proc = subprocess.run([sys.executable, "-m", "videolm", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f"{block.doc}: `{text}` exited {proc.returncode}\n"
                                      f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")

    from videolm.manifests.manifest import load_manifest

    entries = load_manifest(tmp_path / "my_manifest.jsonl")
    assert len(entries) == 12 and sum(e.split == "test" for e in entries) == 4
    assert (tmp_path / "features" / "shard_00000.h5").exists() and (tmp_path / "features" / "codebook.h5").exists()
    assert (tmp_path / "runs" / "mine" / "checkpoints" / "latest").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "test" and report["n_videos"] == 4 and report["model"]["step"] == 3
