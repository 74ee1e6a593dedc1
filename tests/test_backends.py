"""The index contract (``index_service/backend.py``), run against every backend: FAISS in this process, and a real
Milvus standalone server (the session's ``milvus_uri``: started once, never mocked, not Milvus Lite).

Each test gets its own namespace (a Milvus alias and collections of its own; a FAISS snapshot folder of its own) and
drops what it made. Answers are checked against an exact reference computed here, so "equal on both" means both
equal the same answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import tempfile
import time
import types
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
from pymilvus import MilvusClient

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.schemas import ResultEntry
from bucketlens.settings import INDEX_TYPES, Settings
from index_service.backend import TIES, Backend, Index, Indexed, nearest, open_backend
from index_service.feature_store import FeatureStore
from index_service.filters import Filter
from index_service.merger import Merger
from index_service.milvus_index import _alias_target
from index_service.service import Service, choose_type, chosen_type
from infra.stack import scratch_redis
from vision.models import recipe

MODEL = Settings().model
DIM = recipe(MODEL).dim


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def upsert(key: str, order: int, seed: int, etag: str = "e", bucket: str = "b", generation: int = 1,
           model: str = MODEL, **fields: Any) -> ResultEntry:
    return ResultEntry("upsert", bucket, key, etag, f"{order:x}", order, generation, model, unit(seed), **fields)


def delete(key: str, order: int, bucket: str = "b", generation: int = 1) -> ResultEntry:
    return ResultEntry("delete", bucket, key, "", "", order, generation)


def failed(key: str, order: int, etag: str = "bad", reason: str = "") -> ResultEntry:
    """A worker's note that this version of the key could not be indexed (not an image, corrupt, ...)."""
    return ResultEntry("failed", "b", key, etag, f"{order:x}", order, 1, reason=reason)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A throwaway real Redis for checkpoints (no persistence)."""
    folder = Path(tempfile.mkdtemp(prefix="bucketlens-redis-"))
    try:
        with scratch_redis(folder) as (url, _):
            yield url
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Fixture:
    """One backend under test, with what a test needs to open it again (a restart)."""

    def __init__(self, name: str, request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> None:
        namespace = f"c{uuid.uuid4().hex[:10]}"
        uri = request.getfixturevalue("milvus_uri") if name == "milvus" else ""
        self.settings = Settings(home=tmp_path, namespace=namespace, index_backend=name, milvus_uri=uri or
                                 Settings().milvus_uri, redis_url=redis_url)
        self.keys = Keys(namespace)
        self.redis = connect(redis_url)
        self.stores: dict[int, FeatureStore] = {}
        self.opened: list[Backend] = []

    def store(self, generation: int) -> FeatureStore:
        return self.stores.setdefault(generation, FeatureStore(self.settings.home / f"g{generation}.sqlite"))

    def open(self) -> Backend:
        backend = open_backend(self.settings, self.redis, self.keys, self.store)
        self.opened.append(backend)
        return backend

    def cleanup(self) -> None:
        connection = getattr(self.opened[0], "connection", None) if self.opened else None
        if connection is not None:  # drop this test's collections and alias
            client, alias = connection.client, self.opened[0].alias  # type: ignore[attr-defined]
            for name in client.list_collections():
                if name.startswith(f"{alias}_g"):
                    for other in client.list_aliases(name)["aliases"]:
                        client.drop_alias(other)
                    client.drop_collection(name)
        for backend in self.opened:  # after the drops: pymilvus shares one connection per address
            backend.close()
        self.redis.close()


@pytest.fixture(params=list(INDEX_TYPES))
def fixture(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[Fixture]:
    made = Fixture(request.param, request, redis_url, tmp_path)
    yield made
    made.cleanup()


@pytest.fixture
def index(fixture: Fixture) -> Index:
    return fixture.open().new_generation(MODEL, 1)


# -- semantics: one vector per object, replace, delete, order -----------------------------------------------


def test_search_finds_the_same_vector_first(index: Index) -> None:
    index.apply([upsert(f"k{i}", 1, i) for i in range(20)])
    (best, score), *_ = index.search(unit(7), 5)
    assert best.key == "k7" and score == pytest.approx(1.0, abs=1e-5) and len(index) == 20


def test_reupload_replaces(index: Index) -> None:
    index.apply([upsert("a", 1, 1, etag="old")])
    index.apply([upsert("a", 2, 2, etag="new")])
    assert len(index) == 1
    assert index.get("b", "a").etag == "new"  # type: ignore[union-attr]
    np.testing.assert_allclose(index.vector("b", "a"), unit(2), atol=1e-6)  # type: ignore[arg-type]
    assert [o.key for o, _ in index.search(unit(1), 5)] == ["a"]


def test_repeated_entry_is_harmless(index: Index) -> None:
    index.apply([upsert("a", 5, 1)] * 3)
    index.apply([upsert("a", 5, 1)])
    assert len(index) == 1 and len(index.search(unit(1), 5)) == 1


def test_older_entry_is_discarded(index: Index) -> None:
    index.apply([upsert("a", 2, 2, etag="new")])
    stats = index.apply([upsert("a", 1, 1, etag="old")])
    assert stats.stale == 1 and index.get("b", "a").etag == "new"  # type: ignore[union-attr]


def test_delete_removes_tombstone_holds_and_a_newer_upload_comes_back(index: Index) -> None:
    index.apply([upsert("a", 1, 1), upsert("z", 1, 9)])
    stats = index.apply([delete("a", 2)])
    assert stats.deleted == 1 and index.get("b", "a") is None and index.vector("b", "a") is None
    assert [o.key for o, _ in index.search(unit(1), 5)] == ["z"] and len(index) == 1
    stats = index.apply([upsert("a", 1, 1)])  # a late, duplicated event of the deleted version
    assert stats.stale == 1 and index.get("b", "a") is None
    index.apply([upsert("a", 3, 3, etag="again")])  # re-upload after delete
    assert index.get("b", "a").etag == "again" and len(index) == 2  # type: ignore[union-attr]
    _, _, tombstones = index.export()
    assert "b/a" not in tombstones


def test_a_newer_version_that_failed_takes_the_older_picture_out(index: Index) -> None:
    """A photo overwritten with a text, an empty or a truncated file stayed searchable under its key, its result
    linking to the new bytes (an independent check): a failed newer version now removes the older one."""
    index.apply([upsert("a", 1, 1, etag="photo"), upsert("z", 1, 9)])
    stats = index.apply([failed("a", 2)])
    assert stats.deleted == 1 and index.get("b", "a") is None and index.vector("b", "a") is None
    assert [o.key for o, _ in index.search(unit(1), 5)] == ["z"] and len(index) == 1
    assert index.apply([upsert("a", 1, 1, etag="photo")]).stale == 1  # a late event of the older version
    index.apply([upsert("a", 2, 2, etag="bad")])  # that very version, read on a retry, is indexed
    assert index.get("b", "a").etag == "bad"  # type: ignore[union-attr]
    stats = index.apply([failed("a", 2), failed("a", 1, etag="photo"), failed("q", 5)])  # the held one, an older
    assert stats.deleted == 0 and index.get("b", "a").etag == "bad" and len(index) == 2  # type: ignore[union-attr]
    # The held bytes themselves under a higher order (its event's sequencer, where a listing embedded it by its
    # time; an identical re-upload), whose task failed for a passing reason (S3 away, too slow): they stay.
    stats = index.apply([failed("a", 9, etag="bad")])
    assert stats.deleted == 0 and index.get("b", "a").etag == "bad"  # type: ignore[union-attr]


def test_a_version_that_failed_by_its_content_keeps_an_older_picture_merged_after_it_out(index: Index) -> None:
    """A photo overwritten with a text at once: the photo's task downloaded before the overwrite and finished after
    the text's failure, whose note found nothing held. The photo came back under a key that holds a text, until a
    reconcile (a code review). A failure by content now leaves a tombstone below its version's order."""
    stats = index.apply([failed("a", 2, reason="not_an_image"), failed("c", 2, reason="unreachable")])
    assert stats.deleted == 1 and len(index) == 0
    assert index.apply([upsert("a", 1, 1, etag="photo")]).stale == 1 and index.get("b", "a") is None
    index.apply([upsert("a", 2, 2, etag="bad")])  # that very version, read again (a newer decoder), is indexed
    assert index.get("b", "a").etag == "bad"  # type: ignore[union-attr]
    # A failure another attempt can undo (S3 away) says nothing about the bytes: the older picture is the best known
    # until that version is read, and leaves no tombstone that would keep it out.
    assert index.apply([upsert("c", 1, 3, etag="photo")]).upserted == 1


