"""The Milvus backend (``BUCKETLENS_INDEX_BACKEND=milvus``): each generation one Milvus collection, the serving one
reached through an alias, so that every reader (this process, other replicas, other clients) switches at once.

Mapping, as Milvus users do it:
- Collection ``bucketlens_<namespace>_g<generation>_<millis>``; the alias ``bucketlens_<namespace>`` names the
  serving one. A rebuild fills the next collection and ``alter_alias`` swaps it in; a cancelled or failed rebuild
  drops its collection; a restructure (Flat -> HNSW/IVF, ``reindex``) copies the rows into a new collection of the
  same generation with the new index and swaps the alias the same way. Model, dimension, generation and index type
  are the collection's description (JSON), so a collection is never mixed, with its layout (``SCHEMA``).
- One row per object id (the primary key): the vector and, as scalar fields, bucket, key, etag, sequencer, order,
  generation, pixels, labels (encoded, plus ``label_ids`` as an array for filtering) and modified. Filters and text
  search are scalar expressions on those fields.
- **Tombstones live in the collection**: a delete upserts the object's row into a tombstone (``deleted`` true, the
  delete's order, when it was applied, a zero vector), so the ordering rule (``backend.verdict``) reads one row per
  object and a late older upsert finds the tombstone. Every read filters ``deleted == false``; tombstones older
  than the retention window are deleted at each checkpoint, as with FAISS.
- **The last applied stream id lives in Redis** (``Keys.checkpoints``, keyed by the alias), written only after
  ``flush`` made the collection's rows durable; the stream is trimmed to it. A restart resumes the merger there and
  replays what follows, which is harmless: an entry applied twice has the same effect (order rule). An entry applied
  again is also written again, a delete's tombstone included: an upsert is a delete and an insert to Milvus 2.3, and
  a writer killed during one can leave the old row beside the new (an object deleted in that batch stayed findable
  by ``deleted == false``: tests/test_recovery.py); the rewrite deletes every older row of the key.
- **Each checkpoint repairs keys with more than one row** (``MilvusIndex.repair``). Old rows also survived beside
  rows that no replay rewrites (tests/test_replicas.py, after a writer was killed: versions only the dead writer had
  written, found beside its successor's newer ones). A query then answers either row, and ``count(*)`` counts both.
  The writer knows how many objects have a row, so one ``count(*)`` tells whether any key has two; only then are
  they looked for, and each is written again with its newest row (the order rule's winner).

Writes come from one merger at a time (``_write``); the ordering reads use Strong consistency, searches Session
consistency (this process reads its own writes). A batch is one ``upsert`` call; a search running meanwhile sees
each object either before or after it, not a half-written object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np
import redis
from pymilvus import DataType, MilvusClient, MilvusException, connections
from pymilvus.client.types import LoadState

from bucketlens.keys import Keys
from bucketlens.redis_client import text
from bucketlens.schemas import ResultEntry, object_id
from bucketlens.settings import INDEX_TYPES, Settings
from vision import labels as vision_labels
from vision.models import recipe

from .backend import ApplyStats, Indexed, SearchOne, Tombstones, decode_labels, nearest, tombstone_after, verdict
from .feature_store import FeatureStore
from .filters import Filter
from .vector_index import EXACT_LIMIT, ivf_lists

log = logging.getLogger(__name__)
SCALARS = ["bucket", "key", "etag", "sequencer", "order", "generation", "pixels", "labels", "modified"]
ROW = ["vector", "label_ids", "deleted", "deleted_at", *SCALARS]  # every field of a row but the primary key
MAX_KEY = 4096  # bytes of a VARCHAR key or object id (S3 keys are at most 1024 bytes; other servers allow more)
SCAN_BATCH = 4096  # rows per page when a read must go through every row
SERVER_NAMES = {"Flat": "FLAT", "IVF": "IVF_FLAT", "HNSW": "HNSW"}  # each of INDEX_TYPES["milvus"], as Milvus calls it
EVERYTHING = 'oid != ""'  # a filter that keeps every row, tombstones included
# Integers on purpose: pymilvus bounds its retries by ``timeout`` only when it is an int (a float 5.0 let a search
# against a dead server retry 75 times, ~4 minutes: seen in tests/test_faults.py).
READ_TIMEOUT_S = 5  # a search or read against an unreachable server gives up (503) instead of retrying for minutes
WRITE_TIMEOUT_S = 30  # a merge batch's upsert, a flush
RETIRE_AFTER_S = 30.0  # a swapped-out collection is dropped this long after the swap (searches on it finish)
LABEL_COUNTS_S = 30.0  # how long one pass's label counts answer autocomplete
# A collection's layout, in its description. 2: ``order`` is the order's decimal text, of any size (1, still read and
# written: INT64, where an order past 2**63 could not be written and the merger retried that batch forever; AWS's
# sequencers read as seconds x 2**32 and pass it in 2038, a forged one at once). ``rebuild --reindex`` copies a
# collection into this layout.
SCHEMA = 2
ORDER_DIGITS = 80  # an order's decimal digits at most (ingest: sequencers of at most 64 hex digits, < 2**256)


# What Milvus's errors say when the server, or part of it, is not there (yet): its restart, its query nodes.
UNAVAILABLE = ("unavailable", "connect", "deadline", "timeout", "not ready", "not loaded", "shard leader",
               "shard delegator", "channel not", "node not", "not available", "lack", "recovering",
               # ... and what a server killed mid-call leaves in the client: gRPC's INTERNAL or UNKNOWN with the
               # stream cut, and pymilvus's "Unexpected error" around a call on the channel it closed (review 65)
               "stream removed", "rst_stream", "socket closed", "connection reset", "closed channel")
# The same by Milvus's own error codes (pkg/util/merr, stable since 2.3), which a message may not spell out: service
# unavailable, limits, a collection or partition not (fully) loaded or recovering, a replica, channel, segment or node
# not found or not available, IO, the server's cancel and timeout. (Code 1, "service not ready", is also pymilvus's
# code for its own errors: the message decides.)
UNAVAILABLE_CODES = frozenset({2, 4, 8, 11, 12, 101, 103, 106, 201, 202, 400, 401, 500, 501, 503, 504, 600, 601, 602,
                               604, 901, 902, 903, 904, 905, 906, 1001, 1002, 10000, 10001})


class IndexUnavailable(ConnectionError):
    """The Milvus server cannot be reached (answered with 503 by the API)."""


# gRPC's codes for a call that did not get through; pymilvus passes some on as they are, not as a MilvusException
# (a deadline passed: a search's READ_TIMEOUT_S while a restarted server loads its segments).
UNAVAILABLE_GRPC = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED})


@contextlib.contextmanager
def reachable(uri: str) -> Iterator[None]:
    """Turn the client's 'server unavailable' errors into ``IndexUnavailable``; other errors pass unchanged. A
    restarted server answers before it has loaded its collections again (~25 s: "collection not loaded"), and
    while its query nodes take their shards back ("fail to search on all shard leaders", "shard delegator not
    found", a channel not available, a segment lacking, a deadline passed: searches were 500 then in whole-suite
    runs): that is unavailable too."""
    try:
        yield
    except MilvusException as exc:
        message = str(exc).lower()
        if exc.code in UNAVAILABLE_CODES or any(s in message for s in UNAVAILABLE):
            raise IndexUnavailable(f"Milvus at {uri} is unreachable: {exc}") from exc
        raise
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None  # (a grpc.Call, which every one is)
        details = str(exc.details() if callable(getattr(exc, "details", None)) else exc).lower()
        if code in UNAVAILABLE_GRPC or any(s in details for s in UNAVAILABLE):
            raise IndexUnavailable(f"Milvus at {uri} is unreachable: {code}") from exc
        raise


def literal(value: str) -> str:
    """A string literal of Milvus's expression language (JSON's escaping is the same)."""
    return json.dumps(value, ensure_ascii=False)


def _parts(oids: Sequence[str]) -> Iterator[Sequence[str]]:
    """``oids`` in parts short enough for one expression each (1000)."""
    return (oids[start : start + 1000] for start in range(0, len(oids), 1000))


def _among(oids: Iterable[str]) -> str:
    """The expression of a row whose object id is one of ``oids``."""
    return f"oid in [{', '.join(literal(o) for o in oids)}]"


def prefix_end(prefix: str) -> str | None:
    """The smallest string above every string starting with ``prefix`` (None: no upper bound)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if 0xD800 <= last <= 0xDFFF:
            last = 0xE000  # surrogates cannot be encoded
        if last <= 0x10FFFF:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


