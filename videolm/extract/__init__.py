"""Stage 2, feature extraction: decode -> encode -> feature shards (features/), run by job.py."""
