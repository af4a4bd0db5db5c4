"""Helpers the subcommands share: exit codes, --root checks, recipe loading, node rank."""

from __future__ import annotations

import os
from pathlib import Path
from ..errors import ConfigError


EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


def check_root(args) -> None:
    """--root: read the manifest once; a video path outside the folder is a ManifestError naming its line."""
    if getattr(args, "root", None):
        from ..manifests.manifest import load_manifest

        load_manifest(args.manifest, root=args.root)


def default_rank() -> int:
    for var in ("VIDEOLM_NODE_RANK", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def recipe_for(args, extra: list[str] = ()):
    """The recipe of a pretrain/finetune command: --config, or on --resume the run's own, with overrides."""
    from ..pretrain.checkpoint import latest_checkpoint
    from ..pretrain.recipe import load_recipe

    config = args.config
    if config is None:
        ckpt = latest_checkpoint(args.out) if args.resume and Path(args.out).exists() else None
        if ckpt is None:
            raise ConfigError("--config is required (no checkpoint to resume from in --out)")
        config = ckpt / "config.yaml"
    return load_recipe(config, list(args.overrides) + list(extra))
