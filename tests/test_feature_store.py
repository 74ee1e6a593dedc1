"""The feature store beside the index: written with each merge batch, last word per object wins, rows only count
for the etag the index holds, and rerank puts verified copies first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bucketlens.schemas import ResultEntry
from index_service.feature_store import FeatureStore
from index_service.vector_index import VectorIndex
from index_service.verify import rerank
from vision import local_features

DIM = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def features(seed: int) -> local_features.Features:
    rng = np.random.default_rng(seed)
    image = (rng.random((60, 80)) * 255).astype(np.uint8)
    big = np.kron(image, np.ones((6, 6), np.uint8))  # blocky texture: many corners, 480 x 360
    return local_features.extract(big)


def upsert(key: str, order: int, seed: int, etag: str = "e", with_features: bool = True) -> ResultEntry:
    data = local_features.encode([features(seed)]) if with_features else b""
    return ResultEntry("upsert", "b", key, etag, "", order, 1, "m", unit(seed), data, 1000 + seed)


def test_rows_follow_the_index_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "g1.sqlite"
    index = VectorIndex("m", DIM, features=FeatureStore(path))
    index.apply([upsert("a", 1, 1), upsert("b", 1, 2), upsert("c", 1, 3)])
    # In one batch: c is deleted then uploaded again; a is uploaded then deleted; b gets a new version with none.
    index.apply([ResultEntry("delete", "b", "c", "", "", 2, 1), upsert("c", 3, 4, etag="e2"),
                 upsert("a", 2, 5), ResultEntry("delete", "b", "a", "", "", 3, 1),
                 upsert("b", 2, 6, etag="e3", with_features=False)])
    index.features.close()
    reopened = FeatureStore(path)
    assert set(reopened.get([("b/a", "e"), ("b/b", "e"), ("b/b", "e3"), ("b/c", "e2")])) == {"b/c"}
    assert reopened.get([("b/c", "e")]) == {}  # a row only counts for the etag asked for
    assert len(reopened) == 1
    reopened.close(remove=True)
    assert not path.exists()


def test_stale_entries_do_not_touch_the_store() -> None:
    index = VectorIndex("m", DIM)
    index.apply([upsert("a", 5, 1, etag="new")])
    index.apply([upsert("a", 4, 2, etag="old")])  # older: discarded, and so are its features
    assert set(index.features.get([("b/a", "new")])) == {"b/a"}
    assert index.get("b", "a").pixels == 1001  # type: ignore[union-attr]


def test_rerank_puts_the_verified_copy_first_where_the_recipe_promotes() -> None:
    index = VectorIndex("m", DIM)
    index.apply([upsert(f"k{i}", 1, i) for i in range(30)])
    query = unit(0)
    hits = index.search(query, 25)
    copy_of = hits[10][0].key  # a candidate far down the global ranking
    seed = int(copy_of[1:])
    ranked = rerank(index, hits, [features(seed)], local_features.MIN_INLIERS)
    assert ranked[0].obj.key == copy_of and ranked[0].verified and ranked[0].matches
    assert not any(h.verified for h in ranked[1:])
    assert [h.obj.key for h in ranked[1:]] == [o.key for o, _ in hits if o.key != copy_of]  # the rest keep order
    kept = rerank(index, hits, [features(seed)], None)  # annotate only: the global order stays
    assert [h.obj.key for h in kept] == [o.key for o, _ in hits]
    assert [h.obj.key for h in kept if h.verified] == [copy_of]


def test_rerank_calls_the_same_bytes_the_same_photo_without_keypoints() -> None:
    """A smooth image (a clear sky) has no keypoints: its byte-identical copy (equal etags) is the same photo, ahead
    of matched copies; a candidate of other bytes is not, however close its vector."""
    index = VectorIndex("m", DIM)
    sky = local_features.encode([local_features.NONE])
    index.apply([ResultEntry("upsert", "b", "sky", "md5-sky", "", 1, 1, "m", unit(0), sky, 1),
                 ResultEntry("upsert", "b", "sky-recompressed", "md5-other", "", 1, 1, "m", unit(0), sky, 1),
                 upsert("copy", 1, 3, etag="md5-copy")])
    hits = index.search(unit(0), 3)
    ranked = rerank(index, hits, [local_features.NONE], local_features.MIN_INLIERS, etag="md5-sky")
    assert [(h.obj.key, h.verified, h.identical) for h in ranked[:2]] == [("sky", True, True),
                                                                          ("sky-recompressed", False, False)]
    assert ranked[0].matches == local_features.IDENTICAL and ranked[1].matches == 0
    textured = rerank(index, hits, [features(3)], local_features.MIN_INLIERS, etag="md5-sky")
    assert [h.obj.key for h in textured if h.verified] == ["sky", "copy"]  # identical first, then by matches
    assert not any(h.identical for h in rerank(index, hits, [features(3)], local_features.MIN_INLIERS))  # no etag
    behind = sorted(hits, key=lambda h: h[0].key != "sky-recompressed")  # the look-alike first, as when the
    assert behind[0][0].key == "sky-recompressed"  # stored vector came from another runtime (int8 workers)
    kept = rerank(index, behind, [local_features.NONE], None, etag="md5-sky")  # a recipe that promotes nothing
    assert [h.obj.key for h in kept][:2] == ["sky", "sky-recompressed"]


def test_a_closed_store_answers_empty() -> None:
    """A search that started on a generation retired meanwhile finishes, unverified, instead of failing."""
    store = FeatureStore()
    store.write([("b/a", "e", b"x")], [])
    store.close()
    assert store.get([("b/a", "e")]) == {} and store.pairs() == [] and store.checked() == {} and len(store) == 0
    store.write([("b/b", "e", b"y")], [])  # a late write to a retired generation is dropped
    assert store.add_pairs([("b/a", "e")], []) == 0


def test_views_decodes_rows_and_leaves_damaged_ones_out() -> None:
    store = FeatureStore()
    store.write([("b/good", "e", local_features.encode([features(1)])), ("b/bad", "e", b"not features")], [])
    found = store.views([("b/good", "e"), ("b/bad", "e")])
    assert list(found) == ["b/good"] and len(found["b/good"][0]) == len(features(1))


def test_a_pair_verified_against_a_neighbour_changed_since_is_not_kept(tmp_path: Path) -> None:
    """A round verifies ``a`` against ``b`` as ``b`` was; ``b`` re-uploaded meanwhile dropped its pairs, and the
    round then stored the stale pair, which nothing removed: ``/duplicates`` showed b's new image as a copy of
    ``a`` (an independent review)."""
    store = FeatureStore(tmp_path / "f.sqlite")
    store.write([("bk/a.jpg", "a1", b"x"), ("bk/b.jpg", "b1", b"x")], [])
    store.write([("bk/b.jpg", "b2", b"y")], [])  # re-uploaded while the round verified a against b1
    assert store.add_pairs([("bk/a.jpg", "a1")], [("bk/a.jpg", "bk/b.jpg", 50, "b1")]) == 0
    assert store.pairs() == []
    assert store.add_pairs([("bk/a.jpg", "a1")], [("bk/a.jpg", "bk/b.jpg", 50, "b2")]) == 1
    store.close()


def test_a_swap_keeps_the_pairs_verified_on_the_same_views(tmp_path: Path) -> None:
    """A rebuild's new generation takes over the retiring one's pairs whose objects it holds at the same etag with
    the same local features (each swap emptied ``/duplicates`` until the finder had checked every object again:
    review 81); a pair of an object re-uploaded, re-extracted or gone is not taken, nor is what it had checked."""
    old, new = FeatureStore(tmp_path / "g1.sqlite"), FeatureStore(tmp_path / "g2.sqlite")
    rows = [(f"bk/{name}.jpg", "e", name.encode()) for name in "abcdefg"]
    old.write(rows, [])
    linked = [("a", "b", 90), ("a", "c", 40), ("d", "e", 30), ("f", "g", 25), ("b", "g", 20)]
    old.add_pairs([row[:2] for row in rows], [(f"bk/{a}.jpg", f"bk/{b}.jpg", m, "e") for a, b, m in linked])
    new.write([row for row in rows if row[0] != "bk/g.jpg"], [])  # g is gone
    new.write([("bk/d.jpg", "e2", b"d")], [])  # d: another version (the same features, another etag)
    new.write([("bk/c.jpg", "e", b"c, extracted again differently")], [])
    assert new.inherit_pairs(old, chunk=2) == 1  # (pages of two pairs)
    assert new.pairs() == [("bk/a.jpg", "bk/b.jpg", 90)] and new.checked() == {}
    assert len(old.pairs()) == 5  # (read, not moved)
    assert FeatureStore().inherit_pairs(old) == 0  # (nothing of the same views held)
    old.close()
    new.close()


def test_each_backend_keeps_its_own_local_features(tmp_path: Path) -> None:
    """A stack switched from Milvus to FAISS and back: each start deleted the other backend's feature stores as an
    "interrupted rebuild", and every object indexed before answered unverified until a reembed (review 29). FAISS's
    stay where both were; a Milvus generation's store from before is taken over into ``milvus/``: moved, or copied
    where FAISS has run in this home (review 30: moving every store took FAISS's away)."""
    from types import SimpleNamespace

    from bucketlens.settings import Settings
    from index_service.service import Service

    shared = tmp_path / "features" / "t"
    shared.mkdir(parents=True)

    def service(backend: str) -> Any:
        made = SimpleNamespace(settings=Settings(home=str(tmp_path), namespace="t", index_backend=backend),
                               _made={5})  # a generation this process made (a rebuild's)
        made._features_folder = Service._features_folder.fget(made)  # type: ignore[attr-defined]
        made._adopt_shared_store = lambda path: Service._adopt_shared_store(made, path)  # type: ignore[arg-type]
        return made

    def store(path: Path, key: str) -> None:
        kept = FeatureStore(path)
        kept.write([(key, "e", b"f" * 8)], [])
        kept.close()

    def holds(kept: FeatureStore, key: str) -> bool:
        return kept.get([(key, "e")]) == {key: b"f" * 8}

    store(shared / "g2.sqlite", "milvus/two.jpg")  # a Milvus stack's serving store, from before
    faiss, milvus = service("faiss"), service("milvus")
    assert Service.feature_store(faiss, 2).path == shared / "g2.sqlite"  # FAISS takes nothing over
    moved = Service.feature_store(milvus, 2)
    assert moved.path == shared / "milvus" / "g2.sqlite" and holds(moved, "milvus/two.jpg")
    assert not list(shared.glob("g2*"))  # FAISS never ran here: moved
    # FAISS ran here (a snapshot of it): a store both backends' generation 1 shared is copied, not taken away
    store(shared / "g1.sqlite", "both/one.jpg")
    (tmp_path / "snapshots" / "t").mkdir(parents=True)
    (tmp_path / "snapshots" / "t" / "0001.snapshot.npz").write_bytes(b"")
    copied = Service.feature_store(milvus, 1)
    assert copied.path == shared / "milvus" / "g1.sqlite" and holds(copied, "both/one.jpg")
    assert holds(FeatureStore(shared / "g1.sqlite"), "both/one.jpg")
    assert Service.feature_store(milvus, 3).path == shared / "milvus" / "g3.sqlite"  # none there: nothing to take
    store(shared / "g5.sqlite", "faiss/five.jpg")  # FAISS's generation 5, and Milvus's rebuild makes its own 5
    assert not holds(Service.feature_store(milvus, 5), "faiss/five.jpg") and (shared / "g5.sqlite").exists()
