"""One generation of the index: a FAISS inner-product index over L2-normalised vectors, plus per-object state.

Semantics (DESIGN.md, "Index semantics"): one vector per (bucket, key); a re-upload replaces; a delete
removes and leaves a tombstone with its order; an entry older than what the index holds is discarded.
All mutation happens in ``apply`` under one lock, so a search never sees a half-applied batch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Iterable

import faiss
import numpy as np

from bucketlens.schemas import ResultEntry, object_id

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Indexed:
    """What the index holds for one object."""

    bucket: str
    key: str
    etag: str
    sequencer: str
    order: int
    generation: int


@dataclasses.dataclass
class ApplyStats:
    upserted: int = 0
    deleted: int = 0
    stale: int = 0
    rejected: int = 0


class VectorIndex:
    def __init__(self, model: str, dim: int, generation: int = 1) -> None:
        self.model = model
        self.dim = dim
        self.generation = generation
        self.index_type = "Flat"
        # IDMap2 keeps the id -> vector mapping so a search by key can reconstruct the stored vector.
        self._faiss = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ids: dict[str, int] = {}
        self._objects: dict[int, Indexed] = {}
        self._tombstones: dict[str, tuple[int, float]] = {}  # object id -> (order, time of delete)
        self._next_id = 1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def apply(self, entries: Iterable[ResultEntry]) -> ApplyStats:
        """Apply a batch atomically with respect to searches."""
        stats = ApplyStats()
        with self._lock:
            for entry in entries:
                self._apply_one(entry, stats)
        return stats

    def _apply_one(self, entry: ResultEntry, stats: ApplyStats) -> None:
        oid = object_id(entry.bucket, entry.key)
        current_id = self._ids.get(oid)
        current = self._objects.get(current_id) if current_id is not None else None
        if current is not None and current.order > entry.order:
            stats.stale += 1
            return
        if entry.op == "delete":
            if current_id is not None:
                self._remove(oid, current_id)
            tombstone = self._tombstones.get(oid)
            if tombstone is None or tombstone[0] < entry.order:
                self._tombstones[oid] = (entry.order, time.time())
            stats.deleted += 1
            return
        tombstone = self._tombstones.get(oid)
        if tombstone is not None and tombstone[0] >= entry.order:
            stats.stale += 1  # an older version arriving after the delete must not resurrect the object
            return
        if entry.vector is None or entry.vector.shape != (self.dim,) or entry.model != self.model:
            log.error("rejecting %s: model %r dim %s does not match index %r dim %d",
                      oid, entry.model, None if entry.vector is None else entry.vector.shape, self.model, self.dim)
            stats.rejected += 1
            return
        if current_id is not None:
            self._remove(oid, current_id)
        new_id = self._next_id
        self._next_id += 1
        self._faiss.add_with_ids(entry.vector.reshape(1, -1).astype(np.float32), np.array([new_id], dtype=np.int64))
        self._ids[oid] = new_id
        self._objects[new_id] = Indexed(entry.bucket, entry.key, entry.etag, entry.sequencer, entry.order,
                                        entry.generation)
        self._tombstones.pop(oid, None)
        stats.upserted += 1

    def _remove(self, oid: str, faiss_id: int) -> None:
        self._faiss.remove_ids(np.array([faiss_id], dtype=np.int64))
        del self._ids[oid]
        del self._objects[faiss_id]

    def get(self, bucket: str, key: str) -> Indexed | None:
        faiss_id = self._ids.get(object_id(bucket, key))
        return None if faiss_id is None else self._objects.get(faiss_id)

    def vector(self, bucket: str, key: str) -> np.ndarray | None:
        with self._lock:
            faiss_id = self._ids.get(object_id(bucket, key))
            return None if faiss_id is None else self._faiss.reconstruct(faiss_id)

    def search(self, query: np.ndarray, k: int, exclude: str | None = None) -> list[tuple[Indexed, float]]:
        """The ``k`` nearest objects to one normalised query vector, best first."""
        assert query.shape == (self.dim,), f"query has shape {query.shape}, index dim is {self.dim}"
        with self._lock:
            n = len(self._ids)
            if n == 0:
                return []
            want = min(n, k + (1 if exclude else 0))
            scores, ids = self._faiss.search(query.reshape(1, -1).astype(np.float32), want)
            hits = [(self._objects[i], float(s)) for s, i in zip(scores[0], ids[0]) if i in self._objects]
        if exclude:
            hits = [(obj, s) for obj, s in hits if object_id(obj.bucket, obj.key) != exclude]
        return hits[:k]