def test_delete_older_than_current_version_is_ignored(index: Index) -> None:
    index.apply([upsert("a", 5, 1)])
    index.apply([delete("a", 4)])
    assert index.get("b", "a") is not None


def test_delete_arriving_before_its_upsert(index: Index) -> None:
    index.apply([delete("a", 2)])
    stats = index.apply([upsert("a", 1, 1)])
    assert stats.stale == 1 and len(index) == 0 and index.search(unit(1), 5) == []


def test_within_one_batch_the_order_decides(index: Index) -> None:
    stats = index.apply([upsert("a", 3, 3, etag="new"), upsert("a", 1, 1, etag="old"), delete("a", 2),
                         delete("c", 5), upsert("c", 4, 4)])
    assert (stats.upserted, stats.stale, stats.deleted) == (1, 3, 1)
    assert index.get("b", "a").etag == "new" and index.get("b", "c") is None  # type: ignore[union-attr]


def test_wrong_model_or_dimension_is_rejected(index: Index) -> None:
    wrong_dim = ResultEntry("upsert", "b", "x", "e", "", 1, 1, MODEL, np.ones(4, dtype=np.float32) / 2)
    stats = index.apply([upsert("y", 1, 1, model="other"), wrong_dim])
    assert stats.rejected == 2 and len(index) == 0


def test_tombstones_expire_after_retention(index: Index) -> None:
    index.apply([upsert("a", 1, 1)])
    index.apply([delete("a", 2)])
    assert index.expire_tombstones(3600) == 0
    assert index.apply([upsert("a", 1, 1)]).stale == 1
    assert index.expire_tombstones(-1) == 1  # everything is older than "in one second"
    _, _, tombstones = index.export()
    assert tombstones == {}


# -- reading -----------------------------------------------------------------------------------------------


def test_search_by_key_excludes_the_query_object_and_search_many(index: Index) -> None:
    index.apply([upsert(f"k{i}", 1, i) for i in range(6)])
    hits = index.search(index.vector("b", "k3"), 3, exclude="b/k3")  # type: ignore[arg-type]
    assert len(hits) == 3 and all(obj.key != "k3" for obj, _ in hits)
    many = index.search_many(np.stack([unit(1), unit(2)]), 2, ["b/k1", None])
    assert [o.key for o, _ in many[1]][:1] == ["k2"] and all(o.key != "k1" for o, _ in many[0])


def test_objects_of_equal_score_come_by_name_and_so_does_the_cut_at_k(index: Index) -> None:
    """Byte-identical copies score alike; Milvus and FAISS each answered them in an order of their own, and k=1 was
    not the start of k=2 (review 23). The tie group across the cut is fetched whole (here past the first fetch)."""
    copies = sorted(f"copies/c{i}" for i in range(12))
    index.apply([upsert(key, 1, 5) for key in reversed(copies)] + [upsert(f"k{i}", 1, 100 + i) for i in range(20)])
    for k in (1, 2, 5, 12):
        assert [o.key for o, _ in index.search(unit(5), k)] == copies[:k], k
    assert [o.key for o, _ in index.search(unit(5), 2, exclude="b/" + copies[0])] == copies[1:3]


