"""The FAISS generation's own mechanics: structures (Flat, IVF) and their recall, restructuring while merging, the
readers-writer lock, filters on each search path, the stream entry format. The semantics every backend shares
(replace, delete, tombstones, order, filters, text search) are in tests/test_backends.py."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from types import SimpleNamespace
from typing import Iterable, Iterator, Sequence

import numpy as np
import pytest

import index_service.vector_index as module
from bucketlens.schemas import ResultEntry, SchemaError, object_id
from index_service.backend import restructure_into
from index_service.feature_store import FeatureStore
from index_service.filters import Filter
from index_service.service import Service
from index_service.vector_file import VectorFile
from index_service.vector_index import VectorIndex

DIM = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def upsert(key: str, order: int, seed: int, etag: str = "e", model: str = "m") -> ResultEntry:
    return ResultEntry("upsert", "b", key, etag, "", order, 1, model, unit(seed))


def delete(key: str, order: int) -> ResultEntry:
    return ResultEntry("delete", "b", key, "", "", order, 1)


@pytest.fixture
def index() -> VectorIndex:
    return VectorIndex("m", DIM)


def test_an_export_takes_the_reader_lock_once_so_a_merge_waiting_meanwhile_cannot_stall_it(
        index: VectorIndex) -> None:
    """Review 66: ``export`` took the reader lock, then again through ``contents``; a merge that began waiting
    between the two (writers go first) waited for the first, and the second for the merge: both for good, and
    every search behind them."""
    index.apply([upsert(f"k{i}", i + 1, i) for i in range(10)])
    read, depth, deepest = index._lock.read, [0], [0]

    @contextlib.contextmanager
    def counted() -> Iterator[None]:
        with read():
            depth[0] += 1
            deepest[0] = max(deepest[0], depth[0])
            try:
                yield
            finally:
                depth[0] -= 1

    index._lock.read = counted  # type: ignore[method-assign]
    objects, vectors, _ = index.export()
    assert len(objects) == 10 and vectors.shape == (10, DIM) and deepest[0] == 1


def test_stream_entry_round_trip() -> None:
    entry = upsert("dir/a b+c ü.jpg", 2**70, 4)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in entry.to_fields().items()}
    back = ResultEntry.from_fields(fields)
    assert back.key == entry.key and back.order == 2**70
    np.testing.assert_array_equal(back.vector, entry.vector)
    with_features = dataclasses.replace(entry, features=b"O1\x00\x00", pixels=12_000_000, labels="281:0.5",
                                        modified=1_700_000_000.25)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in with_features.to_fields().items()}
    again = ResultEntry.from_fields(fields)
    assert (again.features, again.pixels, again.labels, again.modified) == (
        b"O1\x00\x00", 12_000_000, "281:0.5", 1_700_000_000.25)
    note = ResultEntry("failed", "b", "a", "e", "", 3, 1, reason="not_an_image")
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in note.to_fields().items()}
    assert ResultEntry.from_fields(fields).reason == "not_an_image"
    fields[b"modified"] = b"nan"
    with pytest.raises(SchemaError, match="modified"):
        ResultEntry.from_fields(fields)


@pytest.mark.parametrize("scale", [1e30, 2.0, 0.5, math.inf, math.nan])
def test_an_upsert_whose_vector_is_not_of_unit_length_is_malformed(scale: float) -> None:
    """Workers write normalised vectors; one of huge values was indexed and came first, at score 1.0, for 19 of 40
    image queries (review 20)."""
    entry = dataclasses.replace(upsert("a", 1, 4), vector=unit(4) * np.float32(scale))
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in entry.to_fields().items()}
    with pytest.raises(SchemaError, match="length"):
        ResultEntry.from_fields(fields)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_stream_entries_still_read(version: int) -> None:
    """Entries written by workers before features and pixel counts (v1), labels and times (v2), or a failed note's
    reason (v3) existed: a rolling upgrade."""
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in upsert("a", 1, 1).to_fields().items()}
    fields[b"v"] = str(version).encode()
    del fields[b"reason"]
    if version <= 2:
        del fields[b"labels"], fields[b"modified"]
    if version == 1:
        del fields[b"features"], fields[b"pixels"]
    back = ResultEntry.from_fields(fields)
    assert back.features == b"" and back.pixels == 0 and back.vector is not None
    assert back.labels == "" and back.modified == 0.0 and back.reason == ""


def clustered(n: int, dim: int, centroids: int, seed: int = 0) -> np.ndarray:
    """Vectors shaped like real embeddings (graded similarity): themes, sub-centroids around them, points
    around those, normalised (as bench/index_scale.py, smaller)."""
    rng = np.random.default_rng(seed)
    themes = rng.standard_normal((centroids // 20, dim)).astype(np.float32)
    centres = themes[rng.integers(0, len(themes), centroids)] + rng.standard_normal((centroids, dim)).astype(np.float32)
    x = centres[rng.integers(0, centroids, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("index_type", ["IVF", "IVF-SQ8"])
def test_ivf_recall_at_10_against_exact_search_and_deletes_are_honoured(index_type: str) -> None:
    dim, n = 64, 20_000
    data = clustered(n + 200, dim, 500)
    exact, approx = VectorIndex("m", dim), VectorIndex("m", dim)
    entries = [ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data[:n])]
    exact.apply(entries)
    approx.apply(entries)
    approx.restructure(index_type)
    assert approx.index_type == index_type and len(approx) == n
    queries = data[n:]
    recall = np.mean([
        len({o.key for o, _ in exact.search(q, 10)} & {o.key for o, _ in approx.search(q, 10)}) / 10
        for q in queries
    ])
    assert recall >= 0.95, recall
    victim = approx.search(queries[0], 1)[0][0].key
    approx.apply([ResultEntry("delete", "b", victim, "", "", 2, 1)])
    assert victim not in {o.key for o, _ in approx.search(queries[0], 10)}
    # A prefix keeping 11,111 objects searches the structure with a selector; one keeping 111, an exact scan.
    for prefix in ("k1", "k199"):
        found = [o.key for o, _ in approx.search(queries[1], 10, where=Filter(prefix=prefix))]
        assert len(found) == 10 and all(key.startswith(prefix) for key in found)


@pytest.mark.parametrize("index_type", ["IVF", "IVF-SQ8"])
def test_a_small_ivf_index_is_trained_without_faiss_warning_on_stderr(index_type: str,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """With APPROX_THRESHOLD set low, each training printed FAISS's "WARNING clustering 73 points to 34 centroids:
    please provide at least 1326 training points" (review 76): ~4 sqrt(n) lists hold fewer than its 39 a list
    below ~24,000 vectors. The index still finds what it holds."""
    data = clustered(300, 32, 40)
    index = VectorIndex("m", 32)
    index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data)])
    index.restructure(index_type)
    assert index.index_type == index_type and index.search(data[7], 1)[0][0].key == "k7"
    assert "WARNING clustering" not in capfd.readouterr().err


def test_ivf_sq8_orders_what_its_codes_find_by_their_float16_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crowded collection (20 photos' 1,000 near copies each): the 8-bit codes alone cannot order a query's nearest
    neighbours, the float16 copies can, with or without a filter wide enough to search the structure; the scores
    are the float16 vectors'."""
    dim, parents, copies = 64, 20, 1000
    rng = np.random.default_rng(0)
    photos = rng.standard_normal((parents, dim)).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    data = np.repeat(photos, copies, axis=0) + 0.3 / np.sqrt(dim) * rng.standard_normal((parents * copies, dim))
    queries = photos + 0.3 / np.sqrt(dim) * rng.standard_normal((parents, dim))
    data, queries = ((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32) for x in (data, queries))
    index = VectorIndex("m", dim)
    index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data)])
    index.restructure("IVF-SQ8")
    index._faiss.nprobe = index._faiss.nlist  # every list: what is left to lose is the codes'
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]

    def recall(found: Iterable[Iterable[int]]) -> float:
        return float(np.mean([len(set(row) & set(want)) / 10 for row, want in zip(found, exact)]))

    def keys(hits: list[list[tuple[module.Indexed, float]]]) -> list[list[int]]:
        return [[int(o.key[1:]) for o, _ in row] for row in hits]

    codes_alone = module.search_structure(index._faiss, queries, 10)[1] - 1  # FAISS ids are positions + 1
    assert recall(codes_alone) < 0.9  # the set is crowded enough to tell
    hits = index.search_many(queries, 10)
    assert recall(keys(hits)) >= 0.98
    for query, row in zip(queries, hits):
        for obj, score in row:
            assert score == pytest.approx(float(data[int(obj.key[1:])].astype(np.float16).astype(np.float32) @ query),
                                          abs=1e-5)
    monkeypatch.setattr(module, "EXACT_LIMIT", 100)  # a prefix keeping 11,111 objects searches the structure
    wide = index.search_many(queries, 10, where=Filter(prefix="k1"))
    assert all(o.key.startswith("k1") for row in wide for o, _ in row)
    kept = np.array([i for i in range(len(data)) if f"k{i}".startswith("k1")])
    exact = kept[np.argsort(-(queries @ data[kept].T), axis=1)[:, :10]]
    assert recall(keys(wide)) >= 0.98


