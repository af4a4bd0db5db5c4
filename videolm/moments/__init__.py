"""Stage 6, moment retrieval (HERO's VR, SVMR, VCMR): IoU and span decoding, TVR's metrics, the eval job."""
