"""Stage 1, manifests: the JSONL manifest, importers for public formats, the synthetic default data."""
