"""Snapshots: round trip, corrupt newest -> previous one, foreign model/dimension refused, no pickles."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bucketlens.schemas import ResultEntry
from index_service import snapshots, vector_index
from index_service.snapshots import SnapshotError, SnapshotStore, decode, encode
from index_service.vector_index import VectorIndex

DIM = 16


def filled(n: int = 50, seed: int = 0) -> VectorIndex:
    rng = np.random.default_rng(seed)
    index = VectorIndex("m", DIM, generation=3)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.apply([ResultEntry("upsert", "b", f"dir/k {i} ü", f"e{i}", f"s{i}", 10 + i, 3, "m", v,
                             labels=f"{i}:0.5,{i + 1}:0.25" if i % 2 else "", modified=1.7e9 + i)
                 for i, v in enumerate(vectors)])
    index.apply([ResultEntry("delete", "b", "dir/k 0 ü", "", "", 100, 3)])
    return index


def contents(index: VectorIndex) -> dict[str, tuple[Any, ...]]:
    objects, vectors, _ = index.export()
    return {o.key: (o.etag, o.order, o.labels, o.modified, v.tobytes()) for o, v in zip(objects, vectors)}


def test_round_trip_keeps_objects_vectors_tombstones_and_position(tmp_path: Path) -> None:
    index = filled(9000)  # the meta's JSON is written 4,096 objects at a time
    store = SnapshotStore(tmp_path)
    store.write(index, "1700000000000-5")
    restarted = SnapshotStore(tmp_path)
    loaded, last_id = restarted.load_newest({"m": DIM})  # type: ignore[misc]
    assert last_id == "1700000000000-5" and loaded.generation == 3
    assert store.last and restarted.last and restarted.last["time"] == store.last["time"] is not None  # /stats
    assert contents(loaded) == contents(index)
    # The tombstone survived: a late upsert of the deleted object's old version stays out.
    late = ResultEntry("upsert", "b", "dir/k 0 ü", "e0", "s0", 10, 3, "m", np.eye(DIM, dtype=np.float32)[0])
    assert loaded.apply([late]).stale == 1


def test_corrupt_newest_snapshot_falls_back_to_the_previous(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    store.write(filled(10), "1-1")
    newest = store.write(filled(20), "2-2")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    loaded, last_id = store.load_newest({"m": DIM})  # type: ignore[misc]
    assert last_id == "1-1" and len(loaded) == 9


class StandInS3:
    """Just enough of boto3's S3 client for ``SnapshotStore``'s copies, in memory; ``down`` makes every call fail as
    an unreachable or refusing server does (pure logic: the real path is tests/test_faults.py, SNAPSHOT_S3=1)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    def upload_file(self, path: str, bucket: str, key: str) -> None:
        if self.down:  # what boto3's transfer makes of a refused upload: not a ClientError
            from boto3.exceptions import S3UploadFailedError

            raise S3UploadFailedError("Failed to upload: An error occurred (AccessDenied)")
        self.objects[key] = Path(path).read_bytes()

    def list_objects_v2(self, Bucket: str, Prefix: str) -> dict[str, Any]:  # noqa: N803 (boto3's names)
        self._check()
        return {"Contents": [{"Key": k} for k in self.objects if k.startswith(Prefix)]}

    def download_fileobj(self, bucket: str, key: str, target: Any) -> None:
        self._check()
        target.write(self.objects[key])

    def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803
        self._check()
        del self.objects[Key]


def test_s3_trouble_never_starts_an_empty_index_and_a_refused_copy_keeps_the_folder_bounded(tmp_path: Path) -> None:
    """An S3 error at start-up was taken for "no snapshot": the service started an empty generation, and its
    checkpoints then pruned the real copies; a refused copy escaped the checkpoint's error handling and left one
    more full local snapshot per attempt (an independent review)."""
    from boto3.exceptions import S3UploadFailedError

    s3 = StandInS3()
    SnapshotStore(tmp_path / "old", keep=2, s3=s3, bucket="b", prefix="p/").write(filled(30), "5-5")
    fresh = SnapshotStore(tmp_path / "fresh", keep=2, s3=s3, bucket="b", prefix="p/")  # a new disk
    s3.down = True
    with pytest.raises(ConnectionError, match="s3://b/p/"):  # the service waits for S3, as for a Milvus server
        fresh.load_newest({"m": DIM})
    for _ in range(4):
        with pytest.raises(S3UploadFailedError):
            fresh.write(filled(10), "6-6")
    assert len(list(fresh.folder.glob(f"*{snapshots.SUFFIX}"))) == 2 and len(s3.objects) == 1
    s3.down = False
    for local in fresh.folder.glob(f"*{snapshots.SUFFIX}"):  # every local copy broken: the S3 copy is next
        local.write_bytes(b"not a snapshot")
    loaded, last_id = fresh.load_newest({"m": DIM})  # type: ignore[misc]
    assert last_id == "5-5" and len(loaded) == 29