def test_a_tie_across_the_cut_is_fetched_whole_before_the_cut() -> None:
    tied = [Indexed("b", f"t{i:02}", "e", "", i, 1, 0, None, 0.0) for i in range(30)]
    asked: list[int] = []

    def fetch(n: int) -> list[list[tuple[Indexed, float]]]:  # the structure's own order: names backwards
        asked.append(n)
        return [[(obj, 1.0) for obj in reversed(tied)][:n]]

    assert [o.key for o, _ in nearest(fetch, 2, [None])[0]] == ["t00", "t01"]
    assert asked == [3, 6, 12, 24, 48]  # until the last fetched scored below the cut, or all came
    asked.clear()
    assert [o.key for o, _ in nearest(fetch, 2, ["b/t00"])[0]] == ["t01", "t02"]
    many = [Indexed("b", f"m{i:03}", "e", "", i, 1, 0, None, 0.0) for i in range(200)]
    asked.clear()
    nearest(lambda n: asked.append(n) or [[(obj, 1.0) for obj in many][:n]], 2, [None])
    assert asked[-1] == 2 + TIES  # and no further: a tie of more objects than that is cut where the fetch ends


def test_objects_buckets_and_export(index: Index) -> None:
    index.apply([upsert("a", 1, 1, pixels=640 * 480, labels="281:0.5,285:0.25", modified=1_700_000_000.5),
                 upsert("x/ü \"q\"\\.jpg", 2, 2, bucket="other")])
    index.apply([delete("gone", 7)])
    assert index.buckets() == {"b", "other"}
    objects = {o.key: o for o in index.objects()}
    assert set(objects) == {"a", "x/ü \"q\"\\.jpg"}
    a = objects["a"]
    assert (a.bucket, a.etag, a.sequencer, a.order, a.generation, a.pixels, a.labels, a.modified) == (
        "b", "e", "1", 1, 1, 640 * 480, ((281, 0.5), (285, 0.25)), 1_700_000_000.5)
    assert index.etags(["b/a", "other/x/ü \"q\"\\.jpg", "b/gone", "b/never"]) == {
        "b/a": "e", "other/x/ü \"q\"\\.jpg": "e"}
    exported, vectors, tombstones = index.export()
    assert {o.key for o in exported} == set(objects) and vectors.shape == (2, DIM)
    assert set(tombstones) == {"b/gone"} and tombstones["b/gone"][0] == 7
    for obj, vector in zip(exported, vectors):
        np.testing.assert_allclose(vector, index.vector(obj.bucket, obj.key), atol=1e-6)  # type: ignore[arg-type]


def test_a_pending_mark_stays_until_both_generations_hold_its_version(fixture: Fixture) -> None:
    """During a rebuild ingest sends a live upload to both generations under one pending mark. The first result
    dropped it, and the other generation's task, if lost, was never sent again (an independent review)."""
    backend = fixture.open()
    service = types.SimpleNamespace(index=backend.new_generation(MODEL, 1), shadow=backend.new_generation(MODEL, 2))
    merger = Merger(fixture.redis, fixture.keys, apply=lambda entries: None,
                    owed=lambda entries: Service.owed(service, entries))  # type: ignore[arg-type]
    mark = json.dumps({"etag": "en", "order": "5", "queued": time.time(), "event_time": ""})

    def merged(entry: ResultEntry) -> bool:
        """Whether the mark is gone once ``entry`` is applied to its generation."""
        (service.index if entry.generation == 1 else service.shadow).apply([entry])
        merger._clear_pending([entry])
        return fixture.redis.hget(fixture.keys.pending, "b/new") is None

    fixture.redis.hset(fixture.keys.pending, "b/new", mark)
    assert not merged(upsert("new", 5, 1, etag="en", generation=1)), "dropped before the shadow held it"
    assert merged(upsert("new", 5, 2, etag="en", generation=2))
    fixture.redis.hset(fixture.keys.pending, "b/new", mark.replace('"en"', '"e2"').replace('"5"', '"6"'))
    assert not merged(upsert("new", 6, 3, etag="e2", generation=2)), "dropped before the serving one held it"
    assert merged(upsert("new", 6, 3, etag="e2", generation=1))
    service.shadow = None  # no rebuild: the serving generation's result is the only one
    fixture.redis.hset(fixture.keys.pending, "b/later", json.dumps({"etag": "e2", "order": "7", "queued": 0}))
    service.index.apply([upsert("later", 7, 4, etag="e2")])
    merger._clear_pending([upsert("later", 7, 4, etag="e2")])
    assert fixture.redis.hget(fixture.keys.pending, "b/later") is None
    # Review 66: a result of the generation a swap retired is dropped; it took the mark away while the generation
    # swapped in lacked the version, whose own task, if lost, the sweep then had no mark to send again by.
    service.index = backend.new_generation(MODEL, 3)  # generation 1 retired
    fixture.redis.hset(fixture.keys.pending, "b/swapped", json.dumps({"etag": "e3", "order": "8", "queued": 0}))
    merger._clear_pending([upsert("swapped", 8, 5, etag="e3", generation=1)])
    assert fixture.redis.hget(fixture.keys.pending, "b/swapped") is not None, "dropped, and the serving one lacks it"
    service.index.apply([upsert("swapped", 8, 5, etag="e3", generation=3)])
    merger._clear_pending([upsert("swapped", 8, 5, etag="e3", generation=3)])
    assert fixture.redis.hget(fixture.keys.pending, "b/swapped") is None
    # Review 68: a newer version's mark, written between the merger's read of the marks and its delete, stays.
    newer = json.dumps({"etag": "e9", "order": "9", "queued": 0})
    fixture.redis.hset(fixture.keys.pending, "b/raced", json.dumps({"etag": "e8", "order": "8", "queued": 0}))
    racing = Merger(fixture.redis, fixture.keys, apply=lambda entries: None,
                    owed=lambda entries: (fixture.redis.hset(fixture.keys.pending, "b/raced", newer), set())[1])
    racing._clear_pending([upsert("raced", 8, 6, etag="e8", generation=3)])
    assert fixture.redis.hget(fixture.keys.pending, "b/raced") == newer.encode()


