"""videolm: one pipeline from raw videos to a text-to-video retrieval score."""

__version__ = "0.3.0"

__all__ = ["VideoTextModel", "__version__"]


def __getattr__(name: str):
    # Lazy: VideoTextModel's module imports torch, and `import videolm` (every CLI start) must stay cheap.
    if name == "VideoTextModel":
        from .model.pretrained import VideoTextModel

        return VideoTextModel
    raise AttributeError(f"module 'videolm' has no attribute {name!r}")