def test_s3_copies_are_kept_per_namespace_and_the_shared_folder_of_before_is_still_read(tmp_path: Path) -> None:
    """Every namespace's copies went under one prefix: two deployments on one bucket pruned each other's, and a
    fresh disk loaded the other's index (an independent review)."""
    s3 = StandInS3()
    before = SnapshotStore(tmp_path / "before", keep=2, s3=s3, bucket="b", prefix="_bl/snapshots/")
    before.write(filled(30), "1-1")  # a copy of the shared layout

    def store(namespace: str, folder: str) -> SnapshotStore:
        return SnapshotStore(tmp_path / folder, keep=2, s3=s3, bucket="b", prefix=f"_bl/snapshots/{namespace}/",
                             older="_bl/snapshots/")

    for _ in range(3):
        store("other", "other").write(filled(10), "9-9")
    assert len([k for k in s3.objects if k.startswith("_bl/snapshots/other/")]) == 2 and len(s3.objects) == 3
    loaded, last_id = store("ours", "fresh-disk").load_newest({"m": DIM})  # type: ignore[misc]
    assert last_id == "1-1" and len(loaded) == 29  # the copy of before, not the other namespace's
    store("ours", "ours").write(filled(20), "2-2")
    loaded, last_id = store("ours", "another-fresh-disk").load_newest({"m": DIM})  # type: ignore[misc]
    assert last_id == "2-2" and len(loaded) == 19


