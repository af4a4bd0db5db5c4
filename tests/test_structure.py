"""The code's shape rules that a reader relies on: one error base, short functions, stage packages.

These read the package (import or parse it); they fail when a change breaks a rule,
naming the offending class, function or module.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import videolm
from videolm.errors import VideolmError

PACKAGE = Path(videolm.__file__).parent
MAX_FUNCTION_LINES = 80
STAGES = ("manifests", "extract", "features", "quantize", "model", "pretrain", "retrieval")


def all_modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="videolm."):
        if not info.name.endswith(".__main__"):  # importing one runs the CLI
            yield importlib.import_module(info.name)


def test_every_videolm_error_derives_from_the_one_base():
    errors = {}
    for module in all_modules():
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__
                    and name.endswith("Error") and not name.startswith("_")):
                errors[f"{module.__name__}.{name}"] = obj
    assert len(errors) >= 10, sorted(errors)  # every stage has one
    stray = sorted(n for n, cls in errors.items() if not issubclass(cls, VideolmError))
    assert not stray, f"derive these from videolm.errors.VideolmError so the CLI reports them: {stray}"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_tree_reads_like_the_pipeline():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert set(STAGES) <= packages, set(STAGES) - packages
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    # outside the stage packages only the entry points and what every stage shares
    assert loose == ["__init__.py", "__main__.py", "config.py", "errors.py"], loose
    assert (PACKAGE / "cli" / "__init__.py").is_file()  # the command line: one module per group of stages
