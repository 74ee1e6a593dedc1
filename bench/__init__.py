"""``python -m bench``: how fast bucketlens is on the local stack, against the in-process limit and the old design."""
