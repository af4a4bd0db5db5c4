"""The errors every stage raises, under one base the command line catches.

Each stage defines its own error next to the code that raises it (``ManifestError``,
``ShardError``, ``QuantizeError``, ...) and derives it from ``VideolmError``; the
CLI prints any ``VideolmError`` as one line and exits 2, so a new stage needs no
change there. ``ConfigError`` and ``TrainError`` live here because several stages
(and the torch-free CLI) raise or catch them.

Stage errors also derive from ``ValueError`` (bad input) or ``RuntimeError``
(work that cannot go on), so callers written against the built-ins keep working.
"""

from __future__ import annotations


class VideolmError(Exception):
    """Base of every error videolm raises on purpose; the message says what and where."""


class ConfigError(VideolmError, ValueError):
    """A config, recipe, flag or override that cannot be used as given."""


class TrainError(VideolmError, RuntimeError):
    """A training run that cannot go on (too little data for a batch, non-finite losses)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit or preemption) turned into an exception.

    Pretraining installs the handler that raises it. A ``KeyboardInterrupt``
    subclass on purpose: every handler that saves work on Ctrl-C (pretraining's
    checkpoint) does the same on SIGTERM, and the CLI tells the two apart by type
    (exit 143, not 130).
    """

    def __init__(self, signal_name: str = "SIGTERM"):
        super().__init__(signal_name)
        self.signal_name = signal_name
