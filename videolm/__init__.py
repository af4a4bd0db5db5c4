"""videolm: one pipeline from raw videos to a text-to-video retrieval score."""

__version__ = "0.3.0"