def test_a_vector_file_that_cannot_be_written_is_given_up_and_nothing_is_lost(monkeypatch: pytest.MonkeyPatch,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A full disk under IVF-SQ8's float16 file fails neither the merge batch nor the search: the index logs it and
    goes by the codes alone, and the next restructure makes a new file."""
    dim = 16
    data = clustered(602, dim, 40)
    index = VectorIndex("m", dim)
    index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data[:600])])
    index.restructure("IVF-SQ8")
    assert index._file_complete

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(VectorFile, "write", full)
        index.apply([ResultEntry("upsert", "b", "new", "e", "", 1, 1, "m", data[600])])
    assert "cannot be written" in caplog.text and index._file is None and not index._file_complete
    assert index.search(data[600], 1)[0][0].key == "new" and len(index) == 601
    np.testing.assert_allclose(index.vector("b", "new"), data[600], atol=0.02)  # decoded from the codes
    index.restructure("IVF-SQ8")
    assert index._file_complete and index.search(data[600], 1)[0][0].key == "new"
    index.apply([ResultEntry("upsert", "b", "newer", "e", "", 1, 1, "m", data[601])])
    np.testing.assert_allclose(index.vector("b", "newer"), data[601], atol=2e-3)  # float16 again


def test_a_vector_file_reads_rows_by_id_in_any_order() -> None:
    file = VectorFile(DIM)
    vectors = np.stack([unit(i) for i in range(8)])
    ids = np.array([7, 5, 6, 1, 2, 3, 40, 41])  # runs written out of order
    file.write(ids, vectors)
    asked = np.array([41, 5, 5, 1, 7, 2])
    np.testing.assert_array_equal(file.read(asked), vectors[[7, 1, 1, 3, 0, 4]].astype(np.float16))
    assert file.read(np.empty(0, np.int64)).shape == (0, DIM)
    with pytest.raises(RuntimeError, match="no rows for FAISS ids 42"):
        file.read(np.array([42, 43]))


def test_removed_rows_give_their_disk_back_once_their_blocks_hold_no_live_row() -> None:
    """Rows of 2.5 KB share 4 KB blocks: a block goes back to the filesystem once every row in it is released, and
    the rows still live read as written."""
    dim = 1280
    file = VectorFile(dim)
    vectors = np.random.default_rng(0).standard_normal((400, dim)).astype(np.float32)
    file.write(np.arange(1, 401), vectors)
    written = file.disk_bytes()
    assert written >= 400 * 2 * dim
    file.release(np.arange(1, 201, 2))  # every other row: no block is free of live rows yet
    assert file.disk_bytes() == written
    file.release(np.arange(2, 201, 2)[::-1])  # the rest of the first half, in any order
    assert written - file.disk_bytes() >= 200 * 2 * dim - 2 * 4096  # all but the blocks shared with live rows
    np.testing.assert_array_equal(file.read(np.arange(201, 401)), vectors[200:].astype(np.float16))


def test_an_ivf_sq8_index_re_uploaded_in_full_keeps_its_file_size() -> None:
    dim = 640  # rows of 1,280 bytes: ids of one batch fill whole blocks
    data = clustered(1200, dim, 40)
    index = VectorIndex("m", dim)
    index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data[:600])])
    index.restructure("IVF-SQ8")
    before = index.file_bytes()
    assert before >= 600 * 2 * dim
    for round_ in range(3):  # the whole library uploaded again, three times, with new vectors
        index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 2 + round_, 2 + round_, "m", data[600 + i])
                     for i in range(600)])
    assert index.file_bytes() <= before + 2 * 4096  # not 4x
    assert index.search(data[601], 1)[0][0].key == "k1"


@pytest.mark.parametrize("index_type", ["IVF", "IVF-SQ8"])
def test_a_structure_is_trained_as_faiss_trains_it(index_type: str) -> None:
    """The lists are trained as a plain IVF and an IVF-SQ8's code ranges in one pass over the sample (not FAISS's
    IVF-SQ8 training, which copies up to 100,000 of the vectors first): on a sample within 100,000, the same state."""
    import faiss

    dim, n = 32, 3000
    data = clustered(n, dim, 100)
    ours = module.build_structure(index_type, dim, n, lambda: data, [])
    quantizer = faiss.IndexFlatIP(dim)
    faiss_own = (faiss.IndexIVFFlat(quantizer, dim, ours.nlist, faiss.METRIC_INNER_PRODUCT) if index_type == "IVF"
                 else faiss.IndexIVFScalarQuantizer(quantizer, dim, ours.nlist, faiss.ScalarQuantizer.QT_8bit,
                                                    faiss.METRIC_INNER_PRODUCT, False))
    faiss_own.train(data)
    want, got = module.trained_state(faiss_own), module.trained_state(ours)
    assert want.keys() == got.keys() == ({"centroids"} | ({"scalar_quantizer"} if index_type == "IVF-SQ8" else set()))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("index_type", ["IVF", "IVF-SQ8"])
def test_outgrown_lists_are_retrained_and_an_sq8_structure_keeps_its_codes(index_type: str) -> None:
    dim = 32
    data = clustered(5000, dim, 200)
    entries = [ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data)]
    index = VectorIndex("m", dim)
    index.apply(entries[:1000])
    index.restructure(index_type)  # the switch at the threshold: lists made for 1,000 vectors
    made_for = index._faiss.nlist
    index.apply(entries[1000:3000])
    assert not index.outgrown()  # 3x: not yet
    index.apply(entries[3000:])
    assert index.outgrown() and module.ivf_lists(5000) >= 2 * made_for
    before = {k: index._faiss.reconstruct(index._ids[object_id("b", k)]) for k in ("k0", "k2500", "k4999")}
    top = [o.key for o, _ in index.search(data[7], 10)]
    assert restructure_into(index, 1000, index_type) == index_type
    index.restructure(index_type)
    assert index._faiss.nlist == module.ivf_lists(5000) and not index.outgrown()
    assert restructure_into(index, 1000, index_type) is None
    # A type a rebuild asked for stays whatever the size (the policy would make 5,000 vectors Flat at 20,000),
    # and is made again when outgrown; another chosen type is switched to.
    assert restructure_into(index, 20_000, index_type) == "Flat"
    assert restructure_into(index, 20_000, index_type, chosen=index_type) is None
    assert restructure_into(index, 1000, index_type, chosen="Flat") == "Flat"
    for key, vector in before.items():  # IVF-SQ8: the same 8-bit codes, made again from the same float16 vectors
        np.testing.assert_allclose(index._faiss.reconstruct(index._ids[object_id("b", key)]), vector, atol=4e-3)
    index._faiss.nprobe = index._faiss.nlist  # every list: the same answer as before, whatever the lists
    assert [o.key for o, _ in index.search(data[7], 10)][:5] == top[:5]


@pytest.mark.parametrize("index_type", ["IVF", "IVF-SQ8"])
def test_a_chosen_approximate_type_waits_for_a_vector_to_train_on(index: VectorIndex, index_type: str) -> None:
    """A rebuild of an empty bucket that asked for IVF left an empty Flat index with IVF chosen: each merge and each
    idle half second tried to restructure it, and failed with a traceback ("there are none yet")."""
    assert restructure_into(index, 1000, index_type, chosen=index_type) is None
    index.apply([upsert("k0", 1, 0)])
    assert restructure_into(index, 1000, index_type, chosen=index_type) == index_type
    index.restructure(index_type)
    assert index.index_type == index_type and index.search(unit(0), 1)[0][0].key == "k0"


def test_restructure_keeps_changes_made_while_it_trains(index: VectorIndex) -> None:
    index.apply([upsert(f"k{i}", 1, i) for i in range(40)])
    started = threading.Event()
    real_build = module.build_structure

    def slow_build(*args: object, **kwargs: object) -> object:
        started.set()
        structure = real_build(*args, **kwargs)
        index.apply([upsert("k2", 3, 102), delete("k3", 3), upsert("new", 1, 105), upsert("new", 2, 103)])
        return structure

    module.build_structure = slow_build  # type: ignore[assignment]
    try:
        index.restructure("IVF")
    finally:
        module.build_structure = real_build  # type: ignore[assignment]
    assert started.is_set() and index.index_type == "IVF"
    assert index.get("b", "k3") is None and index.get("b", "new") is not None
    np.testing.assert_allclose(index.vector("b", "k2"), unit(102), atol=1e-6)
    keys = {o.key for o, _ in index.search(unit(103), 50)}
    assert "new" in keys and "k3" not in keys
    assert index._faiss.ntotal == len(index) == 40  # the first "new" never reached either structure


@pytest.mark.parametrize("steps", [("IVF",), ("IVF", "IVF"), ("IVF-SQ8", "IVF"), ("IVF", "Flat"), ("IVF-SQ8",),
                                   ("IVF-SQ8", "IVF-SQ8")],
                         ids=["Flat->IVF", "IVF->IVF", "IVF-SQ8->IVF", "IVF->Flat", "Flat->IVF-SQ8",
                              "IVF-SQ8->IVF-SQ8"])
def test_merges_and_searches_between_the_chunks_of_a_restructure(steps: tuple[str, ...],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectors move a few at a time (``Moving``); between two chunks a merge replaces, deletes and adds objects
    wherever their vectors are, and a search or ``vector`` finds every object, moved or not. Into IVF-SQ8, the float16
    vector file ends up with every object's latest vector (from the old structure's, or the merge's); out of it, the
    new structure takes those, not the decoded codes, and the file goes."""
    dim, n = 16, 600
    data = clustered(n + 10, dim, 40)
    index = VectorIndex("m", dim)
    index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data[:n])])
    for step in steps[:-1]:
        index.restructure(step)
    monkeypatch.setattr(module, "CHUNK", 50)
    seen: list[tuple[int, int]] = []
    gone: list[str] = []
    real_lists_for = module.Moving.lists_for

    def between_chunks(moving: module.Moving, vectors: np.ndarray) -> np.ndarray | None:
        seen.append((moving.old.ntotal, moving.new.ntotal))
        if len(seen) == 4:  # some moved, some not: replace one of each, delete one of each, add one
            held = {key: moving._held(np.array([index._ids[object_id("b", key)]]))[0]
                    for key in (f"k{i}" for i in range(10, n))}
            moved, left = [k for k, h in held.items() if h][:2], [k for k, h in held.items() if not h][:2]
            assert len(moved) == len(left) == 2, (moved, left)
            gone.extend([moved[1], left[1]])
            index.apply([ResultEntry("upsert", "b", moved[0], "e2", "", 2, 1, "m", data[n]),
                         ResultEntry("upsert", "b", left[0], "e2", "", 2, 1, "m", data[n + 1]),
                         ResultEntry("delete", "b", moved[1], "", "", 2, 1),
                         ResultEntry("delete", "b", left[1], "", "", 2, 1),
                         ResultEntry("upsert", "b", "fresh", "e", "", 1, 1, "m", data[n + 2])])
        for key in ("k2", "k5", "fresh" if gone else "k9"):  # moved or not, each object is there
            vector = index.vector("b", key)
            assert vector is not None and index.search(vector, 1)[0][0].key == key
        assert not {o.key for o, _ in index.search(data[5], 50)} & set(gone)
        return real_lists_for(moving, vectors)

    monkeypatch.setattr(module.Moving, "lists_for", between_chunks)
    index.restructure(steps[-1])
    assert index.index_type == steps[-1] and not isinstance(index._faiss, module.Moving)
    assert len(seen) > 5 and all(old + new == n for old, new in seen[:4])
    assert index._faiss.ntotal == len(index) == n - 1  # 600, two deleted, one added
    assert all(index.get("b", key) is None for key in gone)
    for key, vector in (("fresh", data[n + 2]), ("k2", data[2])):
        np.testing.assert_allclose(index.vector("b", key), vector, atol=2e-3)  # float16 from IVF-SQ8, not its codes
        assert index.search(vector, 1)[0][0].key == key
    assert (index._file is not None) == (steps[-1] == "IVF-SQ8")
    if steps[-1] == "IVF-SQ8":
        latest = dict(zip((f"k{i}" for i in range(n)), data), fresh=data[n + 2])
        objects, vectors, _ = index.export()
        for obj, vector in zip(objects, vectors):
            if obj.etag == "e":  # not replaced
                np.testing.assert_array_equal(vector, latest[obj.key].astype(np.float16))