@pytest.fixture
def folders(index: Index) -> Index:
    """240 objects in two buckets, three folders and three months; times unknown for some (older workers)."""
    index.apply([upsert(f"{('2023', '2024', 'misc')[i % 3]}/{i}", 1, i, bucket=("b", "c")[i % 2],
                        modified=0.0 if i % 7 == 0 else 1_700_000_000 + (i % 3) * 2_600_000.0,
                        labels=f"281:{0.3 + i / 1000:g},285:0.3" if i % 5 == 0 else "400:0.5" if i % 5 == 1 else "")
                 for i in range(240)])
    return index


def exact(index: Index, query: np.ndarray, where: Filter, k: int) -> list[str]:
    _, vectors, _ = index.export()
    objects, _, _ = index.export()
    scored = sorted(((float(v @ query), o.key) for o, v in zip(objects, vectors) if where.keeps(o.bucket, o.key,
                                                                                                   o.modified)),
                    reverse=True)
    return [key for _, key in scored[:k]]


FILTERS = [Filter(prefix="2024/"), Filter(bucket="c"), Filter(bucket="b", prefix="misc/"), Filter(prefix="2024/1"),
           Filter(after=1_702_000_000), Filter(before=1_702_000_000), Filter(prefix="2023/", after=1),
           Filter(bucket="nope"), Filter(prefix="2025/")]


@pytest.mark.parametrize("where", FILTERS, ids=str)
def test_filters_keep_exactly_their_objects(folders: Index, where: Filter) -> None:
    query = unit(12345)
    assert [o.key for o, _ in folders.search(query, 10, where=where)] == exact(folders, query, where, 10)
    assert all(where.keeps(o.bucket, o.key, o.modified) for o, _ in folders.search(query, 240, where=where))


def test_text_search_and_label_counts(folders: Index) -> None:
    expected = sorted((sum(p for _, p in o.labels), o.bucket, o.key) for o in folders.objects()
                      if o.labels and o.labels[0][0] == 281)[::-1]  # distinct scores: one right answer
    found = folders.text_search({281, 285}, 10)
    assert [(o.bucket, o.key) for o, _ in found] == [(b, k) for _, b, k in expected[:10]]
    assert [s for _, s in found] == pytest.approx([s for s, _, _ in expected[:10]])
    narrowed = folders.text_search({281}, 100, Filter(bucket="c", prefix="2023/"))
    assert narrowed and all(o.bucket == "c" and o.key.startswith("2023/") for o, _ in narrowed)
    assert folders.label_counts() == {281: 48, 285: 48, 400: 48}
    folders.apply([delete(o.key, 2, bucket=o.bucket) for o, _ in folders.text_search({400}, 1000)])
    assert folders.text_search({400}, 10) == [] and folders.label_counts() == {281: 48, 285: 48}


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_milvus_label_counts_are_one_pass_per_while_and_the_writer_sees_its_own_writes(folders: Index) -> None:
    """Autocomplete asks at each keystroke, and on Milvus each answer was a pass over every labelled row."""
    index: Any = folders
    passes = []
    scan = index._scan
    index._scan = lambda expr, fields: passes.append(expr) or scan(expr, fields)
    assert index.label_counts() == index.label_counts() == {281: 48, 285: 48, 400: 48} and len(passes) == 1
    index.apply([delete(o.key, 2, bucket=o.bucket) for o, _ in index.text_search({400}, 1000)])
    assert index.label_counts() == {281: 48, 285: 48} and len(passes) == 3  # (text_search scans too)


def test_text_search_cuts_ties_by_name_on_every_backend(index: Index) -> None:
    """Probabilities are kept to 4 places, so ties are common: FAISS cut the objects tied at the k-th score by
    internal id (k=3 was not the start of k=5) and Milvus by name (an independent review). Both cut by name."""
    index.apply([upsert(f"a{i:02}", 1, i, labels="207:1") for i in (11, 3, 7, 0, 9, 1, 5, 10, 2, 8, 4, 6)]
                + [upsert("best", 1, 99, labels="207:1,208:0.5")])
    assert [o.key for o, _ in index.text_search({207, 208}, 3)] == ["best", "a00", "a01"]
    assert [o.key for o, _ in index.text_search({207}, 5)] == ["a00", "a01", "a02", "a03", "a04"]


# -- generations: restructure, checkpoint and restart, rebuild swap, abandon --------------------------------


def test_restructure_to_the_approximate_type_keeps_every_object(fixture: Fixture) -> None:
    backend = fixture.open()
    index = backend.new_generation(MODEL, 1)
    index.apply([upsert(f"k{i}", 1, i) for i in range(300)])
    index.apply([delete("k0", 2)])
    index.restructure(backend.approximate)
    assert index.index_type == backend.approximate and len(index) == 299
    assert index.search(unit(7), 1)[0][0].key == "k7"
    assert index.apply([upsert("k0", 1, 0)]).stale == 1  # tombstones came along
    backend.checkpoint(index, "9-0")
    again = fixture.open().load()
    assert again is not None and again[0].index_type == backend.approximate and len(again[0]) == 299


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_a_milvus_restructure_whose_writer_lost_the_lease_leaves_the_alias_alone(fixture: Fixture) -> None:
    """Review 53: a replica that lost the writer lease during a restructure's copy still moved the alias and retired
    the old collection, into which the new writer went on merging: dropped 30 s later, with what it had merged."""
    backend = fixture.open()
    index = backend.new_generation(MODEL, 1)
    index.apply([upsert(f"k{i}", 1, i) for i in range(30)])
    client, alias, served = index.connection.client, index.alias, index.collection  # type: ignore[attr-defined]
    named = _alias_target(client, alias)
    backend.stopped_writing(index)  # the role thread saw the lease go while the copy ran
    with pytest.raises(RuntimeError, match="lost the writer lease"):
        index.restructure(backend.approximate)
    assert index.collection == served and _alias_target(client, alias) == named  # type: ignore[attr-defined]
    assert [name for name in client.list_collections() if name.startswith(f"{alias}_g")] == [served]


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_a_milvus_connection_closed_under_the_index_is_made_again(fixture: Fixture) -> None:
    """pymilvus shares one connection per address: another client of it in the process closing its own closed the
    index's too, and every search answered 503 ("should create connection first") until a restart."""
    index = fixture.open().new_generation(MODEL, 1)
    index.apply([upsert(f"k{i}", 1, i) for i in range(5)])
    other = MilvusClient(fixture.settings.milvus_uri)
    assert other._using == index.connection.client._using  # type: ignore[attr-defined]  # (the shared one)
    other.close()
    assert [o.key for o, _ in index.search(unit(3), 1)] == ["k3"]
    index.apply([upsert("k9", 2, 9)])
    assert index.get("b", "k9") is not None


