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
(``snapshots.py``). FAISS ids are never reused, so a row, once written, never changes. A removed object's row
stays in place until the next restart renumbers the index, but the disk under it is handed back as soon as every
row sharing a filesystem block with it is removed too (``release``): re-uploading a library does not double the
file's footprint.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np


class VectorFile:
    def __init__(self, dim: int, folder: Path | None = None) -> None:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self._file = tempfile.TemporaryFile(dir=folder)
        weakref.finalize(self, self._file.close)  # closed once dropped (searches may still hold a retired index)
        self._row = 2 * dim  # bytes per float16 row
        self._block = os.fstat(self._file.fileno()).st_blksize
        self._dead = np.zeros(0, np.int32)  # filesystem block -> bytes of removed rows in it

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

    def release(self, ids: np.ndarray) -> None:
        """The rows at ``ids`` (distinct, each released once) are never read again: hand back to the filesystem each
        block that now holds only released rows (a hole reads as zeros). Rows of 2.5 KB share 4 KB blocks, so a
        block goes once all its rows have; one ``fallocate`` per run of such blocks."""
        if not len(ids):
            return
        starts = ids.astype(np.int64) * self._row
        ends = starts + self._row
        first, last = starts // self._block, (ends - 1) // self._block
        if int(last.max()) >= len(self._dead):
            grown = max(int(last.max()) + 1, 2 * len(self._dead))
            self._dead = np.concatenate([self._dead, np.zeros(grown - len(self._dead), np.int32)])
        touched = []
        for step in range(int((last - first).max()) + 1):  # each row's first, second, ... block
            on = first + step <= last
            blocks = first[on] + step
            overlap = np.minimum(ends[on], (blocks + 1) * self._block) - np.maximum(starts[on], blocks * self._block)
            np.add.at(self._dead, blocks, overlap.astype(np.int32))
            touched.append(blocks)
        emptied = np.unique(np.concatenate(touched))
        emptied = emptied[self._dead[emptied] >= self._block]
        for lo, hi in _runs(emptied):
            _punch(self._file.fileno(), int(emptied[lo]) * self._block, (hi - lo) * self._block)

    def disk_bytes(self) -> int:
        """What the file takes on disk now (its holes excluded)."""
        return os.fstat(self._file.fileno()).st_blocks * 512


@functools.cache
def _fallocate() -> Any:
    function = ctypes.CDLL("libc.so.6", use_errno=True).fallocate
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return function


def _punch(fd: int, offset: int, length: int) -> None:
    """Hand a byte range of a file back to the filesystem, keeping its size; where that cannot be done (a filesystem
    without hole punching), the range keeps its blocks: it is only space."""
    with contextlib.suppress(OSError, AttributeError):
        _fallocate()(fd, 0x01 | 0x02, offset, length)  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """The (start, stop) positions of the runs of consecutive values in the sorted ``ids``."""
    bounds = [0, *(np.flatnonzero(np.diff(ids) != 1) + 1).tolist(), len(ids)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