def expression(where: Filter | None) -> str:
    """The live objects ``where`` keeps, as a Milvus filter (a prefix is a range of keys: Milvus 2.3's ``like``
    takes no escaped ``%``). Objects of unknown time are outside every time range, as in ``Filter.keeps_time``."""
    parts = ["deleted == false"]
    if where is not None:
        if where.bucket:
            parts.append(f"bucket == {literal(where.bucket)}")
        if where.prefix:
            parts.append(f"key >= {literal(where.prefix)}")
            end = prefix_end(where.prefix)
            if end is not None:
                parts.append(f"key < {literal(end)}")
        if where.dated:
            parts.append("modified > 0")
            if where.after is not None:
                parts.append(f"modified >= {where.after!r}")
            if where.before is not None:
                parts.append(f"modified < {where.before!r}")
    return " and ".join(parts)


class Connection:
    """The client, made on first use (the index service starts before Milvus answers), and the settings' index
    parameters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uri = settings.milvus_uri
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> MilvusClient:
        with self._lock:
            if self._client is not None and not connections.has_connection(self._client._using):
                # Its connection was closed: pymilvus shares one per address, and another client of it in this
                # process (a second backend, a library) closing its own closes ours. Every call said "should create
                # connection first", which reads as unavailable: searches answered 503 until a restart.
                log.warning("the connection to Milvus at %s was closed; connecting again", self.uri)
                self._client = None
            if self._client is None:
                with reachable(self.uri):
                    self._client = MilvusClient(self.uri, token=self.settings.milvus_token,
                                                db_name=self.settings.milvus_database, timeout=10)
            return self._client

    def drop_later(self, name: str, delay_s: float = RETIRE_AFTER_S) -> None:
        """Drop a retired collection once searches that started on it have finished (a restart before then leaves
        it to ``MilvusBackend.drop_abandoned``)."""

        def drop() -> None:
            try:
                with reachable(self.uri):
                    self.client.drop_collection(name)
                log.info("dropped retired Milvus collection %s", name)
            except Exception:
                log.warning("could not drop retired Milvus collection %s; the next start will", name, exc_info=True)

        timer = threading.Timer(delay_s, drop)
        timer.daemon = True
        timer.start()

    def index_params(self, index_type: str, rows: int) -> Any:
        params = self.client.prepare_index_params()
        if index_type == "HNSW":
            extra = {"M": self.settings.milvus_hnsw_m, "efConstruction": self.settings.milvus_hnsw_ef_construction}
        elif index_type == "IVF":
            extra = {"nlist": ivf_lists(rows)}
        else:
            extra = {}
        params.add_index("vector", index_type=SERVER_NAMES[index_type], metric_type="IP", params=extra)
        return params

    def search_params(self, index_type: str, want: int) -> dict[str, Any]:
        if index_type == "HNSW":
            return {"metric_type": "IP", "params": {"ef": max(self.settings.milvus_hnsw_ef, want)}}
        if index_type == "IVF":
            return {"metric_type": "IP", "params": {"nprobe": self.settings.milvus_ivf_nprobe}}
        return {"metric_type": "IP", "params": {}}

    def create(self, name: str, model: str, dim: int, generation: int, index_type: str, rows: int = 0,
               layout: int = SCHEMA) -> None:
        schema = MilvusClient.create_schema(auto_id=False, description=json.dumps(
            {"model": model, "dim": dim, "generation": generation, "index_type": index_type, "schema": layout}))
        schema.add_field("oid", DataType.VARCHAR, is_primary=True, max_length=MAX_KEY)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("bucket", DataType.VARCHAR, max_length=256)
        schema.add_field("key", DataType.VARCHAR, max_length=MAX_KEY)
        schema.add_field("etag", DataType.VARCHAR, max_length=256)
        schema.add_field("sequencer", DataType.VARCHAR, max_length=256)
        if layout >= 2:
            schema.add_field("order", DataType.VARCHAR, max_length=ORDER_DIGITS)
        else:
            schema.add_field("order", DataType.INT64)
        schema.add_field("generation", DataType.INT64)
        schema.add_field("pixels", DataType.INT64)
        schema.add_field("labels", DataType.VARCHAR, max_length=1024)
        schema.add_field("label_ids", DataType.ARRAY, element_type=DataType.INT64, max_capacity=64)
        schema.add_field("modified", DataType.DOUBLE)
        schema.add_field("deleted", DataType.BOOL)
        schema.add_field("deleted_at", DataType.DOUBLE)
        with reachable(self.uri):
            self.client.create_collection(name, schema=schema, index_params=self.index_params(index_type, rows))
        log.info("created Milvus collection %s (%s, generation %d, %s)", name, model, generation, index_type)


class MilvusIndex(SearchOne):
    """One generation in one collection (``backend.Index``)."""

    def __init__(self, connection: Connection, alias: str, collection: str, model: str, dim: int, generation: int,
                 index_type: str, features: FeatureStore, layout: int = SCHEMA) -> None:
        self.connection = connection
        self.layout = layout  # the collection's ``SCHEMA``
        self.alias = alias
        self.collection = collection
        self.model = model
        self.dim = dim
        self.generation = generation
        self.index_type = index_type
        self.features = features
        self._write = threading.Lock()  # one batch or restructure at a time
        self._counting = threading.Lock()  # one pass for ``label_counts`` at a time; the others wait for its answer
        self._label_counts: tuple[float, dict[int, int] | None] = (0.0, None)
        # Exact, one per key, counted before this process's first write and kept by each write since: live objects,
        # and objects with a row (live or tombstone; ``repair`` compares it with the rows there are).
        self._count: int | None = None
        self._keys: int | None = None
        self._reading = False  # the writer lease was lost: the counts above are no longer kept (``stop_counting``)

    def __len__(self) -> int:
        """Live objects. The writer counts them one per key before its first batch and keeps the count; a replica
        that only reads asks the server's ``count(*)`` (5 ms at 100,000 rows, against 6 s for the exact count), which
        also counts old rows that a killed writer left beside new ones, until the replay deletes them."""
        count = self._count  # (read once: the role thread may set ``_reading`` meanwhile)
        if count is not None and not self._reading:
            return count
        rows = self._query(expression(None), ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def stop_counting(self) -> None:
        """Leave the count to the server's ``count(*)``, as a replica that only reads does: a writer that lost its
        lease (paused past it) kept the count of its own writes, and reported 700 objects for good where the server
        held 932 (review 29). A flag, not the write lock, which a reindex's copy holds for minutes. A lease taken
        again loads a new handle, which counts before its first write (this one would count again too)."""
        self._reading = True

    def _tally(self) -> None:
        """Count the objects with a row, one per key whatever rows lie beside it (``count(*)`` counts rows: 1,222 for
        1,176 objects in CI after a SIGKILL mid-merge), and the live ones. A scan's page can hold a key's two rows,
        or only one of them, not always the newest: the live count goes by the newest row seen, and is exact again
        once the checkpoint's repair has left one row per key (it counts again)."""
        newest: dict[str, tuple[int, bool]] = {}  # key -> (order, deleted) of its newest row seen
        for row in self._scan(EVERYTHING, ["order", "deleted"]):
            seen = newest.get(row["oid"])
            if seen is None or int(row["order"]) > seen[0]:
                newest[row["oid"]] = int(row["order"]), bool(row["deleted"])
        self._count, self._keys = sum(not deleted for _, deleted in newest.values()), len(newest)

    # -- merging -------------------------------------------------------------------------------------------

    def apply(self, entries: Iterable[ResultEntry]) -> ApplyStats:
        """Apply a batch: read the rows it touches, decide each entry by the order rule, write the rows in one
        upsert (live rows and tombstones alike), then the local features."""
        stats = ApplyStats()
        entries = list(entries)
        with self._write:
            if self._count is None or self._keys is None or self._reading:
                self._tally()
                self._reading = False
            assert self._count is not None and self._keys is not None
            oids = sorted({object_id(e.bucket, e.key) for e in entries if e.op in ("upsert", "delete", "failed")})
            held = self._held(oids)
            keys_before = len(held)
            live_before = sum(1 for row in held.values() if not row["deleted"])
            rows: dict[str, dict[str, Any]] = {}
            replayed: list[str] = []  # deletes applied again: the tombstone may have an old live row beside it
            for entry in entries:
                oid = object_id(entry.bucket, entry.key)
                row = held.get(oid)
                order = None if row is None or row["deleted"] else int(row["order"])  # the live version's
                tombstone = int(row["order"]) if row is not None and row["deleted"] else None
                outcome = verdict(entry, order, tombstone, self.model, self.dim, str(row["etag"]) if row else "")
                stats.record(outcome, entry)
                if outcome == "delete":
                    left = tombstone_after(tombstone, entry)
                    if left is None and row is not None and tombstone == entry.order:  # a replay (see above)
                        left = tombstone, float(row["deleted_at"])
                        if oid not in rows:  # the tombstone is the server's, not this batch's
                            replayed.append(oid)
                    if left is not None:
                        held[oid] = rows[oid] = self._tombstone(entry, *left)
                elif outcome == "upsert":
                    held[oid] = rows[oid] = self._row(entry)
            if replayed:  # counted before the upsert deletes them
                live_before += len(self._held(replayed, live=True))
            if rows:
                with reachable(self.connection.uri):
                    self.connection.client.upsert(self.collection, list(rows.values()), timeout=WRITE_TIMEOUT_S)
                self._label_counts = (0.0, None)  # the writer's own writes show at once (a reader's within the time)
            self._count += sum(1 for row in held.values() if not row["deleted"]) - live_before
            self._keys += len(held) - keys_before
            stats.write_features(self.features)
        return stats

    def _held(self, oids: list[str], live: bool = False) -> dict[str, dict[str, Any]]:
        """The current rows (live or tombstone; ``live``: live rows only) of ``oids``, read with Strong consistency:
        the order rule needs the latest word."""
        fields = ["oid", "order", "deleted", "deleted_at", "etag"]
        return {row["oid"]: row for part in _parts(oids)
                for row in self._query(f"{'deleted == false and ' if live else ''}{_among(part)}", fields, strong=True)}

    def _row(self, entry: ResultEntry) -> dict[str, Any]:
        assert entry.vector is not None, "verdict accepts upserts with vectors only"
        oid = object_id(entry.bucket, entry.key)
        found = decode_labels(oid, entry.labels)
        return {"oid": oid, "vector": entry.vector.astype(np.float32).tolist(), "bucket": entry.bucket,
                "key": entry.key, "etag": entry.etag, "sequencer": entry.sequencer, "order": self._order(entry.order),
                "generation": entry.generation, "pixels": entry.pixels,
                "labels": vision_labels.encode(found) if found else "", "label_ids": [i for i, _ in found or ()],
                "modified": entry.modified, "deleted": False, "deleted_at": 0.0}

    def _tombstone(self, entry: ResultEntry, order: int, when: float) -> dict[str, Any]:
        """A deleted object's row: no vector worth finding (zeros), no metadata, the delete's order and time."""
        return {"oid": object_id(entry.bucket, entry.key), "vector": [0.0] * self.dim, "bucket": entry.bucket,
                "key": entry.key, "etag": "", "sequencer": "", "order": self._order(order),
                "generation": self.generation, "pixels": 0, "labels": "", "label_ids": [], "modified": 0.0,
                "deleted": True, "deleted_at": when}

    def expire_tombstones(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        expired = f"deleted == true and deleted_at < {cutoff!r}"
        with self._write:
            rows = self._rows(expired)
            if rows:
                with reachable(self.connection.uri):
                    self.connection.client.delete(self.collection, filter=expired, timeout=WRITE_TIMEOUT_S)
                if self._keys is not None:
                    self._keys -= rows  # a key with two tombstones counts twice: the next repair recounts
        return rows

    def repair(self) -> int:
        """Write every object that has more than one row again, with its newest row; returns how many there were
        (the checkpoint calls it: see the module's docstring)."""
        with self._write:
            return self._repair()

    def _repair(self) -> int:
        if self._keys is None:
            return 0  # this process has not written: the writer that did repairs
        rows = self._rows(EVERYTHING)
        if rows == self._keys:
            return 0
        started = time.perf_counter()
        doubled = list(self._doubled([row["oid"] for row in self._scan(EVERYTHING, [])]))
        if doubled:
            with reachable(self.connection.uri):
                self.connection.client.upsert(self.collection, [self._newest(oid) for oid in doubled],
                                              timeout=WRITE_TIMEOUT_S)
        keys = self._keys
        self._tally()
        log.warning("%d rows for %d objects (%d counted): %d objects had more than one row, written again with their "
                    "newest in %.1f s", rows, self._keys, keys, len(doubled), time.perf_counter() - started)
        return len(doubled)

    def _doubled(self, oids: list[str]) -> Iterator[str]:
        """The ids among ``oids`` (each has a row) that have more than one: each part whose ``count(*)`` is above
        its length is halved until single ids are left."""
        parts = list(_parts(oids))
        while parts:
            part = parts.pop()
            if self._rows(_among(part)) > len(part):
                if len(part) == 1:
                    yield part[0]
                else:
                    parts += [part[: len(part) // 2], part[len(part) // 2 :]]

    def _newest(self, oid: str) -> dict[str, Any]:
        """The row of ``oid`` with the highest order; on a tie, the tombstone (a delete of the same order wins,
        ``backend.verdict``: the repair kept whichever it saw first, and a deleted object came back)."""
        found = [row for deleted in ("false", "true")
                 if (row := self._newest_where(f"oid == {literal(oid)} and deleted == {deleted}")) is not None]
        return max(found, key=lambda row: (int(row["order"]), bool(row["deleted"])))

    def _newest_where(self, expr: str) -> dict[str, Any] | None:
        """The row matching ``expr`` with the highest order. A query answers one row per key, so it is asked again
        without the orders seen until nothing is left."""
        seen: list[dict[str, Any]] = []
        while True:
            orders = [int(row["order"]) for row in seen]
            kept = f" and order not in [{', '.join(json.dumps(self._order(o)) for o in orders)}]" if orders else ""
            rows = self._query(expr + kept, ROW, strong=True)
            if not rows:
                return max(seen, key=lambda row: int(row["order"])) if seen else None
            seen += rows

    # -- reading -------------------------------------------------------------------------------------------

    def get(self, bucket: str, key: str) -> Indexed | None:
        rows = self._query(f"oid == {literal(object_id(bucket, key))} and deleted == false", SCALARS)
        return _indexed(rows[0]) if rows else None

    def etags(self, oids: Sequence[str]) -> dict[str, str]:
        return {oid: row["etag"] for oid, row in self._held(list(oids), live=True).items()}

    def vector(self, bucket: str, key: str) -> np.ndarray | None:
        rows = self._query(f"oid == {literal(object_id(bucket, key))} and deleted == false", ["vector"])
        return np.asarray(rows[0]["vector"], dtype=np.float32) if rows else None

    def buckets(self) -> set[str]:
        return {row["bucket"] for row in self._scan(expression(None), ["bucket"])}

    def objects(self) -> list[Indexed]:
        return [_indexed(row) for row in self._scan(expression(None), SCALARS)]

    def tombstones(self) -> Tombstones:
        return {row["oid"]: (int(row["order"]), float(row["deleted_at"]))
                for row in self._scan("deleted == true", ["oid", "order", "deleted_at"])}

    def search_many(self, queries: np.ndarray, k: int, exclude: list[str | None] | None = None,
                    where: Filter | None = None) -> list[list[tuple[Indexed, float]]]:
        """One Milvus search for many queries; ``exclude[i]`` is an object id left out of query i's results."""
        assert queries.ndim == 2 and queries.shape[1] == self.dim, f"queries {queries.shape}, index dim {self.dim}"
        if len(queries) == 0:
            return []

        def fetch(want: int) -> list[list[tuple[Indexed, float]]]:
            with reachable(self.connection.uri):
                found = self.connection.client.search(
                    self.collection, data=np.asarray(queries, np.float32).tolist(), limit=want,
                    filter=expression(where), output_fields=SCALARS,
                    search_params=self.connection.search_params(self.index_type, want), consistency_level="Session",
                    timeout=READ_TIMEOUT_S)
            answers = [[(_indexed(hit["entity"]), float(hit["distance"])) for hit in hits] for hits in found]
            if self.index_type != "Flat" and any(len(hits) < want for hits in answers):
                answers = self._complete(queries, want, where, answers)
            return [_distinct(hits) for hits in answers]

        return nearest(fetch, k, exclude or [None] * len(queries))

    def _complete(self, queries: np.ndarray, want: int, where: Filter | None,
                  answers: list[list[tuple[Indexed, float]]]) -> list[list[tuple[Indexed, float]]]:
        """An approximate search can answer fewer than ``want`` though the filter keeps more (HNSW under a
        filter, or with tombstone rows: 54 of 59 under a prefix, 624 of 672 unfiltered, in an independent check).
        Where the filter keeps at most ``EXACT_LIMIT`` objects, they are scanned exactly, as the FAISS backend does."""
        kept = self._rows(expression(where))
        if kept > EXACT_LIMIT or all(len(hits) >= min(want, kept) for hits in answers):
            return answers
        rows = list({row["oid"]: row for row in self._scan(expression(where), ["vector", *SCALARS])}.values())
        objects = [_indexed(row) for row in rows]
        vectors = np.asarray([row["vector"] for row in rows], np.float32).reshape(len(rows), self.dim)
        scores = np.asarray(queries, np.float32) @ vectors.T
        exact = []
        for hits, row_scores in zip(answers, scores):
            if len(hits) >= min(want, kept):
                exact.append(hits)
                continue
            best = np.argsort(-row_scores, kind="stable")[:want]
            exact.append([(objects[i], float(row_scores[i])) for i in best])
        return exact

    def text_search(self, wanted: Iterable[int], k: int, where: Filter | None = None) -> list[tuple[Indexed, float]]:
        """Objects whose kept labels give ``wanted`` the most probability (summed), best first: the candidates
        come from an array filter on ``label_ids``, the sums are made here."""
        wanted = set(wanted)
        if not wanted:
            return []
        expr = f"{expression(where)} and array_contains_any(label_ids, {sorted(wanted)})"
        newest: dict[str, Indexed] = {}  # (a key with two rows until the next repair: its newest)
        for row in self._scan(expr, SCALARS):
            obj = _indexed(row)
            oid = object_id(obj.bucket, obj.key)
            if oid not in newest or newest[oid].order < obj.order:
                newest[oid] = obj
        hits = [(obj, float(sum(p for label, p in obj.labels or () if label in wanted))) for obj in newest.values()]
        hits.sort(key=lambda hit: (-hit[1], hit[0].bucket, hit[0].key))
        return hits[:k]

    def label_counts(self) -> dict[int, int]:
        """How many objects keep each label: a pass over every labelled row (Milvus 2.3 cannot group), kept for
        ``LABEL_COUNTS_S`` or until this process writes. The web page asks at each keystroke: at 1M objects that was
        ~245 queries each (an independent review); autocomplete's counts need not be exact to the second."""
        with self._counting:
            made, counts = self._label_counts
            if counts is None or time.monotonic() - made > LABEL_COUNTS_S:
                counts = {}
                for row in self._scan(f'{expression(None)} and labels != ""', ["label_ids"]):
                    for label in row["label_ids"]:
                        counts[label] = counts.get(label, 0) + 1
                self._label_counts = time.monotonic(), counts
            return counts

    # -- export, restructure -------------------------------------------------------------------------------

    def export(self) -> tuple[list[Indexed], np.ndarray, Tombstones]:
        objects, vectors, tombstones = [], [], {}
        for row in self._scan(EVERYTHING, ROW):
            if row["deleted"]:
                tombstones[row["oid"]] = (int(row["order"]), float(row["deleted_at"]))
            else:
                objects.append(_indexed(row))
                vectors.append(row["vector"])
        matrix = np.asarray(vectors, np.float32).reshape(len(vectors), self.dim)
        return objects, matrix, tombstones

    def file_bytes(self) -> int:
        return 0  # the vectors live on the Milvus server

    def outgrown(self) -> bool:
        return False  # Milvus builds an index per sealed segment, each of a bounded size, with the same parameters

    def restructure(self, index_type: str, progress: Callable[[int], None] | None = None) -> None:
        """Copy every row (tombstones too) into a new collection of this generation with ``index_type``, then
        point the alias at it if it served. Merges wait meanwhile; searches go on against the old collection."""
        if index_type not in SERVER_NAMES:
            raise ValueError(f"unknown index type {index_type!r} ({', '.join(INDEX_TYPES['milvus'])})")
        with self._write:
            started = time.perf_counter()
            self._repair()  # the copy takes one row per key, whichever a query answers
            name = collection_name(self.alias, self.generation)
            self.connection.create(name, self.model, self.dim, self.generation, index_type, len(self))
            client = self.connection.client
            with reachable(self.connection.uri):
                batch: list[dict[str, Any]] = []
                copied = 0  # live objects (the job's total), tombstones left out of the count
                for row in self._scan(EVERYTHING, ROW):
                    batch.append({**row, "order": str(int(row["order"]))})  # (into the current ``SCHEMA``)
                    copied += not row["deleted"]
                    if len(batch) == 1000:
                        client.insert(name, batch)
                        batch = []
                        if progress is not None:
                            progress(copied)
                if batch:
                    client.insert(name, batch)
                client.flush(name)
                if self._reading:  # the writer lease went meanwhile: the new writer loaded the alias and writes the
                    # old collection, which the swap would have retired and dropped under it (review 53)
                    client.drop_collection(name)
                    raise RuntimeError(f"this process lost the writer lease while it restructured {self.collection} "
                                       f"into {index_type}; the collection serves on, as the new writer's")
                old = self.collection
                serving = _alias_target(client, self.alias) == old
                if serving:
                    client.alter_alias(name, self.alias)
                self.collection, self.index_type, self.layout = name, index_type, SCHEMA
        self.connection.drop_later(old)
        log.info("generation %d is now %s in %s over %d vectors (copied in %.1f s)", self.generation, index_type,
                 name, len(self), time.perf_counter() - started)

    # -- helpers -------------------------------------------------------------------------------------------

    def _order(self, order: int) -> int | str:
        """An order as the collection's ``order`` field holds it (read back with ``int``)."""
        if self.layout >= 2:
            return str(order)
        if not -(2**63) <= order < 2**63:
            raise ValueError(f"order {order} does not fit {self.collection}'s INT64 order field (schema 1): "
                             f"`bucketlens rebuild --reindex` copies the collection into schema {SCHEMA}, "
                             "which holds any order")
        return order

    def _query(self, expr: str, fields: list[str], strong: bool = False) -> list[dict[str, Any]]:
        with reachable(self.connection.uri):
            return list(self.connection.client.query(self.collection, filter=expr, output_fields=fields,
                                                     consistency_level="Strong" if strong else "Session",
                                                     timeout=READ_TIMEOUT_S))

    def _rows(self, expr: str) -> int:
        """How many rows ``expr`` keeps (``count(*)``: rows, not keys)."""
        rows = self._query(expr, ["count(*)"], strong=True)
        return int(rows[0]["count(*)"]) if rows else 0

    def _scan(self, expr: str, fields: list[str]) -> Iterator[dict[str, Any]]:
        """Every row ``expr`` keeps, page by page in primary-key order (a query returns at most 16,384 rows).
        Not pymilvus's ``query_iterator``: against a 2.3 server it falls back to a client-side timestamp and
        missed deletes made just before (seen in tests/test_backends.py)."""
        after: str | None = None
        while True:
            page_expr = expr if after is None else f"({expr}) and oid > {literal(after)}"
            with reachable(self.connection.uri):
                page = self.connection.client.query(self.collection, filter=page_expr, limit=SCAN_BATCH,
                                                    output_fields=["oid", *fields], consistency_level="Strong",
                                                    timeout=WRITE_TIMEOUT_S)
            if not page:  # not ``len(page) < SCAN_BATCH``: a page with duplicates of a primary key comes back shorter
                return
            yield from page
            after = max(row["oid"] for row in page)


def _distinct(hits: list[tuple[Indexed, float]]) -> list[tuple[Indexed, float]]:
    """Each object once, at its best score: a key with two rows (until the checkpoint's repair) came back twice."""
    best: dict[str, tuple[Indexed, float]] = {}
    for obj, score in hits:  # (best first)
        best.setdefault(object_id(obj.bucket, obj.key), (obj, score))
    return list(best.values())


def _indexed(row: dict[str, Any]) -> Indexed:
    oid = object_id(row["bucket"], row["key"])
    return Indexed(row["bucket"], row["key"], row["etag"], row["sequencer"], int(row["order"]), int(row["generation"]),
                   int(row["pixels"]), decode_labels(oid, row["labels"]), float(row["modified"]))


def _alias_target(client: MilvusClient, alias: str) -> str | None:
    """The collection ``alias`` names, None when it names none. (Asking the collections of this namespace rather than
    ``describe_alias``, which logs an error when the alias does not exist yet.)"""
    for name in client.list_collections():
        if is_collection_of(alias, name) and alias in client.list_aliases(name)["aliases"]:
            return str(name)
    return None


def collection_name(alias: str, generation: int) -> str:
    """A new collection's name: its generation and a time stamp (a restructure makes a second one)."""
    return f"{alias}_g{generation}_{time.time_ns() // 1_000_000}"


def is_collection_of(alias: str, name: str) -> bool:
    """Whether ``name`` is one of ``collection_name(alias, ...)``. Not a prefix: namespace `prod`'s start-up took
    namespace `prod-gallery`'s collections (`bucketlens_prod_gallery_g...` starts with `bucketlens_prod_g`) for
    abandoned ones of its own, and dropped them."""
    return re.fullmatch(re.escape(alias) + r"_g\d+_\d+", name) is not None


class MilvusBackend:
    """Generations as collections behind the alias ``bucketlens_<namespace>``; checkpoints in Redis."""

    name = "milvus"
    shared = True
    index_types = INDEX_TYPES["milvus"]

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys,
                 features: Callable[[int], FeatureStore]) -> None:
        self.approximate = settings.milvus_index_type
        self.connection = Connection(settings)
        self.redis, self.keys, self.features = client, keys, features
        self.alias = "bucketlens_" + "".join(c if c.isalnum() else "_" for c in settings.namespace)
        self.last: dict[str, Any] | None = None
        self._loaded: str | None = None  # the collection ``load`` found last

    def load(self) -> tuple[MilvusIndex, str] | None:
        """The collection behind the alias and its checkpoint."""
        client = self.connection.client
        with reachable(self.connection.uri):
            serving = _alias_target(client, self.alias)
            if serving is None:
                return None
            meta = json.loads(client.describe_collection(serving)["description"])
        index = MilvusIndex(self.connection, self.alias, serving, meta["model"], int(meta["dim"]),
                            int(meta["generation"]), meta["index_type"], self.features(int(meta["generation"])),
                            int(meta.get("schema", 1)))
        last_id = self.redis.hget(self.keys.checkpoints, self.alias)
        written = self.redis.hget(self.keys.checkpoint_times, self.alias)
        if last_id and written and (self.last is None or float(written) > self.last["time"]):  # a restart; a reader
            self.last = {"name": serving, "time": float(written), "count": len(index), "last_id": text(last_id)}
        # A replica that reads loads every few seconds to follow the writer: said once per collection
        level, self._loaded = (logging.INFO if serving != self._loaded else logging.DEBUG), serving
        log.log(level, "serving Milvus collection %s: generation %d, %d vectors, stream position %s", serving,
                index.generation, len(index), text(last_id) if last_id else "0")
        return index, text(last_id) if last_id else "0"

    def drop_abandoned(self, serving: Any) -> list[str]:
        """Drop the collections of this namespace other than ``serving``'s: a rebuild or restructure interrupted by
        a restart left them (the writer calls this at start-up, once no rebuild runs)."""
        client = self.connection.client
        with reachable(self.connection.uri):
            dropped = [name for name in client.list_collections()
                       if is_collection_of(self.alias, name) and name != serving.collection]
            for name in dropped:
                log.warning("dropping Milvus collection %s: no generation uses it (interrupted rebuild)", name)
                client.drop_collection(name)
        return dropped

    def new_generation(self, model: str, generation: int) -> MilvusIndex:
        name = collection_name(self.alias, generation)
        dim = recipe(model).dim
        self.connection.create(name, model, dim, generation, "Flat")
        client = self.connection.client
        with reachable(self.connection.uri):
            if _alias_target(client, self.alias) is None:
                client.create_alias(name, self.alias)  # the first generation serves at once
        return MilvusIndex(self.connection, self.alias, name, model, dim, generation, "Flat", self.features(generation))

    def checkpoint(self, index: Any, last_id: str) -> None:
        """Repair keys with more than one row, flush the serving collection, then record ``last_id``: the stream may be
        trimmed to it."""
        assert isinstance(index, MilvusIndex), f"the Milvus backend checkpoints its own generations, not {index!r}"
        started = time.perf_counter()
        repaired = index.repair()
        with reachable(self.connection.uri):
            self.connection.client.flush(index.collection, timeout=WRITE_TIMEOUT_S)
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.checkpoints, self.alias, last_id)
            pipe.hset(self.keys.checkpoint_times, self.alias, now)
            pipe.execute()
        self.last = {"name": index.collection, "time": now, "count": len(index), "last_id": last_id,
                     "flush_s": round(time.perf_counter() - started, 3), "repaired_objects": repaired}

    def promote(self, old: Any, new: Any) -> None:
        with reachable(self.connection.uri):
            self.connection.client.alter_alias(new.collection, self.alias)
        self.connection.drop_later(old.collection)
        old.features.close(remove=True)

    def moved_from(self, current: Any) -> MilvusIndex | None:
        # By the collection behind the alias: a reader compared counts, which read the current collection, so once the
        # writer had dropped it (a reader paused past a swap; a reindex to the same type and size) every comparison
        # failed and every search answered 500 until a restart (review 21).
        restored = self.load()
        if restored is None:
            return None
        fresh = restored[0]
        if fresh.collection == current.collection:
            fresh.features.close()
            return None
        return fresh

    def stopped_writing(self, index: Any) -> None:
        index.stop_counting()

    def retire(self, old: Any) -> None:
        pass  # freed by the promote: from the alias's move on, a restart restores the new generation

    def discard(self, index: Any) -> None:
        with reachable(self.connection.uri):
            self.connection.client.drop_collection(index.collection)
        index.features.close(remove=True)

    def problem(self) -> str | None:
        try:
            with reachable(self.connection.uri):
                self.connection.client.get_server_version(timeout=2)
                state = self.connection.client.get_load_state(self.alias, timeout=2)["state"]
        except (IndexUnavailable, MilvusException, grpc.RpcError) as exc:
            log.debug("Milvus health check failed: %s", exc)
            return f"Milvus unreachable at {self.connection.uri}"
        if state in (LoadState.Loading, LoadState.NotLoad):  # (NotExist: no generation yet, or not an alias here)
            return f"Milvus at {self.connection.uri} is loading the serving collection (after a restart)"
        if state == LoadState.Loaded:
            # "Loaded" came while searches still failed: the query nodes were taking their shards back (searches
            # 503 while /readyz said ready, in a whole-suite run). A one-row query goes the way a search goes.
            try:
                with reachable(self.connection.uri):
                    self.connection.client.query(self.alias, filter=EVERYTHING, output_fields=["oid"], limit=1,
                                                 timeout=2)
            except (IndexUnavailable, MilvusException, grpc.RpcError) as exc:
                log.debug("Milvus query check failed: %s", exc)
                return f"Milvus at {self.connection.uri} does not answer queries yet (after a restart)"
        return None

    def close(self) -> None:
        if self.connection._client is not None:
            self.connection._client.close()