def test_an_approximate_index_answers_k_whenever_the_filter_keeps_that_many(fixture: Fixture) -> None:
    """Milvus's HNSW answered fewer than k with tombstone rows or under a filter (624 of 672 unfiltered, 54 of 59
    under a prefix, in an independent check); at most ``EXACT_LIMIT`` kept objects are scanned exactly instead."""
    backend = fixture.open()
    index = backend.new_generation(MODEL, 1)
    index.apply([upsert(f"{'ab'[i % 2]}/{i}", 1, i) for i in range(700)])
    index.apply([delete(f"a/{i}", 2) for i in range(0, 140, 2)])  # 70 tombstones
    index.restructure(backend.approximate)
    assert len(index.search(unit(3), 1000)) == 630
    assert len(index.search(unit(3), 300, where=Filter(prefix="b/"))) == 300
    under = index.search(unit(3), 400, where=Filter(prefix="a/"))
    assert len(under) == 280 and [o.key for o, _ in under[:10]] == exact(index, unit(3), Filter(prefix="a/"), 10)


def test_checkpoint_and_restart_give_the_same_index(fixture: Fixture) -> None:
    backend = fixture.open()
    assert backend.load() is None
    index = backend.new_generation(MODEL, 1)
    index.apply([upsert(f"k{i}", 1, i, labels="281:0.5") for i in range(30)])
    index.apply([delete("k3", 2)])
    backend.checkpoint(index, "123-4")
    loaded = fixture.open().load()
    assert loaded is not None
    again, last_id = loaded
    assert last_id == "123-4" and (again.model, again.dim, again.generation) == (MODEL, DIM, 1)
    assert sorted(o.key for o in again.objects()) == sorted(o.key for o in index.objects())
    assert again.apply([upsert("k3", 1, 3)]).stale == 1  # the tombstone survived the restart
    assert again.search(unit(5), 1)[0][0].key == "k5" and again.label_counts() == {281: 29}


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_a_reader_following_the_writer_says_which_collection_it_serves_once(fixture: Fixture,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A replica that reads loads the alias's collection every few seconds (``service._follow``): one INFO line for
    each collection it finds, not one per load."""
    writer = fixture.open()
    writer.new_generation(MODEL, 1)
    reader = fixture.open()
    with caplog.at_level(logging.INFO, logger="index_service.milvus_index"):
        for _ in range(3):
            assert reader.load() is not None
        said = [r for r in caplog.records if r.getMessage().startswith("serving Milvus collection")]
        assert len(said) == 1, [r.getMessage() for r in said]


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_a_reader_follows_the_writer_off_a_collection_already_dropped(fixture: Fixture) -> None:
    """A replica that reads found a swap by comparing counts, read from its current collection: once the writer had
    dropped that (the reader paused past a rebuild's swap; a reindex to the same type and size), every comparison
    failed, and every search answered 500 until a restart (review 21)."""
    writer = fixture.open()
    index = writer.new_generation(MODEL, 1)
    index.apply([upsert(f"k{i}", 1, i) for i in range(5)])
    reader = fixture.open()
    loaded = reader.load()
    assert loaded is not None
    current = loaded[0]
    assert reader.moved_from(current) is None  # nothing moved
    old = index.collection  # type: ignore[attr-defined]
    index.restructure(index.index_type)  # the same type and size, in a new collection
    writer.connection.client.drop_collection(old)  # type: ignore[attr-defined]  # (drop_later's, come early)
    fresh = reader.moved_from(current)
    assert fresh is not None and fresh.collection == index.collection and len(fresh) == 5  # type: ignore[attr-defined]
    assert fresh.search(unit(3), 1)[0][0].key == "k3"


def test_orders_past_64_bits_keep_the_order_rule(fixture: Fixture) -> None:
    """An opaque sequencer can be any size (ingest takes up to 64 hex digits; AWS's pass 2**63 in 2038): Milvus kept
    ``order`` as INT64, could not write such a row, and the merger retried that batch forever."""
    backend = fixture.open()
    index = backend.new_generation(MODEL, 1)
    big = 2**64 + 5
    index.apply([upsert("a", big, 1, etag="new"), upsert("b", 2**200, 2), upsert("c", 3, 3)])
    assert index.apply([upsert("a", big - 1, 4, etag="old")]).stale == 1
    index.apply([delete("b", 2**200 + 1)])
    assert index.apply([upsert("b", 2**200, 2)]).stale == 1  # the tombstone's order holds
    backend.checkpoint(index, "3-0")
    loaded = fixture.open().load()
    assert loaded is not None
    assert sorted((o.key, o.etag, o.order) for o in loaded[0].objects()) == [("a", "new", big), ("c", "e", 3)]
    assert loaded[0].search(unit(1), 1)[0][0].order == big
    assert loaded[0].apply([upsert("b", 2**200, 2)]).stale == 1  # and so after a restart


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_a_schema_1_collection_is_still_served_and_a_reindex_moves_it_to_text_orders(fixture: Fixture) -> None:
    """Collections made before orders were text (schema 1, INT64) load and merge as before; an order past 2**63
    there is refused with what to do, and ``rebuild --reindex`` copies the collection, tombstones too, into the
    current schema."""
    from index_service.milvus_index import SCHEMA, collection_name

    backend: Any = fixture.open()
    name = collection_name(backend.alias, 1)
    backend.connection.create(name, MODEL, DIM, 1, "Flat", layout=1)
    backend.connection.client.create_alias(name, backend.alias)
    loaded = backend.load()
    assert loaded is not None
    index = loaded[0]
    assert index.layout == 1
    index.apply([upsert("a", 5, 1), upsert("b", 6, 2)])
    index.apply([delete("b", 7)])
    assert index.apply([upsert("a", 4, 3)]).stale == 1
    with pytest.raises(ValueError, match="rebuild --reindex"):
        index.apply([upsert("c", 2**63, 3)])
    index.restructure("Flat")
    assert index.layout == SCHEMA == 2
    index.apply([upsert("c", 2**63, 3)])
    assert index.apply([upsert("b", 6, 2)]).stale == 1  # the tombstone came along
    backend.checkpoint(index, "4-0")
    again = fixture.open().load()
    assert again is not None and again[0].layout == 2  # type: ignore[attr-defined]
    assert sorted((o.key, o.order) for o in again[0].objects()) == [("a", 5), ("c", 2**63)]


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_old_rows_left_beside_a_key_count_once_and_a_replay_deletes_them(fixture: Fixture) -> None:
    """Milvus 2.3 can keep an object's old row beside its new one (its upsert is a delete and an insert; seen after
    a writer was killed mid-merge, tests/test_recovery.py, 1 run in 3), and ``count(*)`` counts both. The restart's
    replay, which writes each entry again, deletes the old rows; the writer counts live objects one per key."""
    backend = fixture.open()
    index: Any = backend.new_generation(MODEL, 1)
    index.apply([upsert("gone", 1, 1), upsert("kept", 1, 2, etag="old"), upsert("other", 1, 3)])
    batch = [delete("gone", 2), upsert("kept", 2, 4, etag="new")]
    # The batch inserted without deleting the rows it replaces: an old row beside each current one. (No checkpoint
    # before the restart: it would repair them, the next test.)
    index.connection.client.insert(index.collection, [index._tombstone(batch[0], 2, time.time()),
                                                      index._row(batch[1])])
    left = fixture.open().load()
    assert left is not None and left[0].get("b", "gone") is not None and len(left[0]) == 4  # the state is real

    left[0].apply(batch)  # the replay
    assert len(left[0]) == 2  # the writer's count
    backend.checkpoint(left[0], "2-0")
    again = fixture.open().load()
    assert again is not None and again[0].get("b", "gone") is None and len(again[0]) == 2
    assert sorted((o.key, o.etag) for o in again[0].objects()) == [("kept", "new"), ("other", "e")]
    assert "gone" not in {o.key for o, _ in again[0].search(unit(1), 3)}


def test_a_writer_counts_keys_not_rows_and_each_by_its_newest_row_seen() -> None:
    """What a scan of a collection with old rows beside new ones was seen to answer (CI: 1,294 rows for 1,281 keys,
    and no repair, when the tally counted rows): a key's two rows in one page, in either order. Pure logic: the
    scan is a list."""
    from index_service.milvus_index import MilvusIndex

    index: Any = object.__new__(MilvusIndex)  # no server: only ``_tally`` runs, over the rows below
    rows = [{"oid": "b/gone", "order": 1, "deleted": False}, {"oid": "b/gone", "order": 2, "deleted": True},
            {"oid": "b/kept", "order": 3, "deleted": False}, {"oid": "b/kept", "order": 1, "deleted": False},
            {"oid": "b/back", "order": 2, "deleted": True}, {"oid": "b/back", "order": 4, "deleted": False},
            {"oid": "b/one", "order": 1, "deleted": False}]
    index._scan = lambda expr, fields: iter(rows)
    index._tally()
    assert (index._count, index._keys) == (3, 4)  # kept, back, one live; gone's newest row is its tombstone


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_a_checkpoint_writes_each_key_with_two_rows_again_with_its_newest(fixture: Fixture) -> None:
    """Old rows that no replay rewrites (tests/test_replicas.py: versions only a killed writer had written, beside
    its successor's newer ones) are found by the successor's checkpoint and written again with the newest row of
    their key."""
    backend = fixture.open()
    index: Any = backend.new_generation(MODEL, 1)
    old = [upsert("kept", 1, 1, etag="old"), upsert("gone", 2, 2, etag="old"), upsert("back", 3, 3, etag="old")]
    index.apply([*old, delete("back", 4), *(upsert(f"k{i}", 5, 10 + i) for i in range(3000))])
    index.apply([upsert("kept", 6, 6, etag="new"), delete("gone", 7), upsert("back", 8, 8, etag="new")])
    client, everything = index.connection.client, 'oid != ""'
    # What Milvus was seen to leave: each old version back beside the newest row of its key, and a key twice alike.
    client.flush(index.collection)
    client.insert(index.collection, [index._row(entry) for entry in old] + [index._row(upsert("k7", 5, 17))])
    client.flush(index.collection)  # sealed, each row in its own segment: a scan's page then holds both
    assert index._rows(everything) == 3003 + 4
    assert len(fixture.open().load()[0]) == 3002 + 4  # type: ignore[index]  # a reader counts rows: the state is real

    # The checkpoint is a successor's (a killed writer's): it counts before its first batch, with the two rows there
    # already, and a key's two rows can come in one page of its scan (counted as two keys, nothing was repaired).
    successor = fixture.open()
    writer: Any = successor.load()[0]  # type: ignore[index]
    writer.apply([upsert("k1", 5, 11)])  # stale: no write, but the count is taken
    assert writer._keys == 3003  # (its live count may be one off: the scan can answer "gone"'s old row alone)
    successor.checkpoint(writer, "1-0")
    assert successor.last is not None and successor.last["repaired_objects"] == 4  # type: ignore[attr-defined]
    assert len(writer) == 3002
    assert index._rows(everything) == 3003
    reader = fixture.open().load()
    assert reader is not None and len(reader[0]) == 3002
    assert reader[0].get("b", "gone") is None
    assert {key: reader[0].get("b", key).etag for key in ("kept", "back")} == {"kept": "new", "back": "new"}
    for seed, key in ((1, "kept"), (2, "gone"), (3, "back")):  # searched with the old vector: the old row is gone
        assert [(o.key, o.etag) for o, _ in reader[0].search(unit(seed), 3) if o.key == key] in ([], [(key, "new")])
    successor.checkpoint(writer, "2-0")
    assert successor.last["repaired_objects"] == 0  # type: ignore[attr-defined,index]


def test_rebuild_swaps_generations_and_a_cancelled_one_leaves_nothing(fixture: Fixture) -> None:
    backend = fixture.open()
    serving = backend.new_generation(MODEL, 1)
    serving.apply([upsert(f"k{i}", 1, i) for i in range(10)])
    backend.checkpoint(serving, "1-0")
    shadow = backend.new_generation(MODEL, 2)
    shadow.apply([upsert(f"k{i}", 2, 100 + i, generation=2) for i in range(5)])
    before = fixture.open().load()
    assert before is not None and before[0].generation == 1 and len(before[0]) == 10  # generation 1 still serves
    backend.promote(serving, shadow)
    if fixture.settings.index_backend == "faiss":  # a restart before the new one's first snapshot restores the old one
        assert serving.features.path is not None and serving.features.path.exists()
    backend.checkpoint(shadow, "5-0")
    backend.retire(serving)
    assert serving.features.path is None or not serving.features.path.exists()
    loaded = fixture.open().load()
    assert loaded is not None and loaded[0].generation == 2 and len(loaded[0]) == 5
    assert loaded[0].search(unit(102), 1)[0][0].key == "k2"
    abandoned = backend.new_generation(MODEL, 3)
    abandoned.apply([upsert("x", 1, 1, generation=3)])
    backend.discard(abandoned)
    assert abandoned.features.path is None or not abandoned.features.path.exists()
    interrupted = backend.new_generation(MODEL, 4)  # a rebuild that a restart interrupted
    interrupted.apply([upsert("y", 1, 1, generation=4)])
    reopened = fixture.open().load()
    assert reopened is not None and reopened[0].generation == 2 and len(reopened[0]) == 5
    dropped = fixture.open().drop_abandoned(reopened[0])
    if fixture.settings.index_backend == "milvus":  # also the swapped-out generation 1, if not dropped yet
        assert interrupted.collection in dropped and reopened[0].collection not in dropped  # type: ignore[attr-defined]
    else:
        assert dropped == []


@pytest.mark.parametrize("fixture", ["milvus"], indirect=True)
def test_a_milvus_namespace_never_drops_the_collections_of_another_that_starts_like_it(fixture: Fixture) -> None:
    """Namespace `prod`'s start-up took namespace `prod-gallery`'s collections (`bucketlens_prod_gallery_g...`
    starts with `bucketlens_prod_g`) for abandoned ones of its own, and dropped the other's serving index."""
    gallery = dataclasses.replace(fixture.settings, namespace=fixture.settings.namespace + "-gallery")
    other = open_backend(gallery, fixture.redis, Keys(gallery.namespace), fixture.store)
    fixture.opened.append(other)  # (its collections start like the fixture's: its cleanup drops them)
    theirs = other.new_generation(MODEL, 1)
    theirs.apply([upsert(f"k{i}", 1, i) for i in range(3)])
    other.checkpoint(theirs, "1-0")
    backend = fixture.open()
    ours = backend.new_generation(MODEL, 1)
    ours.apply([upsert("mine", 1, 7)])
    backend.checkpoint(ours, "1-0")
    interrupted = backend.new_generation(MODEL, 2)  # (a rebuild a restart interrupted: abandoned, of ours)
    assert backend.drop_abandoned(ours) == [interrupted.collection]  # type: ignore[attr-defined]
    fixture.opened.append(reader := open_backend(gallery, fixture.redis, Keys(gallery.namespace), fixture.store))
    loaded = reader.load()  # (as that namespace's restart finds it)
    assert loaded is not None and len(loaded[0]) == 3 and loaded[0].search(unit(2), 1)[0][0].key == "k2"


def test_a_generation_of_another_model_never_mixes(fixture: Fixture) -> None:
    index = fixture.open().new_generation("efficientnet-lite1", 1)
    stats = index.apply([upsert("a", 1, 1), upsert("b", 1, 2, model="efficientnet-lite1")])
    assert stats.rejected == 1 and len(index) == 1 and index.get("b", "b") is not None




class RpcFailed(grpc.RpcError):
    """What pymilvus passes on as it is from grpc, not as a MilvusException: a search whose ``timeout`` passed, a
    stream the server cut when it was killed (a grpc.Call too, whose other methods are left out here)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_milvus_that_dies_while_starting_says_why(tmp_path: Path) -> None:
    """A whole-suite run's Milvus aborted as it started, and the error quoted the log's tail: goroutine dumps of its
    embedded etcd, not the line that said why."""
    from infra import milvus

    log = tmp_path / "logs" / "milvus.out"
    log.parent.mkdir()
    log.write_text("starting\nfatal error: concurrent map writes\n\ngoroutine 189 [runnable]:\n" + "\tframe\n" * 40)
    died = types.SimpleNamespace(poll=lambda: -6, returncode=-6)
    with pytest.raises(RuntimeError, match="exited with -6 while starting: fatal error: concurrent map writes; "):
        milvus.wait_ready(tmp_path, died, timeout_s=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("code, message", [
    (1502, "fail to search on all shard leaders, err=context canceled"), (1502, "shard delegator not found"),
    (1502, "channel not available"), (1502, "collection not loaded[collection=1]"), (1502, "server unavailable"),
    (1, "segment lacks[segment=445]"), (1, "collection on recovering"),
    # By Milvus's code alone (pkg/util/merr): the wording varies by version and by which node answers.
    (602, "fail to search on QueryNode 1"), (501, "fail to search"), (401, "failed to get shard leaders"),
    (10001, "failed to search"),
    # A server killed mid-call: pymilvus wraps grpc's error on the channel it closed as its "Unexpected error".
    (1, "Unexpected error, message=<Cannot invoke RPC on closed channel!>")])
def test_a_milvus_that_is_coming_back_is_unavailable_not_an_error(code: int, message: str) -> None:
    """While a restarted Milvus's query nodes take their shards back, searches failed with 500 (whole-suite runs
    of the Milvus fault test, twice): that is the server not there yet, 503 ``index_unavailable`` like its being
    down."""
    from pymilvus import MilvusException

    from index_service.milvus_index import IndexUnavailable, reachable

    with pytest.raises(IndexUnavailable, match="unreachable"):
        with reachable("http://127.0.0.1:19530"):
            raise MilvusException(code=code, message=message)
    for cut in (RpcFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
                RpcFailed(grpc.StatusCode.UNKNOWN, "Stream removed"),
                RpcFailed(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2")):
        with pytest.raises(IndexUnavailable, match=cut.code().name):
            with reachable("http://127.0.0.1:19530"):
                raise cut
    with pytest.raises(MilvusException):  # anything else is ours: a 500 that says so
        with reachable("http://127.0.0.1:19530"):
            raise MilvusException(code=1100, message="invalid expression: prefix like")
    with pytest.raises(grpc.RpcError):
        with reachable("http://127.0.0.1:19530"):
            raise RpcFailed(grpc.StatusCode.INTERNAL, "failed to parse the expression")


def test_milvus_answers_a_doubled_key_once_and_its_repair_keeps_a_tied_tombstone() -> None:
    """A writer killed mid-upsert can leave a key two rows until the checkpoint's repair (milvus_index's
    docstring): searches answered it twice, and the repair kept whichever of a live row and a tombstone of the
    same order it saw first, where the order rule lets the delete win (an independent review; pure logic)."""
    from index_service.backend import Indexed
    from index_service.milvus_index import MilvusIndex, _distinct

    old, new = Indexed("b", "k", "e1", "", 1, 1), Indexed("b", "k", "e2", "", 2, 1)
    other = Indexed("b", "j", "e", "", 1, 1)
    assert _distinct([(old, 0.9), (other, 0.8), (new, 0.7)]) == [(old, 0.9), (other, 0.8)]
    rows = [{"oid": "b/k", "order": "5", "deleted": False}, {"oid": "b/k", "order": "5", "deleted": True}]
    index = MilvusIndex.__new__(MilvusIndex)
    index.layout = 2  # (orders as text)

    def query(expr: str, fields: Any, strong: bool = False) -> list[dict[str, Any]]:  # one row per key, as Milvus
        return [row for row in rows if row["order"] not in expr.partition("not in")[2]
                and f"deleted == {str(row['deleted']).lower()}" in expr][:1]

    index._query = query  # type: ignore[method-assign]
    assert index._newest("b/k")["deleted"] is True


def test_a_second_milvus_server_starts_beside_another(milvus_uri: str, tmp_path: Path) -> None:
    """Two Milvus stacks on one machine (or a stack beside the test session's server): the embedded etcd listened on
    2379 and 2380 whatever port the package chose for it, and the second server crashed at start with "bind: address
    already in use" (review 29). Here 2379 and 2380 are held (by the session's server, or by this test)."""
    from pymilvus import MilvusClient

    from infra import milvus
    from infra.stack import free_port

    held = []
    for port in (2379, 2380):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            held.append(sock)
        except OSError:  # the session's server holds it
            sock.close()
    try:
        port = free_port()
        process = milvus.start(tmp_path, port)
        try:
            milvus.wait_ready(tmp_path, process)  # raises with its log's tail if it exits
            assert MilvusClient(uri=f"http://127.0.0.1:{port}").list_collections() == []
            etcd = (tmp_path / "configs" / "embedEtcd.yaml").read_text()
            assert "127.0.0.1:2379\n" not in etcd and "127.0.0.1:2380\n" not in etcd, etcd
        finally:
            milvus.stop(process)
    finally:
        for sock in held:
            sock.close()


def test_each_backend_keeps_the_index_type_asked_of_it(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """HNSW asked of Milvus was kept in one key of both backends: switched to FAISS, the index service tried to
    restructure into HNSW twice a second, each time with a traceback; IVF-SQ8 asked of FAISS kept a Milvus index
    Flat past its threshold (review 76). Each backend keeps its own; the one key of before still counts where it
    names a type the backend makes."""
    keys, client = Keys(f"c{uuid.uuid4().hex[:10]}"), connect(redis_url)
    milvus, faiss = (types.SimpleNamespace(name=name, index_types=INDEX_TYPES[name]) for name in ("milvus", "faiss"))
    try:
        assert choose_type(client, keys, milvus, "HNSW") == "HNSW"  # type: ignore[arg-type]
        assert [chosen_type(client, keys, b) for b in (milvus, faiss)] == ["HNSW", None]  # type: ignore[arg-type]
        choose_type(client, keys, faiss, "IVF-SQ8")  # type: ignore[arg-type]
        assert [chosen_type(client, keys, b) for b in (milvus, faiss)] == ["HNSW", "IVF-SQ8"]  # type: ignore[arg-type]
        assert choose_type(client, keys, milvus, "auto") is None  # type: ignore[arg-type]
        assert [chosen_type(client, keys, b) for b in (milvus, faiss)] == [None, "IVF-SQ8"]  # type: ignore[arg-type]
        client.set(keys.index_type_before, "HNSW")  # the one key, written before each backend had its own
        assert [chosen_type(client, keys, b) for b in (milvus, faiss)] == ["HNSW", "IVF-SQ8"]  # type: ignore[arg-type]
        client.set(keys.index_type("faiss"), "HNSW")  # (a type it does not make: a newer version's)
        assert chosen_type(client, keys, faiss) is None  # type: ignore[arg-type]
        assert "the index type 'HNSW' asked for is not one the faiss backend makes" in caplog.text
        client.delete(keys.index_type("milvus"))
        choose_type(client, keys, faiss, "IVF")  # type: ignore[arg-type]
        assert client.get(keys.index_type_before) is None  # (settled by any choice: Milvus keeps what it said)
        assert [chosen_type(client, keys, b) for b in (milvus, faiss)] == ["HNSW", "IVF"]  # type: ignore[arg-type]
    finally:
        client.delete(keys.index_type("faiss"), keys.index_type("milvus"), keys.index_type_before)
        client.close()
