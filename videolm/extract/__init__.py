"""Feature extraction: decode (decode.py) -> encode (encoders.py) -> HDF5 shards (shards.py), run by job.py."""
