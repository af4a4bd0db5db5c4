"""The model and its inputs: text encoder, video-text model, transformer layers, the one input pipeline."""
