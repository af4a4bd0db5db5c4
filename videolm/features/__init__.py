"""The feature store: every file of a feature directory and its checks; the only h5py user."""
