"""Stage 3, visual words: k-means codebooks over the shards (kmeans.py) and the quantize job (job.py)."""
