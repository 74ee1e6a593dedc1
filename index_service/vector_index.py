"""The FAISS backend's generation (``backend.Index``): a FAISS inner-product index over L2-normalised vectors,
plus per-object state.

Semantics (DESIGN.md, "Index semantics"): one vector per (bucket, key); a re-upload replaces; a delete
removes and leaves a tombstone with its order; an entry older than what the index holds is discarded.
All mutation happens under one lock, batch by batch, so a search never sees a half-applied batch; a batch's
removes and adds reach FAISS in one call each (``_flush``): one vector at a time, an IVF add costs ~6x as much
(each assigns its list alone) and a Flat remove compacts the whole array every time (~50 ms at 50,000 vectors).

Structures: ``Flat`` (exact scan; ``IndexIDMap2`` keeps id -> vector) or ``IVF`` (``IndexIVFFlat`` with a
hashtable direct map, so ``remove_ids`` and ``reconstruct`` work and deletes take effect at once).
An IVF-SQ8 index also keeps each vector as float16 in a file on disk (``vector_file.py``), and orders the codes'
best few dozen per query by them: the codes alone lose recall in a crowded collection.

``restructure`` swaps one for the other while merges and searches continue: the vectors move into the new structure
a chunk at a time, and the old one hands back each chunk's memory as it goes (``Moving``).

Beside the vectors, for filters and text search (``filters.py``, ``text.py``): the object ids in sorted order (a
prefix is a range), each object's modification time in an array indexed by FAISS id, and each label's postings
(FAISS id -> probability).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import heapq
import logging
import math
import mmap
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np
from sortedcontainers import SortedList

from bucketlens.schemas import ResultEntry, object_id
from bucketlens.settings import INDEX_TYPES

from .backend import ApplyStats, Indexed, SearchOne, Tombstones, indexed, nearest, tombstone_after, verdict
from .feature_store import FeatureStore
from .filters import Filter
from .vector_file import VectorFile

log = logging.getLogger(__name__)


def ivf_lists(n: int) -> int:
    """Number of inverted lists for ``n`` vectors: ~4 sqrt(n), never more lists than vectors."""
    return int(max(1, min(65536, n, 4 * math.sqrt(max(n, 1)))))


CHUNK = 8192  # vectors copied at a time when a structure is built from another or written out (40 MB at 1280-d)
TRIM_EVERY = 65_536  # vectors added between two ``release_freed_memory`` calls (IVF lists leave their old buffers
# behind as they grow: at 5M IVF-SQ8 vectors, 1.4 GB; bench/README.md "Memory")


def training_rows(n: int) -> np.ndarray:
    """Which of ``n`` vectors (by position) train an IVF index over them: 64 per inverted list, sorted."""
    return np.sort(np.random.default_rng(0).choice(n, min(n, ivf_lists(n) * 64), replace=False))


FAISS_TYPES = INDEX_TYPES["faiss"]


def build_structure(index_type: str, dim: int, n: int, sample: Callable[[], np.ndarray],
                    chunks: Iterable[tuple[np.ndarray, np.ndarray]], trained: dict[str, np.ndarray] | None = None
                    ) -> Any:
    """A new FAISS structure for ``n`` vectors, filled from ``chunks`` of (ids, vectors) so that building one never
    holds a second full copy of them.

    ``Flat``: exact. ``IVF``: inverted lists of float32 vectors. ``IVF-SQ8``: the same lists holding each vector as
    one byte per dimension (FAISS's 8-bit scalar quantizer, a quarter of the memory; ``VectorIndex`` re-ranks what
    the codes find with float16 copies on disk, ``vector_file.py``). An IVF type trains on ``sample()``
    (``training_rows``; made and dropped before the structure fills, so it never adds to the peak), or takes what an
    earlier training left (``trained_state``: a snapshot's, so a restart at 1M skips minutes of k-means). ``trained``
    without centroids (only an IVF-SQ8 structure's ``scalar_quantizer``): new lists, the old code ranges, so that
    retraining an outgrown IVF-SQ8 keeps its codes."""
    structure: Any
    if index_type == "Flat":
        structure = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif index_type in ("IVF", "IVF-SQ8"):
        if n == 0 and trained is None:
            raise ValueError("an IVF index is trained on the stored vectors, and there are none yet")
        centroids = (trained or {}).get("centroids")
        nlist = ivf_lists(n) if centroids is None else len(centroids)
        quantizer = faiss.IndexFlatIP(dim)
        if index_type == "IVF":
            structure = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:  # not by residual: a vector's code does not depend on its list, so a snapshot's codes come back exact
            structure = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                      faiss.METRIC_INNER_PRODUCT, False)
        if centroids is None:  # the lists, trained as a plain IVF over the same quantizer: FAISS's own IVF-SQ8
            # training would also copy 100,000 of the vectors to train the codes on (0.1x the raw vectors at 1M,
            # at a switch's peak), where their ranges are one pass over the sample below
            x = sample()
            lists = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            lists.cp.min_points_per_centroid = 1  # (a small index, APPROX_THRESHOLD set low, has fewer than FAISS's
            lists.train(x)  # 39 a list, by ~4 sqrt(n) lists: its warning on stderr at each training was noise)
            if index_type == "IVF-SQ8" and not trained:
                trained = {"scalar_quantizer": minmax_ranges(x)}
            del x
        else:
            assert centroids.shape == (nlist, dim), f"bad centroids {centroids.shape}"
            quantizer.add(np.ascontiguousarray(centroids, np.float32))
        structure.is_trained = True
        if index_type == "IVF-SQ8":
            assert trained is not None
            faiss.copy_array_to_vector(np.ascontiguousarray(trained["scalar_quantizer"], np.float32),
                                       structure.sq.trained)
        structure.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # remove + reconstruct
        structure.nprobe = default_nprobe(nlist)
    else:
        raise ValueError(f"unknown index type {index_type!r} ({', '.join(FAISS_TYPES)})")
    for ids, vectors in chunks:
        assert vectors.dtype == np.float32 and vectors.shape == (len(ids), dim), f"bad vectors {vectors.shape}"
        structure.add_with_ids(vectors, ids)
        release_freed_memory()  # what growing lists left behind (restart at 1M: 1.59x the vectors at the peak, else)
    return structure


def minmax_ranges(x: np.ndarray) -> np.ndarray:
    """The 8-bit scalar quantizer's state for vectors ``x``, as FAISS trains it (``RS_minmax``): each dimension's
    lowest value, then its range."""
    low = x.min(axis=0)
    return np.concatenate([low, x.max(axis=0) - low]).astype(np.float32)


def trained_state(structure: Any) -> dict[str, np.ndarray]:
    """What training left in an IVF structure (centroids; the scalar quantizer's ranges), for ``build_structure``."""
    state = {"centroids": structure.quantizer.reconstruct_n(0, structure.nlist)}
    if isinstance(structure, faiss.IndexIVFScalarQuantizer):
        state["scalar_quantizer"] = faiss.vector_to_array(structure.sq.trained).astype(np.float32)
    return state


def scalar_quantizer(trained: dict[str, np.ndarray], dim: int) -> Any:
    """The 8-bit scalar quantizer an IVF-SQ8 structure's ``trained_state`` describes (None for other types): it
    turns vectors into the structure's codes and back, exactly as the structure does."""
    if "scalar_quantizer" not in trained:
        return None
    codec = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
    faiss.copy_array_to_vector(np.ascontiguousarray(trained["scalar_quantizer"], np.float32), codec.trained)
    return codec


def gather(rows: np.ndarray, chunks: Iterable[np.ndarray]) -> np.ndarray:
    """The vectors at the sorted positions ``rows`` of a sequence given in consecutive chunks (one array, filled in
    place: no list of pieces to join)."""
    picked: np.ndarray | None = None
    start = filled = 0
    for chunk in chunks:
        if picked is None:
            picked = np.empty((len(rows), chunk.shape[1]), np.float32)
        stop = start + len(chunk)
        inside = rows[(rows >= start) & (rows < stop)]
        picked[filled : filled + len(inside)] = chunk[inside - start]
        filled += len(inside)
        start = stop
    assert picked is not None and filled == len(rows), f"{filled} of {len(rows)} rows found"
    return picked


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def release_freed_memory() -> None:
    """Hand memory freed by a dropped structure back to the system (glibc keeps it otherwise: the resident size
    stayed 0.46 x the vectors above the index after a restructure, bench/README.md "Memory")."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def release_pages(pointer: Any, start: int, stop: int) -> None:
    """Hand back to the system the whole pages between bytes ``start`` and ``stop`` of the buffer at ``pointer`` (a
    FAISS ``uint8_t*``), which its structure no longer uses: a FAISS vector that shrinks keeps its capacity, and
    ``madvise(MADV_DONTNEED)`` frees the pages under it (zeroed if they are ever written again)."""
    address, page = faiss.rev_swig_ptr(pointer, 1).ctypes.data, mmap.PAGESIZE
    first, last = -(-(address + start) // page) * page, (address + stop) // page * page
    if last > first:
        with contextlib.suppress(OSError, AttributeError):
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED


def search_structure(structure: Any, queries: np.ndarray, k: int, keep: np.ndarray | None = None,
                     objects: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` (scores, FAISS ids) per query in ``structure`` (-1 where it holds fewer); with ``keep``, only
    those ids, and an IVF structure probes more lists in proportion to how few of the ``objects`` they are."""
    if isinstance(structure, Moving):
        return best_of([search_structure(part, queries, k, keep, objects) for part in structure.parts()], k)
    if keep is None:
        return structure.search(queries, k)
    selector, bitmap = kept_selector(keep)  # (the bitmap kept alive while it is searched: the selector points into it)
    if not is_ivf(structure):
        return structure.search(queries, k, params=faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]
    nprobe = min(structure.nlist, math.ceil(structure.nprobe * objects / max(1, len(keep))))
    return structure.search(queries, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))  # type: ignore[call-arg]


def kept_selector(keep: np.ndarray) -> tuple[Any, np.ndarray]:
    """A FAISS selector of the ids in ``keep``, and the bitmap it reads (IDSelectorBatch's set took 10 ms at 250k).
    FAISS takes the bitmap's size in bytes: given its bits, it read past the end and kept ids that were not kept."""
    bits = np.zeros(int(keep.max(initial=-1)) + 1, bool)
    bits[keep] = True
    bitmap = np.packbits(bits, bitorder="little")
    return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap


def is_ivf(structure: Any) -> bool:
    """Whether a FAISS structure has inverted lists (IVF, IVF-SQ8)."""
    return isinstance(structure, faiss.IndexIVF)


def best_of(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` per query of several (scores, ids) answers to the same queries."""
    scores, ids = np.concatenate([s for s, _ in parts], axis=1), np.concatenate([i for _, i in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class Moving:
    """A restructure under way (``VectorIndex.restructure``), standing in for the FAISS structure: the vectors leave
    ``old`` for the trained, initially empty ``new`` a chunk at a time, and each chunk's memory in ``old`` goes back
    to the system as it leaves, so the two hold about one copy of the vectors between them (filling ``new`` beside
    the whole of ``old`` peaked at 2.56x the vectors' bytes at 1M with IVF: bench/README.md "Memory"). Meanwhile
    merges add to ``new`` and remove from whichever holds the id, and searches ask both (``search_structure``).

    A chunk is the end of a Flat ``old`` (its array shrinks from the end) or whole lists of an IVF one. Its vectors
    are read under the read lock and their lists in ``new`` found with no lock held (``next_chunk``, ``lists_for``:
    the costly part, ~1 s for 8,192 vectors at 4,000 lists); only ``move`` needs the write lock."""

    def __init__(self, old: Any, new: Any, index_type: str) -> None:
        self.old: Any = old
        self.new: Any = new
        self.index_type = index_type
        self._in_new = np.zeros(0, bool)  # FAISS id -> whether ``new`` holds it
        self._lists_done = 0  # an IVF ``old``: its lists below this one are empty
        self._taken: list[tuple[int, int]] = []  # ... the lists ``next_chunk`` took, and their sizes then
        self._taken_to = 0  # ... and the list after them

    @property
    def ntotal(self) -> int:
        return int(self.old.ntotal + self.new.ntotal)

    def parts(self) -> list[Any]:
        return [part for part in (self.old, self.new) if part.ntotal]

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.new.add_with_ids(vectors, ids)
        self._mark(ids)

    def remove_ids(self, ids: np.ndarray) -> None:
        for part, which in self._by_part(ids):
            part.remove_ids(np.ascontiguousarray(ids[which]))

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.new.d), np.float32)
        for part, which in self._by_part(ids):
            out[which] = part.reconstruct_batch(np.ascontiguousarray(ids[which]))
        return out

    def next_chunk(self, most: int) -> np.ndarray:
        """The ids of the next ~``most`` vectors to move out of ``old`` (read lock); none when it is empty."""
        if is_ivf(self.old):
            lists, no, count = self.old.invlists, self._lists_done, 0
            self._taken = []
            while no < self.old.nlist and count < most:
                if size := lists.list_size(no):
                    self._taken.append((no, size))
                    count += size
                no += 1
            self._taken_to = no
            picked = [faiss.rev_swig_ptr(lists.get_ids(no), size).copy() for no, size in self._taken]
            ids = np.concatenate(picked) if picked else np.empty(0, np.int64)
        else:
            n = self.old.ntotal  # an IndexIDMap2: the ids in the order of its array
            ids = faiss.rev_swig_ptr(self.old.id_map.data(), n)[max(0, n - most) :].copy() if n else np.empty(0, int)
        return ids.astype(np.int64, copy=False)

    def lists_for(self, vectors: np.ndarray) -> np.ndarray | None:
        """The lists of ``new`` the vectors go to (an IVF ``new``; no lock needed: its centroids no longer change)."""
        if not is_ivf(self.new) or not len(vectors):
            return None
        return np.ascontiguousarray(self.new.quantizer.search(vectors, 1)[1].ravel())

    def move(self, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray | None) -> None:
        """Move a chunk from ``next_chunk`` (less what merges removed meanwhile) into ``new`` and hand back what it
        held in ``old`` (write lock)."""
        if len(ids):
            if lists is None:
                self.new.add_with_ids(vectors, ids)
            else:
                self.new.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
            self._mark(ids)
        if is_ivf(self.old):
            if len(ids):
                self.old.remove_ids(ids)
            for no, size in self._taken:  # a list's buffer stays where it was as it empties
                release_pages(self.old.invlists.get_codes(no), 0, size * self.old.code_size)
            self._taken, self._lists_done = [], self._taken_to
        elif len(ids):
            flat: Any = faiss.downcast_index(self.old.index)  # the IndexFlat under the id map
            before = self.old.ntotal
            self.old.remove_ids(ids)
            release_pages(flat.codes.data(), self.old.ntotal * flat.code_size, before * flat.code_size)

    def _mark(self, ids: np.ndarray) -> None:
        top = int(ids.max()) + 1 if len(ids) else 0
        if top > len(self._in_new):
            self._in_new = np.concatenate([self._in_new, np.zeros(max(top, 2 * len(self._in_new)), bool)])
        self._in_new[ids] = True

    def _by_part(self, ids: np.ndarray) -> list[tuple[Any, np.ndarray]]:
        """(structure, which of ``ids`` it holds) for each of ``new`` and ``old`` that holds any of them."""
        held = self._held(ids)
        return [(part, which) for part, which in ((self.new, held), (self.old, ~held)) if which.any()]

    def _held(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` ``new`` holds."""
        held = np.zeros(len(ids), bool)
        inside = ids < len(self._in_new)
        held[inside] = self._in_new[ids[inside]]
        return held


_search_threads = 0  # FAISS's OpenMP threads per search in this process; 0: OpenMP's default (one per core)
_configured = threading.local()  # .threads: what this thread last set


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads per search in this process. One query at a time scans faster on one thread when the
    cores are shared (measured: 100k x 1280 flat, 2 busy cores: p50 38 ms on 1 thread, 98 ms on 2); concurrency
    comes from the HTTP thread pool instead. OpenMP keeps the count per thread, and a thread started later
    begins at the default, so every searching thread applies it itself (``_use_search_threads``)."""
    global _search_threads
    _search_threads = max(1, threads)
    _use_search_threads()


def _use_search_threads() -> None:
    if _search_threads and getattr(_configured, "threads", None) != _search_threads:
        faiss.omp_set_num_threads(_search_threads)
        _configured.threads = _search_threads


# An IVF-SQ8 search takes the codes' best RERANK_TIMES x as many as it returns, at least RERANK_LEAST, and orders
# them by their float16 vectors (``vector_file.py``). Crowded 480k real-grown set, recall@10: the codes alone 0.936,
# their best 20 re-ranked 0.984, their best 40 0.999 (bench/README.md, "Recall at 5M").
RERANK_TIMES, RERANK_LEAST = 4, 40

# A filter that keeps at most this many objects is answered by an exact scan over them (always k results, exact;
# ~1 µs per object: bench.text_filters);
# one that keeps more searches the structure with a selector (IVF then probes more lists, in proportion).
EXACT_LIMIT = 5_000
BROAD = 0.5  # a filter keeping at least this share of the objects is applied to the results of a search without it


def lists_outgrown(nlist: int, n: int) -> bool:
    """Whether IVF lists made for fewer vectors now hold ``n``: 4x as many as they were sized for (each list 2x
    ``ivf_lists``' size), so a search at the same nprobe scans 2x what lists made today would make it scan. The
    index service retrains such a structure (``VectorIndex.restructure`` into its own type)."""
    return ivf_lists(n) >= 2 * nlist


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: recall@10 >= 0.95 with p50 under 5 ms up to 1M vectors (README, "Scale")."""
    return min(nlist, max(16, nlist // 128))


class ReadWriteLock:
    """Many readers (searches, which run in parallel: FAISS releases the GIL) or one writer (a merge batch).

    Writers are preferred: a waiting merge stops new searches from starting, so a stream of queries cannot
    starve it. (A plain lock made 8 concurrent searches queue behind each other: bench/README.md.)"""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VectorIndex(SearchOne):
    def __init__(self, model: str, dim: int, generation: int = 1, features: FeatureStore | None = None) -> None:
        self.model = model
        self.dim = dim
        self.generation = generation
        self.features = features if features is not None else FeatureStore()  # this generation's local features
        self.index_type = "Flat"
        self._faiss: Any = build_structure("Flat", dim, 0, lambda: np.empty((0, dim), np.float32), ())
        self._ids: dict[str, int] = {}
        self._objects: dict[int, Indexed] = {}
        self._tombstones: Tombstones = {}  # object id -> (order, time of delete)
        self._next_id = 1
        self._lock = ReadWriteLock()
        self._restructuring = False
        self._added_since_trim = 0
        self._adding: dict[int, np.ndarray] = {}  # FAISS id -> vector, in this batch (``_flush``)
        self._removing: list[int] = []  # FAISS ids to remove, in this batch
        self._sorted: SortedList = SortedList()  # object ids, for prefix ranges
        self._modified = np.zeros(1024, np.float64)  # FAISS id -> modification time (0: unknown or no object)
        self._bucket_of = np.full(1024, -1, np.int32)  # FAISS id -> bucket code (-1: no object)
        self._bucket_codes: dict[str, int] = {}
        self._bucket_counts: dict[str, int] = {}
        self._postings: dict[int, dict[int, float]] = {}  # label -> FAISS id -> probability
        self._posting_arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the same as arrays, made when read
        # IVF-SQ8's float16 vectors, on disk: written with every add while there is one (from the start of a
        # restructure into IVF-SQ8), read instead of the codes once it holds every vector the structure does
        self._file: VectorFile | None = None
        self._file_complete = False

    def __len__(self) -> int:
        return len(self._ids)

    # -- merging -------------------------------------------------------------------------------------------

    def apply(self, entries: Iterable[ResultEntry]) -> ApplyStats:
        """Apply a batch atomically with respect to searches. Its local features are committed after the lock is
        released, before this returns (so before the merger acknowledges the batch): searches need not wait for
        SQLite's commit (~80 % of a 512-entry batch's time with features: ``bench.merge_stall``), and one that finds an
        object before its row is written leaves it unverified, as for any missing row (``feature_store.py``)."""
        stats = ApplyStats()
        with self._lock.write():
            try:
                for entry in entries:
                    self._apply_one(entry, stats)
            finally:
                self._flush()
        stats.write_features(self.features)
        if self._added_since_trim >= TRIM_EVERY:
            self._added_since_trim = 0
            release_freed_memory()
        return stats

    def _flush(self) -> None:
        """Hand the batch's removes, then its adds, to FAISS."""
        if self._removing:
            removing, self._removing = np.array(self._removing, np.int64), []
            self._faiss.remove_ids(removing)
            if (file := self._file) is not None:
                file.release(removing)
        if self._adding:
            ids = np.fromiter(self._adding, np.int64, len(self._adding))
            vectors, self._adding = np.stack(list(self._adding.values())), {}
            self._write_file(ids, vectors)
            self._faiss.add_with_ids(vectors, ids)
            self._added_since_trim += len(ids)

    def _apply_one(self, entry: ResultEntry, stats: ApplyStats) -> None:
        oid = object_id(entry.bucket, entry.key)
        current_id = self._ids.get(oid)
        current = self._objects.get(current_id) if current_id is not None else None
        tombstone = self._tombstones.get(oid)
        outcome = verdict(entry, current.order if current else None, tombstone[0] if tombstone else None,
                          self.model, self.dim, current.etag if current else "")
        stats.record(outcome, entry)
        if outcome == "delete":
            if current_id is not None:
                self._remove(oid, current_id)
            left = tombstone_after(tombstone[0] if tombstone else None, entry)
            if left is not None:
                self._tombstones[oid] = left
        elif outcome == "upsert":
            if current_id is not None:
                self._remove(oid, current_id)
            new_id = self._next_id
            self._next_id += 1
            self._adding[new_id] = entry.vector.reshape(-1).astype(np.float32)  # type: ignore[union-attr]  # verdict checked
            self._add(oid, new_id, indexed(entry))
            self._tombstones.pop(oid, None)

    def _add(self, oid: str, faiss_id: int, obj: Indexed) -> None:
        """Record an object whose vector is in the structure under ``faiss_id``."""
        self._ids[oid] = faiss_id
        self._objects[faiss_id] = obj
        self._sorted.add(oid)
        if faiss_id >= len(self._modified):
            grow = max(faiss_id + 1, len(self._modified))
            self._modified = np.concatenate([self._modified, np.zeros(grow)])
            self._bucket_of = np.concatenate([self._bucket_of, np.full(grow, -1, np.int32)])
        self._modified[faiss_id] = obj.modified
        self._bucket_of[faiss_id] = self._bucket_codes.setdefault(obj.bucket, len(self._bucket_codes))
        self._bucket_counts[obj.bucket] = self._bucket_counts.get(obj.bucket, 0) + 1
        for label, prob in obj.labels or ():
            self._postings.setdefault(label, {})[faiss_id] = prob
            self._posting_arrays.pop(label, None)

    def _remove(self, oid: str, faiss_id: int) -> None:
        if self._adding.pop(faiss_id, None) is None:  # added in this batch: it never reaches FAISS
            self._removing.append(faiss_id)
        obj = self._objects.pop(faiss_id)
        del self._ids[oid]
        self._sorted.remove(oid)
        self._modified[faiss_id] = 0.0
        self._bucket_of[faiss_id] = -1
        self._bucket_counts[obj.bucket] -= 1
        for label, _ in obj.labels or ():
            postings = self._postings[label]
            del postings[faiss_id]
            self._posting_arrays.pop(label, None)
            if not postings:
                del self._postings[label]

    def expire_tombstones(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        with self._lock.write():
            expired = [oid for oid, (_, when) in self._tombstones.items() if when < cutoff]
            for oid in expired:
                del self._tombstones[oid]
        return len(expired)

    # -- reading -------------------------------------------------------------------------------------------

    def get(self, bucket: str, key: str) -> Indexed | None:
        faiss_id = self._ids.get(object_id(bucket, key))
        return None if faiss_id is None else self._objects.get(faiss_id)

    def etags(self, oids: Sequence[str]) -> dict[str, str]:
        held = ((oid, self._objects.get(faiss_id)) for oid in oids if (faiss_id := self._ids.get(oid)) is not None)
        return {oid: indexed.etag for oid, indexed in held if indexed is not None}

    def buckets(self) -> set[str]:
        with self._lock.read():
            return self._buckets()

    def objects(self) -> list[Indexed]:
        with self._lock.read():
            return list(self._objects.values())

    def tombstones(self) -> Tombstones:
        with self._lock.read():
            return dict(self._tombstones)

    def vector(self, bucket: str, key: str) -> np.ndarray | None:
        with self._lock.read():
            faiss_id = self._ids.get(object_id(bucket, key))
            return None if faiss_id is None else self._vectors(np.array([faiss_id], np.int64))[0]

    def search_many(self, queries: np.ndarray, k: int, exclude: list[str | None] | None = None,
                    where: Filter | None = None) -> list[list[tuple[Indexed, float]]]:
        """One FAISS call for many queries (a flat scan reads the vectors once for all of them); ``exclude[i]``
        is an object id left out of query i's results. With a filter that keeps at least ``BROAD`` of the objects,
        the structure's results without it are filtered (enough of them fetched); with one that keeps at most
        ``EXACT_LIMIT`` objects, the answer is an exact scan over them; otherwise, the structure is searched with a
        selector. Where
        the probed lists hold fewer than ``k`` kept objects, an exact scan answers instead: ``k`` results come
        whenever that many are kept."""
        assert queries.ndim == 2 and queries.shape[1] == self.dim, f"queries {queries.shape}, index dim {self.dim}"
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _use_search_threads()

        def fetch(n: int) -> list[list[tuple[Indexed, float]]]:
            with self._lock.read():
                found = None
                if where and (share := self._share(where)) >= BROAD:
                    found = self._kept_of_more(queries, n, where, share)
                return found if found is not None else self._found(queries, n, where)

        return nearest(fetch, k, exclude or [None] * len(queries))

    def _found(self, queries: np.ndarray, k: int, where: Filter | None) -> list[list[tuple[Indexed, float]]]:
        """The best ``k`` per query of the objects ``where`` keeps: an exact scan of them, or the structure searched
        with a selector, or all of them (caller holds the lock)."""
        selected = self._select(where) if where else None  # (None too when it keeps every object)
        n = len(self._ids) if selected is None else len(selected)
        if n == 0:
            return [[] for _ in queries]
        want = min(n, k)
        if selected is not None and len(selected) <= EXACT_LIMIT:
            scores, ids = self._exact(queries, selected, want)
        else:
            scores, ids = self._approximate(queries, want, selected)
            if (ids < 0).any():  # the probed lists held too few of the kept objects (a large k: unfiltered too)
                every = np.fromiter(self._ids.values(), np.int64, len(self._ids)) if selected is None else selected
                scores, ids = self._exact(queries, every, want)
        objects = self._objects  # rows as Python numbers: numpy scalars hash and convert ~2x slower
        return [[(objects[i], s) for s, i in zip(row_s.tolist(), row_i.tolist()) if i in objects]
                for row_s, row_i in zip(scores, ids)]

    def _share(self, where: Filter) -> float:
        """At least the share of the objects that ``where`` keeps (caller holds the lock), found without gathering
        their ids: the least of the prefix's, the bucket's and the time range's shares."""
        total = max(1, len(self._ids))
        shares = [1.0]
        if where.prefix:
            shares.append(sum(stop - begin for begin, stop in map(self._prefix_range, where.ranges(self._buckets())))
                          / total)
        elif where.bucket:
            shares.append(self._bucket_counts.get(where.bucket, 0) / total)
        if where.dated:
            shares.append(int(np.count_nonzero(self._dated_mask(where, self._modified))) / total)
        return min(shares)

    def _kept_of_more(self, queries: np.ndarray, want: int, where: Filter, share: float
                      ) -> list[list[tuple[Indexed, float]]] | None:
        """For a filter that keeps most objects: the structure's best ``want / share`` (twice over) without a
        selector, those ``where`` keeps, best first; None when a query keeps fewer than ``want`` of them (the caller
        then selects). (Gathering the ids of 247k kept objects of 250k took most of a search's time.)"""
        fetch = min(len(self._ids), math.ceil(2 * want / share) + 16)
        scores, ids = self._approximate(queries, fetch, None)
        objects, found = self._objects, []
        for row_s, row_i in zip(scores.tolist(), ids.tolist()):
            hits = [(obj, s) for s, i in zip(row_s, row_i)
                    if (obj := objects.get(i)) is not None and where.keeps(obj.bucket, obj.key, obj.modified)]
            if len(hits) < want:
                return None
            found.append(hits[:want])
        return found

    def _approximate(self, queries: np.ndarray, want: int, selected: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The structure's best ``want`` per query (of the ``selected`` ids, if given); for IVF-SQ8, the codes' best
        few dozen re-ranked by their float16 vectors, with those vectors' scores (caller holds the lock)."""
        if not self._file_complete:
            return search_structure(self._faiss, queries, want, selected, len(self._ids))
        n = len(self._ids) if selected is None else len(selected)
        fetch = min(n, max(RERANK_LEAST, RERANK_TIMES * want))
        _, ids = search_structure(self._faiss, queries, fetch, selected, len(self._ids))
        found = ids >= 0
        scores = np.full(ids.shape, -np.inf, np.float32)
        scores[found] = np.einsum("ij,ij->i", self._vectors(ids[found]), queries[np.nonzero(found)[0]])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors at FAISS ``ids`` (caller holds the lock): IVF-SQ8's float16 ones where the file has them all,
        else what the structure holds."""
        if self._file_complete:
            assert self._file is not None
            return self._file.read(ids)
        if not len(ids):
            return np.empty((0, self.dim), np.float32)
        return np.ascontiguousarray(self._faiss.reconstruct_batch(ids), np.float32)

    def _select(self, where: Filter) -> np.ndarray | None:
        """The FAISS ids of the objects ``where`` keeps, or None when it keeps every object (caller holds the lock).
        A time range and a bucket are array comparisons; a prefix is ranges of the sorted object ids, whose ids are
        gathered in C, or, where the time range keeps fewer objects, a check of those objects' keys. (Gathered one by
        one in Python, a prefix holding 247k of 250k objects took ~250 ms a search, holding the GIL.)"""
        dated = self._dated(where) if where.dated else None
        if where.prefix:
            starts = where.ranges(self._buckets())
            ranges = [self._prefix_range(start) for start in starts]
            if dated is not None and len(dated) < sum(stop - begin for begin, stop in ranges):
                objects = self._objects
                return dated[[object_id(objects[i].bucket, objects[i].key).startswith(tuple(starts))
                              for i in dated.tolist()]]
            ids = np.concatenate([np.fromiter(map(self._ids.__getitem__, self._sorted.islice(begin, stop)),
                                              np.int64, count=stop - begin) for begin, stop in ranges] or
                                 [np.empty(0, np.int64)])
        elif where.bucket:
            code = self._bucket_codes.get(where.bucket, -2)
            ids = np.flatnonzero(self._bucket_of == code)
        else:
            assert dated is not None, "an empty filter selects nothing: search without one"
            ids = dated
        if dated is not None and ids is not dated:
            ids = ids[self._dated_mask(where, self._modified[ids])]
        return None if len(ids) == len(self._ids) else ids.astype(np.int64, copy=False)

    def _prefix_range(self, start: str) -> tuple[int, int]:
        """The positions in the sorted object ids of those that begin with ``start``."""
        begin = self._sorted.bisect_left(start)
        stop = self._sorted.bisect_left(start + "\U0010ffff")  # past them all but those that go on with U+10FFFF
        while stop < len(self._sorted) and self._sorted[stop].startswith(start):
            stop += 1
        return begin, stop

    def _dated(self, where: Filter) -> np.ndarray:
        return np.flatnonzero(self._dated_mask(where, self._modified))

    @staticmethod
    def _dated_mask(where: Filter, times: np.ndarray) -> np.ndarray:
        keep = times > 0
        if where.after is not None:
            keep &= times >= where.after
        if where.before is not None:
            keep &= times < where.before
        return keep

    def _buckets(self) -> set[str]:
        return {bucket for bucket, count in self._bucket_counts.items() if count}

    def _exact(self, queries: np.ndarray, ids: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``want`` of ``ids`` for each query by exact inner product, in chunks (bounded memory). FAISS
        scans each chunk: numpy's BLAS threads stall when the cores are busy (measured: 17 ms against 0.3 ms)."""
        best = (np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64))
        for start in range(0, len(ids), 8192):
            chunk = ids[start : start + 8192]
            scores, at = faiss.knn(queries, self._vectors(chunk), min(want, len(chunk)),
                                   metric=faiss.METRIC_INNER_PRODUCT)
            best = best_of([best, (scores, chunk[at])], want)
        return best

    def text_search(self, wanted: Iterable[int], k: int, where: Filter | None = None) -> list[tuple[Indexed, float]]:
        """The ``k`` objects whose kept labels give the ``wanted`` labels the most probability (summed), best
        first; objects without any of them are not returned. Vectorised: one array pass over the postings (a
        word like "dog" reaches 118 labels and a tenth of a photo collection)."""
        with self._lock.read():
            parts = [self._posting_array(label) for label in set(wanted) if label in self._postings]
            if not parts:
                return []
            ids = np.concatenate([i for i, _ in parts])
            scores = np.bincount(ids, weights=np.concatenate([p for _, p in parts]), minlength=len(self._modified))
            if where and (selected := self._select(where)) is not None:
                kept = np.zeros(len(scores), bool)
                kept[selected] = True
                scores[~kept] = 0.0
            found = np.flatnonzero(scores > 0)
            hits: list[tuple[Indexed, float]] = []
            if len(found) > k:  # the objects tied at the k-th score are cut by name, as the order below (and
                # Milvus) has it: argpartition cut them by internal id, and k=3 was not the start of k=5
                cut = -np.partition(-scores[found], k - 1)[k - 1]
                above, tied = found[scores[found] > cut], found[scores[found] == cut]
                named = heapq.nsmallest(k - len(above), (self._objects[int(i)] for i in tied),
                                        key=lambda o: (o.bucket, o.key))
                hits = [(o, float(cut)) for o in named]
                found = above
            hits += [(self._objects[int(i)], float(scores[i])) for i in found]
        return sorted(hits, key=lambda hit: (-hit[1], hit[0].bucket, hit[0].key))

    def _posting_array(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """A label's postings as arrays (ids, probabilities), made on first use after each change to them."""
        cached = self._posting_arrays.get(label)
        if cached is None:
            postings = self._postings[label]
            cached = (np.fromiter(postings.keys(), np.int64, len(postings)),
                      np.fromiter(postings.values(), np.float64, len(postings)))
            self._posting_arrays[label] = cached
        return cached

    def label_counts(self) -> dict[int, int]:
        """How many objects keep each label."""
        with self._lock.read():
            return {label: len(postings) for label, postings in self._postings.items()}

    # -- export, import, restructure -------------------------------------------------------------------------

    def export(self) -> tuple[list[Indexed], np.ndarray, Tombstones]:
        """A consistent copy of objects, their vectors (same order) and tombstones, taken under the lock."""
        with self._lock.read():
            objects, ids, tombstones = self._contents()
            return objects, self._vectors(ids), tombstones

    def contents(self) -> tuple[list[Indexed], np.ndarray, Tombstones]:
        """Objects, their FAISS ids (same order) and the tombstones, without the vectors (``vectors_of`` reads them
        a chunk at a time: a snapshot of 1M vectors does not copy 5 GB first)."""
        with self._lock.read():
            return self._contents()

    def _contents(self) -> tuple[list[Indexed], np.ndarray, Tombstones]:
        """``contents``, under the reader lock already held: taken twice by one thread, a merge waiting between the
        two (writers go first) left both waiting for good, and every search behind them (review 66)."""
        ids = np.fromiter(self._objects.keys(), dtype=np.int64, count=len(self._objects))
        return [self._objects[int(i)] for i in ids], ids, dict(self._tombstones)

    def file_bytes(self) -> int:
        file = self._file
        return 0 if file is None else file.disk_bytes()

    def outgrown(self) -> bool:
        """IVF lists sized for a quarter of what they now hold, or less (``lists_outgrown``)."""
        with self._lock.read():
            structure = self._faiss  # never while a restructure is moving the vectors
            return is_ivf(structure) and lists_outgrown(structure.nlist, len(self))

    def structure(self) -> tuple[str, dict[str, np.ndarray]]:
        """The index type and what its training left (none for Flat), which a snapshot keeps, read together: a
        snapshot that read them apart across a restructure's swap (IVF -> IVF-SQ8) named IVF-SQ8 with IVF's
        training, and could not be loaded (an independent review)."""
        with self._lock.read():
            structure = self._faiss.old if isinstance(self._faiss, Moving) else self._faiss  # the one index_type names
            return self.index_type, trained_state(structure) if is_ivf(structure) else {}

    def vectors_of(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(kept, vectors) for ``ids``, ``CHUNK`` at a time, each chunk read under the lock (not held while the caller
        uses it): a row per id, and zeros where ``kept`` says the id was removed meanwhile (by a merge beside a
        restructure or a checkpoint)."""
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            with self._lock.read():
                kept = np.fromiter((int(i) in self._objects for i in chunk), bool, len(chunk))
                present = self._vectors(chunk[kept])
            if kept.all():
                yield kept, present
            else:
                rows = np.zeros((len(chunk), self.dim), np.float32)
                rows[kept] = present
                yield kept, rows

    @classmethod
    def restored(cls, model: str, dim: int, generation: int, objects: list[Indexed],
                 chunks: Callable[[], Iterator[np.ndarray]], tombstones: Tombstones, index_type: str = "Flat",
                 features: FeatureStore | None = None, trained: dict[str, np.ndarray] | None = None) -> VectorIndex:
        """An index of ``objects`` whose vectors, in the same order, ``chunks()`` yields a few rows at a time. An
        IVF index takes ``trained`` (``trained_state``) when given; else ``chunks()`` is read twice: for its
        training sample, then to fill it."""
        index = cls(model, dim, generation, features)
        n = len(objects)
        if n == 0:
            index_type = "Flat"  # nothing to train an IVF index on
        ids = np.arange(1, n + 1, dtype=np.int64)

        if index_type == "IVF-SQ8":
            index._file = index._new_file()

        def numbered() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            start = 0
            for chunk in chunks():
                numbers, vectors = ids[start : start + len(chunk)], np.ascontiguousarray(chunk, np.float32)
                index._write_file(numbers, vectors)
                yield numbers, vectors
                start += len(chunk)
            if start != n:
                raise ValueError(f"{start} vectors for {n} objects")

        index._faiss = build_structure(index_type, dim, n, lambda: gather(training_rows(n), chunks()), numbered(),
                                       trained or None)
        index.index_type = index_type
        index._file_complete = index._file is not None
        for i, obj in zip(ids, objects):
            index._add(object_id(obj.bucket, obj.key), int(i), obj)
        index._tombstones = dict(tombstones)
        index._next_id = n + 1
        release_freed_memory()
        return index

    def restructure(self, index_type: str, progress: Callable[[int], None] | None = None) -> None:
        """Rebuild the FAISS structure (e.g. Flat -> IVF) in the caller's thread while merges and searches go on.
        An IVF type is trained on a sample first; then the vectors move into the new structure a chunk at a time
        (``Moving``), so the old and the new one together hold about one copy of them. A restructure that failed
        while moving (the ``Moving`` is left in place, and serves) is finished by the next call, whatever its type."""
        with self._lock.write():
            if self._restructuring:
                raise RuntimeError("a restructure is already running")
            self._restructuring = True
        try:
            started = time.perf_counter()
            moving = self._faiss if isinstance(self._faiss, Moving) else self._trained_beside(index_type)
            moved, longest = 0, 0.0  # vectors moved; the longest a move kept searches waiting
            while True:
                with self._lock.read():
                    ids = moving.next_chunk(CHUNK)
                    if not len(ids) and moving.old.ntotal:
                        raise RuntimeError(f"{moving.old.ntotal} vectors left that no chunk takes")
                    vectors = self._vectors(ids)  # out of IVF-SQ8: its float16 vectors, not its decoded codes
                if not self._file_complete:  # into IVF-SQ8 (a file not complete yet): the old vectors are exact
                    self._write_file(ids, vectors)  # (a row removed meanwhile is never read: ids are not reused)
                lists = moving.lists_for(vectors)
                with self._lock.write():
                    held = time.perf_counter()
                    left = np.fromiter((int(i) in self._objects for i in ids), bool, len(ids))  # not removed meanwhile
                    moving.move(ids[left], vectors[left], None if lists is None else lists[left])
                    if not moving.old.ntotal:
                        self._faiss, self.index_type = moving.new, moving.index_type
                        if moving.index_type != "IVF-SQ8":
                            self._file = None  # closed once dropped (no search reads it: the write lock)
                        self._file_complete = self._file is not None
                    longest = max(longest, time.perf_counter() - held)
                moved += int(left.sum())
                if progress is not None:
                    progress(moved)
                release_freed_memory()  # what the new lists left behind as they grew
                if moving.new is self._faiss:
                    break
        finally:
            self._restructuring = False
        release_freed_memory()
        log.info("index generation %d is now %s over %d vectors (built in %.1f s; %d moved, each chunk holding "
                 "searches for at most %.0f ms)", self.generation, self.index_type, len(self),
                 time.perf_counter() - started, moved, 1000 * longest)

    def _trained_beside(self, index_type: str) -> Moving:
        """A new, empty structure of ``index_type``, trained on a sample of the vectors (rows a merge removed
        meanwhile are left out), put in beside the current one."""
        with self._lock.read():
            ids = np.fromiter(self._objects.keys(), dtype=np.int64, count=len(self._objects))
            keep = ({"scalar_quantizer": trained_state(self._faiss)["scalar_quantizer"]}
                    if index_type == self.index_type == "IVF-SQ8" else None)  # retrained lists, the same codes

        def sample() -> np.ndarray:
            rows = ids[training_rows(len(ids))]
            out, filled = np.empty((len(rows), self.dim), np.float32), 0
            for kept, vectors in self.vectors_of(rows):
                present = vectors[kept]
                out[filled : filled + len(present)] = present
                filled += len(present)
            return out[:filled]

        structure = build_structure(index_type, self.dim, len(ids), sample, (), keep)
        with self._lock.write():
            self._faiss = Moving(self._faiss, structure, index_type)
            if index_type == "IVF-SQ8" and self._file is None:
                self._file = self._new_file()  # every add from now on; the moving chunks fill in the rest
            return self._faiss

    def _write_file(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store vectors in the float16 file, if there is one. One that cannot be written (a full disk) is given up,
        logged, rather than failing the merge batch or the restructure: searches go by the codes alone until a
        restructure or a restart makes a new one (from the codes, for the vectors merged meanwhile)."""
        file = self._file  # read once: a restructure's chunk (no lock held) and a merge batch may both write
        if file is None:
            return
        try:
            file.write(ids, vectors)
        except OSError as exc:
            log.error("index generation %d: the float16 vector file cannot be written (%s); searches go by the 8-bit "
                      "codes alone until the index is restructured or restarted", self.generation, exc)
            self._file, self._file_complete = None, False

    def _new_file(self) -> VectorFile:
        """An empty float16 vector file, on the disk beside this generation's feature store (a temporary folder for an
        index without one)."""
        return VectorFile(self.dim, None if self.features.path is None else self.features.path.parent)
