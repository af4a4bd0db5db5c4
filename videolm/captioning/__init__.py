"""Caption generation (greedy, beam search) with the two_stream decoder, the COCO caption metrics, reports."""