def test_a_clock_stepped_back_still_makes_the_newest_snapshot_the_newest(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots were named by the clock alone: after it stepped back, each new one sorted below the older ones and
    was pruned as soon as written, and every checkpoint failed (an independent review)."""
    store = SnapshotStore(tmp_path, keep=2)
    store.write(filled(10), "1-1")
    monkeypatch.setattr(snapshots.time, "time_ns", lambda: 1_000_000_000)  # 1970: an hour, a year back alike
    for n, last_id in ((20, "2-2"), (30, "3-3")):
        store.write(filled(n), last_id)
    assert len(list(tmp_path.glob(f"*{snapshots.SUFFIX}"))) == 2
    loaded, last_id = store.load_newest({"m": DIM})  # type: ignore[misc]
    assert last_id == "3-3" and len(loaded) == 29


def test_a_snapshot_that_fails_to_load_in_any_way_leaves_the_older_ones(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a ``SnapshotError`` moved on to the previous snapshot: any other error decoding the newest (a bug, a
    structure that does not build) gave up on all of them, and the service started empty."""
    store = SnapshotStore(tmp_path, keep=3)
    store.write(filled(10), "1-1")
    store.write(filled(20), "2-2")
    decode_one = snapshots.decode
    calls = []

    def failing_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise IndexError("list index out of range")
        return decode_one(*args, **kwargs)

    monkeypatch.setattr(snapshots, "decode", failing_first)
    loaded, last_id = store.load_newest({"m": DIM})  # type: ignore[misc]
    assert last_id == "1-1" and len(loaded) == 9


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encoded(index: VectorIndex, last_id: str) -> tuple[bytes, dict[str, Any]]:
    buffer = io.BytesIO()
    meta = encode(index, last_id, buffer)
    return buffer.getvalue(), meta


def test_wrong_model_or_dimension_is_refused() -> None:
    data, _ = encoded(filled(), "1-1")
    with pytest.raises(SnapshotError, match="dim"):
        decode(io.BytesIO(data), {"m": DIM * 2})
    with pytest.raises(SnapshotError, match="other"):
        decode(io.BytesIO(data), {"other": DIM})


def test_a_pickled_payload_is_never_loaded() -> None:
    buffer = io.BytesIO()
    meta = np.frombuffer(json.dumps({"v": 1}).encode(), dtype=np.uint8)
    np.savez(buffer, vectors=np.array([object()], dtype=object), meta=meta)  # needs pickle to load
    with pytest.raises(SnapshotError):
        decode(buffer, {"m": DIM})


def test_only_the_newest_are_kept(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    for i in range(4):
        store.write(filled(5, seed=i), f"{i}-0")
    assert len(list(tmp_path.glob("*.snapshot.npz"))) == 2
    assert store.load_newest({"m": DIM})[1] == "3-0"  # type: ignore[index]


def test_a_snapshot_a_killed_writer_left_half_written_is_removed(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    abandoned, growing = tmp_path / ".1-g1.snapshot.npz.tmp", tmp_path / ".2-g1.snapshot.npz.tmp"
    abandoned.write_bytes(b"half")
    growing.write_bytes(b"half")
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    store.write(filled(5), "1-0")
    assert not abandoned.exists() and growing.exists()  # another writer may still be on a fresh one


def test_restored_ivf_index_keeps_its_type(tmp_path: Path) -> None:
    index = filled(400)
    index.restructure("IVF")
    store = SnapshotStore(tmp_path)
    store.write(index, "9-9")
    loaded, _ = store.load_newest({"m": DIM})  # type: ignore[misc]
    assert loaded.index_type == "IVF" and contents(loaded) == contents(index)


@pytest.mark.parametrize("index_type", ["Flat", "IVF", "IVF-SQ8"])
def test_vectors_are_written_and_read_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        index_type: str) -> None:
    """Chunks of 7 vectors: the boundaries fall everywhere, an IVF index comes back with what its training left
    (v4; a v3 snapshot's is trained again on a sample gathered across the chunks), IVF-SQ8 keeps its float16 vectors
    (v5; a v4 snapshot's 8-bit codes still load, decoded), and a file cut short is refused, not half-loaded."""
    monkeypatch.setattr(vector_index, "CHUNK", 7)
    monkeypatch.setattr(snapshots, "CHUNK", 7)
    index = filled(400)
    index.restructure(index_type)
    store = SnapshotStore(tmp_path)
    path = store.write(index, "9-9")
    loaded, _ = store.load_newest({"m": DIM})  # type: ignore[misc]
    assert loaded.index_type == index_type and contents(loaded) == contents(index)
    if index_type != "Flat":
        assert loaded.structure()[1].keys() == index.structure()[1].keys()
        for name, array in index.structure()[1].items():
            np.testing.assert_array_equal(loaded.structure()[1][name], array)
    if index_type == "IVF":
        with zipfile.ZipFile(path) as archive, zipfile.ZipFile(tmp_path / "v3.npz", "w") as older:
            for name in ("vectors.npy", "meta.npy"):  # a v3 snapshot: no trained state
                older.writestr(name, archive.read(name))
        retrained, _ = decode(tmp_path / "v3.npz", {"m": DIM})
        assert retrained.index_type == "IVF" and contents(retrained) == contents(index)
    if index_type == "IVF-SQ8":  # the float16 vectors it re-ranks with (v5), from which a restore makes its codes
        with zipfile.ZipFile(path) as archive, zipfile.ZipFile(tmp_path / "v4.npz", "w") as older:
            assert "vectors.npy" not in archive.namelist()
            assert archive.getinfo("float16.npy").file_size < len(index) * DIM * 2 + 200
            codec = vector_index.scalar_quantizer(index.structure()[1], DIM)
            _, vectors, _ = index.export()
            meta = json.loads(np.lib.format.read_array(archive.open("meta.npy")).tobytes())
            older.writestr("codes.npy", npy(codec.compute_codes(vectors)))  # a v4 snapshot: the codes
            older.writestr("meta.npy", npy(np.frombuffer(json.dumps({**meta, "v": 4}).encode(), np.uint8)))
            for name in ("centroids.npy", "scalar_quantizer.npy"):
                older.writestr(name, archive.read(name))
        from_codes, _ = decode(tmp_path / "v4.npz", {"m": DIM})
        assert from_codes.index_type == "IVF-SQ8" and len(from_codes) == len(index)
        _, decoded, _ = from_codes.export()
        np.testing.assert_array_equal(decoded, codec.decode(codec.compute_codes(vectors)).astype(np.float16))
    data = path.read_bytes()
    with pytest.raises(SnapshotError):
        decode(io.BytesIO(data[: len(data) // 2]), {"m": DIM})


@pytest.mark.parametrize("index_type", ["Flat", "IVF-SQ8"])
def test_a_snapshot_written_while_merges_go_on_replays_to_the_live_index(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        index_type: str) -> None:
    """A checkpoint runs beside the merger: a batch applied after its first chunk was written re-uploads an object
    already written (the snapshot keeps the old version), one not yet written (it leaves the snapshot, v6's
    ``left``), deletes one not yet written (it leaves too) and adds one. The snapshot loads, and replaying the batch
    (what came after its stream position) gives the live index's objects and vectors."""
    monkeypatch.setattr(vector_index, "CHUNK", 7)
    monkeypatch.setattr(snapshots, "CHUNK", 7)
    index = filled(60)
    index.restructure(index_type)
    fresh = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32)
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    batch = [ResultEntry("upsert", "b", "dir/k 2 ü", "e2'", "s", 200, 3, "m", fresh[0]),
             ResultEntry("upsert", "b", "dir/k 40 ü", "e40'", "s", 201, 3, "m", fresh[1]),
             ResultEntry("delete", "b", "dir/k 50 ü", "", "", 202, 3),
             ResultEntry("upsert", "b", "dir/new", "n", "s", 203, 3, "m", fresh[2])]
    chunks = index.vectors_of

    def merging_meanwhile(ids: np.ndarray) -> Any:
        for n, chunk in enumerate(chunks(ids)):
            yield chunk
            if n == 0:
                index.apply(batch)

    monkeypatch.setattr(index, "vectors_of", merging_meanwhile)
    store = SnapshotStore(tmp_path)
    store.write(index, "9-9")
    loaded, last_id = store.load_newest({"m": DIM})  # type: ignore[misc]
    held = {o.key: o.etag for o in loaded.objects()}
    assert held["dir/k 2 ü"] == "e2" and "dir/k 40 ü" not in held and "dir/k 50 ü" not in held
    assert "dir/new" not in held
    assert last_id == "9-9" and len(loaded) == 57 == store.last["count"] and loaded.index_type == index_type
    loaded.apply(batch)
    assert contents(loaded) == contents(index) and len(loaded) == len(index) == 59


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_snapshot_still_loads(tmp_path: Path, version: int) -> None:
    """Snapshots written before pixel counts and feature stores (v1), or labels and times (v2), existed load with
    ``pixels`` 0, ``labels`` None and ``modified`` 0; a text or date search then simply does not find them."""
    data, _ = encoded(filled(5), "4-4")
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        vectors = archive["vectors"]
        meta = json.loads(archive["meta"].tobytes())
    assert len(meta["objects"]) == 4 and meta["count"] == 4
    meta.update(v=version, objects=[row[: 5 + version] for row in meta["objects"]])
    if version == 1:
        del meta["features"]
    buffer = io.BytesIO()
    np.savez(buffer, vectors=vectors, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    loaded, meta = decode(buffer, {"m": DIM})
    last_id = meta["last_id"]
    assert last_id == "4-4" and len(loaded) == 4
    assert {(o.labels, o.modified) for o in loaded.objects()} == {(None, 0.0)}
    assert loaded.label_counts() == {}


def test_a_restarted_service_goes_on_counting_how_long_snapshots_have_failed(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each restart began the count again: `/stats` said "failing for 4 s" after ~3 minutes, and a service restarted
    more often than the grace never answered /readyz 503 while its stream grew (review 83). The time the run began
    is kept in Redis, and a written snapshot ends it for the next process too."""
    from bucketlens.redis_client import connect
    from index_service.snapshots import SnapshotHealth
    from infra.stack import scratch_redis

    with scratch_redis(tmp_path) as (url, _):
        client, key = connect(url), "t:index:snapshots_failing"
        wall = [1_000_000.0]
        monkeypatch.setattr(time, "time", lambda: wall[0])
        first = SnapshotHealth(60, 600, client, key)
        first.failed(PermissionError("the snapshot folder is read-only"))
        wall[0] += 590  # then the service restarts
        second = SnapshotHealth(60, 600, client, key)
        assert second.unready_reason() is None and second.failing_s() == 0  # (nothing known before it fails)
        second.failed(PermissionError("the snapshot folder is read-only"))
        assert 589 < second.failing_s() < 592 and second.unready_reason() is None
        assert 0 < client.ttl(key) <= 600 + 3 * 60  # (a run not continued soon is forgotten: review 85)
        later = second.since + 601  # type: ignore[operator]
        monkeypatch.setattr(time, "monotonic", lambda: later)
        assert "snapshots failing for 601 s" in (second.unready_reason() or "")
        second.written()
        assert client.get(key) is None
        wall[0] += 60  # a later run of failures counts from its own start
        third = SnapshotHealth(60, 600, client, key)
        third.failed(PermissionError("the snapshot folder is read-only"))
        assert third.failing_s() < 2