@pytest.mark.parametrize("old", ["Flat", "IVF"])
def test_a_restructure_that_fails_while_moving_keeps_serving_and_the_next_one_finishes_it(
        old: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dim, n = 16, 400
    data = clustered(n, dim, 30)
    index = VectorIndex("m", dim)
    index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(data)])
    if old != "Flat":
        index.restructure(old)
    monkeypatch.setattr(module, "CHUNK", 100)
    real_lists_for, calls = module.Moving.lists_for, []

    def fails_once(moving: module.Moving, vectors: np.ndarray) -> np.ndarray | None:
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("no room for the lists")
        return real_lists_for(moving, vectors)

    monkeypatch.setattr(module.Moving, "lists_for", fails_once)
    with pytest.raises(MemoryError):
        index.restructure("IVF")
    assert isinstance(index._faiss, module.Moving) and index.index_type == old  # part moved, both serve
    assert 0 < index._faiss.new.ntotal < n and index._faiss.ntotal == n
    assert [index.search(index.vector("b", f"k{i}"), 1)[0][0].key for i in range(0, n, 40)] == [
        f"k{i}" for i in range(0, n, 40)]
    index.restructure("IVF")
    assert index.index_type == "IVF" and index._faiss.ntotal == n and not index.outgrown()


def test_a_restructure_that_fails_is_tried_again_less_and_less_often(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A restructure that failed for want of memory (say) was tried again at every merged batch and twice a second
    while idle, each time with a traceback: now after 30 s, twice as long each time in a row, up to 10 minutes, and
    the log says when. The index serves as it was meanwhile."""
    index = VectorIndex("m", 16)
    vectors = clustered(40, 16, 20)
    index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", v) for i, v in enumerate(vectors)])
    tries: list[str] = []

    def fails(index_type: str, progress: object = None) -> None:
        tries.append(index_type)
        raise MemoryError("no room for the lists")

    monkeypatch.setattr(index, "restructure", fails)
    service = SimpleNamespace(index=index, settings=SimpleNamespace(approx_threshold=10), chosen_type=None,
                              backend=SimpleNamespace(approximate="IVF"), restructuring=threading.Lock(),
                              _restructure_wait=0.0, _restructure_at=0.0)
    service._restructure = lambda index_type: Service._restructure(service, index_type)  # type: ignore[arg-type]
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    def batches(seconds: float) -> None:
        """A merged batch every 0.5 s, for ``seconds``."""
        for _ in range(int(seconds * 2)):
            Service._restructure_due(service)  # type: ignore[arg-type]
            wait_for_release(service.restructuring)
            now[0] += 0.5

    batches(29)
    assert tries == ["IVF"] and "tried again in 30 s" in caplog.text
    batches(2)
    assert len(tries) == 2 and "tried again in 60 s" in caplog.text
    batches(3600)
    assert len(tries) == 10, tries  # at 90, 210, 450 and 930 s, then every 600 s: 1530, 2130, 2730, 3330
    assert index.index_type == "Flat" and index.search(index.vector("b", "k3"), 1)[0][0].key == "k3"
    monkeypatch.setattr(index, "restructure", lambda index_type, progress=None: tries.append("made"))
    batches(601)
    assert tries[-1] == "made" and service._restructure_wait == 0.0  # (a later failure waits 30 s again)


def wait_for_release(lock: threading.Lock) -> None:
    """The restructure thread's end (it releases ``lock``)."""
    with lock:
        pass


def test_a_chunk_that_leaves_the_old_structure_hands_its_memory_back() -> None:
    """A shrinking FAISS array keeps its capacity; ``release_pages`` frees the pages under what it no longer uses."""

    def resident_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * module.mmap.PAGESIZE / 2**20

    dim, n = 1280, 20_000  # 98 MB of vectors
    old = module.build_structure("Flat", dim, n, lambda: np.empty((0, dim), np.float32), ())
    rng = np.random.default_rng(0)
    for start in range(0, n, 5000):
        old.add_with_ids(rng.standard_normal((5000, dim)).astype(np.float32), np.arange(start, start + 5000))
    moving = module.Moving(old, module.build_structure("Flat", dim, 0, lambda: np.empty((0, dim), np.float32), ()),
                           "Flat")
    before = resident_mb()
    for _ in range(2):
        ids = moving.next_chunk(5000)
        vectors = moving.reconstruct_batch(ids)
        moving.move(ids, vectors, moving.lists_for(vectors))
        del ids, vectors
    module.release_freed_memory()
    assert moving.old.ntotal == moving.new.ntotal == n // 2
    grown = resident_mb() - before
    assert grown < 20, f"{grown:.0f} MB more resident after moving 49 MB of vectors: the old array kept them"


@pytest.mark.parametrize("structure", ["Flat", "IVF"])
def test_a_batch_reaches_faiss_in_one_call_each_and_changes_within_it_cancel(structure: str) -> None:
    index = VectorIndex("m", DIM)
    index.apply([upsert(f"k{i}", 1, i) for i in range(300)])
    if structure != "Flat":
        index.restructure(structure)
    calls: list[tuple[str, int]] = []
    faiss_index = index._faiss
    add, remove = faiss_index.add_with_ids, faiss_index.remove_ids
    faiss_index.add_with_ids = lambda v, ids: (calls.append(("add", len(ids))), add(v, ids))[1]
    faiss_index.remove_ids = lambda ids: (calls.append(("remove", len(ids))), remove(ids))[1]
    index.apply([
        upsert("k1", 2, 501), upsert("k1", 3, 502),  # replaced twice: the first replacement never reaches FAISS
        upsert("k2", 2, 503), delete("k2", 3),  # replaced, then deleted
        upsert("fresh", 1, 504), delete("fresh", 2),  # added and deleted in one batch: nothing to do
        upsert("other", 1, 505), delete("k4", 2),
    ])
    assert calls == [("remove", 3), ("add", 2)]  # k1, k2, k4 out; k1's last vector and "other" in
    assert faiss_index.ntotal == len(index) == 299
    np.testing.assert_allclose(index.vector("b", "k1"), unit(502), atol=1e-6)
    assert index.get("b", "k2") is None and index.get("b", "fresh") is None and index.get("b", "k4") is None
    assert index.search(unit(505), 1)[0][0].key == "other"


def test_searches_run_together_and_a_waiting_merge_goes_first() -> None:
    lock = module.ReadWriteLock()
    order: list[str] = []
    with lock.read():
        with lock.read():  # a second search does not wait for the first
            order.append("two readers")

        def write() -> None:
            with lock.write():
                order.append("writer")

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 10
        while lock._writers_waiting == 0 and time.monotonic() < deadline:  # (a sleep stood in for this: a flake)
            time.sleep(0.001)
        assert lock._writers_waiting == 1  # the writer now waits for the first search to finish

        def late_read() -> None:
            with lock.read():
                order.append("late reader")

        reader = threading.Thread(target=late_read)
        reader.start()
        time.sleep(0.05)
        assert order == ["two readers"]  # neither the merge nor the late search ran inside the first search
    writer.join(5)
    reader.join(5)
    assert order == ["two readers", "writer", "late reader"]  # the waiting merge went before the late search



def test_local_features_are_committed_outside_the_write_lock() -> None:
    """SQLite's commit is most of a batch with features (``bench.merge_stall``): a search must not wait for it. The
    store's write searches from another thread; with the write lock still held that search would wait."""
    found: list[list[str]] = []

    class SearchingStore(FeatureStore):
        def write(self, puts: Sequence[tuple[str, str, bytes]], deletes: Iterable[str]) -> None:
            searcher = threading.Thread(target=lambda: found.append([o.key for o, _ in index.search(unit(1), 1)]))
            searcher.start()
            searcher.join(5)
            super().write(puts, deletes)

    index = VectorIndex("m", DIM, features=SearchingStore())
    index.apply([dataclasses.replace(upsert("k1", 1, 1), features=b"views")])
    assert found == [["k1"]]  # the batch was searchable while its features were being written
    assert index.features.get([("b/k1", "e")]) == {"b/k1": b"views"}  # and they were written before apply returned

def dated(key: str, seed: int, bucket: str = "b", when: float = 0.0, found: str = "") -> ResultEntry:
    return dataclasses.replace(upsert(key, 1, seed), bucket=bucket, modified=when, labels=found)


@pytest.fixture
def folders() -> VectorIndex:
    """600 objects in two buckets, three folders and three months; times unknown for some (older workers)."""
    index = VectorIndex("m", DIM)
    index.apply([dated(f"{('2023', '2024', 'misc')[i % 3]}/{i}", i, ("b", "c")[i % 2], 0.0 if i % 7 == 0 else
                       1_700_000_000 + (i % 3) * 2_600_000.0) for i in range(600)])
    return index


def exact_answer(index: VectorIndex, query: np.ndarray, where: Filter, k: int) -> list[str]:
    kept = [o for o in index.objects() if where.keeps(o.bucket, o.key, o.modified)]
    scored = sorted(kept, key=lambda o: -float(index.vector(o.bucket, o.key) @ query))  # type: ignore[operator]
    return [o.key for o in scored[:k]]


@pytest.mark.parametrize("structure", ["Flat", "IVF"])
@pytest.mark.parametrize("exact_limit", [10_000, 5])  # an exact scan of the kept objects, or a selector
@pytest.mark.parametrize("broad", [0.5, 2.0])  # half kept: applied to an unfiltered search's results, or not
def test_filters_keep_exactly_their_objects(folders: VectorIndex, structure: str, exact_limit: int, broad: float,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "EXACT_LIMIT", exact_limit)
    monkeypatch.setattr(module, "BROAD", broad)
    if structure == "IVF":
        folders.restructure("IVF")
        folders._faiss.nprobe = folders._faiss.nlist  # all lists: the selector path is then exact too
    query = unit(12345)
    for where in (Filter(prefix="2024/"), Filter(bucket="c"), Filter(bucket="b", prefix="misc/"),
                  Filter(after=1_702_000_000), Filter(before=1_702_000_000), Filter(prefix="2023/", after=1),
                  Filter(bucket="nope"), Filter(prefix="2025/"), Filter(after=1), Filter(bucket="b", after=1)):
        found = [o.key for o, _ in folders.search(query, 10, where=where)]
        assert found == exact_answer(folders, query, where, 10), where
        assert all(where.keeps(o.bucket, o.key, o.modified) for o, _ in folders.search(query, 300, where=where))


@pytest.mark.parametrize("keep", [[], [0], [7], [8], [3, 9, 600], list(range(0, 1000, 3))])
def test_the_selector_reads_only_its_bitmap(keep: list[int]) -> None:
    """FAISS's bitmap selector takes its size in bytes: given in bits, it read up to 8x past the bitmap, and a
    filtered search with a large k kept whatever ids that memory happened to mark (a whole-suite CI run)."""
    selector, bitmap = module.kept_selector(np.array(keep, np.int64))
    assert selector.n == len(bitmap)  # FAISS reads bitmap[id // 8] for every id // 8 < n
    assert [i for i in range(8 * len(bitmap) + 16) if selector.is_member(i)] == keep


@pytest.mark.parametrize("exact_limit", [10_000, 5])
def test_filters_keep_exactly_their_objects_while_the_vectors_move(folders: VectorIndex, exact_limit: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Half way through a Flat -> IVF move, a filtered search asks both structures (with a selector each, or an
    exact scan of the kept objects wherever their vectors are) and gets the exact answer."""
    monkeypatch.setattr(module, "EXACT_LIMIT", exact_limit)
    monkeypatch.setattr(module, "CHUNK", 100)
    real_lists_for, checked = module.Moving.lists_for, []

    def half_way(moving: module.Moving, vectors: np.ndarray) -> np.ndarray | None:
        if moving.old.ntotal and moving.new.ntotal and not checked:
            moving.new.nprobe = moving.new.nlist  # all lists: the selector path is then exact too
            query = unit(12345)
            for where in (Filter(prefix="2024/"), Filter(bucket="c"), Filter(after=1_702_000_000),
                          Filter(prefix="2023/", after=1)):
                found = [o.key for o, _ in folders.search(query, 10, where=where)]
                assert found == exact_answer(folders, query, where, 10), where
            checked.append(moving.new.ntotal)
        return real_lists_for(moving, vectors)

    monkeypatch.setattr(module.Moving, "lists_for", half_way)
    folders.restructure("IVF")
    assert checked and folders.index_type == "IVF"


@pytest.mark.parametrize("structure", ["Flat", "IVF", "IVF-SQ8"])
@pytest.mark.parametrize("exact_limit", [10_000, 5])  # an exact scan of the kept objects, or a selector
@pytest.mark.parametrize("broad", [0.5, 2.0])
def test_objects_of_equal_score_come_by_name_and_so_does_the_cut_at_k(folders: VectorIndex, structure: str,
                                                                    exact_limit: int, broad: float,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte-identical copies score alike, and they came in the structure's own order: k=1 answered one copy, k=2
    two others, and a filter that kept them all a third set (review 23)."""
    monkeypatch.setattr(module, "EXACT_LIMIT", exact_limit)
    monkeypatch.setattr(module, "BROAD", broad)
    copies = sorted(f"copies/c{i}" for i in range(12))
    folders.apply([dated(key, 777) for key in reversed(copies)])
    if structure != "Flat":
        folders.restructure(structure)
        folders._faiss.nprobe = folders._faiss.nlist
    for where in (None, Filter(prefix="copies/"), Filter(bucket="b")):
        for k in (1, 2, 3, 12, 13):
            found = [o.key for o, _ in folders.search(unit(777), k, where=where)]
            assert found[:12] == copies[:k], (where, k)
    found = [o.key for o, _ in folders.search(unit(777), 3, exclude=object_id("b", copies[0]))]
    assert found == copies[1:4]


def test_a_narrow_filter_still_returns_k_on_ivf(folders: VectorIndex) -> None:
    """IVF with its default probes would rarely see a folder holding 1 % of the objects; the exact scan does."""
    folders.apply([dated(f"tiny/{i}", 10_000 + i) for i in range(6)])
    folders.restructure("IVF")
    found = folders.search(unit(1), 5, where=Filter(prefix="tiny/"))
    assert len(found) == 5 and all(o.key.startswith("tiny/") for o, _ in found)


def test_a_bound_at_the_epoch_is_echoed_as_one() -> None:
    """The answer's filter said null for modified_after 1970-01-01 though it applied it (review 23)."""
    assert Filter(after=0.0).public()["modified_after"] == "1970-01-01T00:00:00Z"
    assert Filter(before=1.5).public()["modified_before"] == "1970-01-01T00:00:01.500000Z"


def test_unknown_times_are_outside_every_range(folders: VectorIndex) -> None:
    unknown = {o.key for o in folders.objects() if o.modified == 0}
    found = {o.key for o, _ in folders.search(unit(3), 600, where=Filter(after=1))}
    assert unknown and not unknown & found and len(found) == 600 - len(unknown)


def test_malformed_labels_keep_the_object_without_them() -> None:
    index = VectorIndex("m", DIM)
    index.apply([dated("k", 1, found="9999:2")])
    assert index.get("b", "k") is not None and index.get("b", "k").labels is None  # type: ignore[union-attr]


def test_searches_from_threads_started_later_use_the_configured_openmp_threads() -> None:
    import faiss

    index = VectorIndex("m", DIM)
    index.apply([upsert(f"k{i}", i, i) for i in range(20)])
    seen: list[int] = []

    def search() -> None:
        index.search(unit(1), 3)
        seen.append(faiss.omp_get_max_threads())

    module.set_search_threads(7)  # not any machine's default (one per core) that these tests run on
    try:
        thread = threading.Thread(target=search)  # like the HTTP thread pool's: started after the setting
        thread.start()
        thread.join()
        assert seen == [7]
    finally:
        module.set_search_threads(1)  # the service's default (BUCKETLENS_FAISS_THREADS) for the tests after


def test_a_restructure_says_how_far_it_got(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reindex job read done 0 until its end (minutes at 1M): the restructure tells its progress chunk by chunk."""
    monkeypatch.setattr(module, "CHUNK", 50)
    index = VectorIndex("m", DIM)
    index.apply([upsert(f"k{i}", 1, i) for i in range(180)])
    told: list[int] = []
    index.restructure("Flat", progress=told.append)
    assert told == [50, 100, 150, 180] and len(index) == 180
