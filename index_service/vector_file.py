"""An IVF-SQ8 index's vectors as float16, in a file on the index service's disk, one row per FAISS id.

IVF-SQ8 keeps each vector in memory as one byte per dimension, and 8-bit codes cannot order a crowded collection's
nearest neighbours: at 5M real-grown vectors a query's 10th and 11th neighbours differ by about a dot product's
error on the codes, and recall@10 stayed at 0.92 however many lists were probed. Re-ranking the codes' best few
dozen with float16 copies brought a crowded 480k set from 0.94 to 0.999 (bench/README.md, "Recall at 5M"). Those
copies are twice the codes' bytes (12.8 GB at 5M x 1280), so they stay on disk: rows are written with ``pwrite``
and read with ``pread``, never memory-mapped, so they live in the page cache and never count in the process's
resident size.

The file is anonymous (unlinked from the start: gone when the index is closed or the process ends). It is not
durable state: a restart rebuilds it from the snapshot, which stores an IVF-SQ8 index's vectors as float16 for it
(``snapshots.py``). FAISS ids are never reused, so a row, once written, never changes; a removed object's row
stays as a hole until the next restart renumbers the index.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import numpy as np


class VectorFile:
    def __init__(self, dim: int, folder: Path | None = None) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self._file = tempfile.TemporaryFile(dir=folder)
        weakref.finalize(self, self._file.close)  # closed once dropped (searches may still hold a retired index)
        self._row = 2 * dim  # bytes per float16 row

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors`` (one row per id; ids distinct), one ``pwrite`` per run of consecutive ids."""
        order = np.argsort(ids)
        ids, rows = ids[order], np.ascontiguousarray(vectors[order], np.float16)
        for lo, hi in _runs(ids):
            if os.pwrite(self._file.fileno(), rows[lo:hi].data, int(ids[lo]) * self._row) != (hi - lo) * self._row:
                raise OSError(f"the vector file took part of FAISS ids {ids[lo]}..{ids[hi - 1]} (disk full?)")

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The vectors at ``ids`` as float32 (any order, repeats allowed), one ``pread`` per run of consecutive ids."""
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.empty((len(unique), self.dim), np.float16)
        for lo, hi in _runs(unique):
            if os.preadv(self._file.fileno(), [rows[lo:hi].data], int(unique[lo]) * self._row) != (hi - lo) * self._row:
                raise RuntimeError(f"the vector file holds no rows for FAISS ids {unique[lo]}..{unique[hi - 1]}")
        return rows[inverse.reshape(-1)].astype(np.float32)


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """The (start, stop) positions of the runs of consecutive values in the sorted ``ids``."""
    bounds = [0, *(np.flatnonzero(np.diff(ids) != 1) + 1).tolist(), len(ids)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
