"""``videolm demo``: the main job on the embedded default, end to end (``run``), scored on the test split
(``evaluate``) and printed as three tables (``tables``)."""

from .run import run_demo

__all__ = ["run_demo"]
