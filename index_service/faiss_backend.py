"""The embedded backend: each generation a FAISS index in this process (``vector_index.py``), made durable by
snapshots (``snapshots.py``: vectors, objects, tombstones and the last applied stream id in one file)."""

from __future__ import annotations

from typing import Any, Callable

from bucketlens.settings import Settings
from vision.models import dims, recipe

from .backend import Index
from .feature_store import FeatureStore
from .snapshots import SnapshotStore, local_folder
from .vector_index import FAISS_TYPES, VectorIndex, set_search_threads


class FaissBackend:
    name = "faiss"
    shared = False  # each process holds its own copy
    index_types: tuple[str, ...] = FAISS_TYPES

    def __init__(self, settings: Settings, features: Callable[[int], FeatureStore], s3: Any = None) -> None:
        self.approximate = settings.faiss_index_type
        set_search_threads(settings.faiss_threads)
        self.features = features
        # S3 copies per namespace: two deployments on one bucket pruned each other's, and a fresh disk loaded the
        # other's index. Copies from before, directly under ``snapshots/``, are still read (never pruned).
        shared = f"{settings.reserved_prefix}snapshots/"
        self.snapshots = SnapshotStore(
            local_folder(settings.home, settings.namespace), settings.snapshots_kept,
            s3 if settings.snapshot_s3 else None, settings.bucket, f"{shared}{settings.namespace}/", older=shared,
        )
        self.last: dict[str, Any] | None = None

    def load(self) -> tuple[Index, str] | None:
        loaded = self.snapshots.load_newest(dims(), self.features)
        self.last = self.snapshots.last
        return loaded

    def drop_abandoned(self, serving: Index) -> list[str]:
        return []  # a FAISS shadow generation lived in the process that built it

    def new_generation(self, model: str, generation: int) -> Index:
        return VectorIndex(model, recipe(model).dim, generation, self.features(generation))

    def checkpoint(self, index: Index, last_id: str) -> None:
        assert isinstance(index, VectorIndex), f"the FAISS backend snapshots its own generations, not {index!r}"
        self.snapshots.write(index, last_id)
        self.last = self.snapshots.last

    def promote(self, old: Index, new: Index) -> None:
        pass  # until the new generation's first snapshot, a restart restores the old one, with its feature store

    def moved_from(self, current: Index) -> Index | None:
        return None  # a FAISS index is its process's own: no other process moves it

    def stopped_writing(self, index: Index) -> None:
        pass  # a FAISS index is this process's own: what it holds is what it wrote

    def retire(self, old: Index) -> None:
        old.features.close(remove=True)  # searches hold the generation they started with; they verify without it

    def discard(self, index: Index) -> None:
        index.features.close(remove=True)

    def problem(self) -> str | None:
        return None  # the index is in this process

    def close(self) -> None:
        pass
