"""The model, shared by the workers (which embed objects) and the index service (which embeds query images and
verifies candidates): model recipes (``models``), decode, the descriptor network and its runtimes (``embedders``),
and local features for spatial verification. Imports nothing from the services."""
