"""Stage 5, retrieval evaluation: queries, encoding, search, metrics, re-ranking, reports, comparison, baselines."""
