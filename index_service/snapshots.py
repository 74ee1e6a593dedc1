"""Snapshots of the serving index: vectors, per-object state, tombstones and the last applied stream id.

Format: one ``.npz`` (NumPy zip) holding ``vectors`` (float32, n x dim; for an IVF-SQ8 index ``float16``, the
float16 vectors its searches re-rank with, from which a restore makes its 8-bit codes again), what IVF training
left (``TRAINED``) and ``meta``, a UTF-8 JSON document stored as a uint8 array (``left``: the rows of objects a
merge removed while the snapshot was written, zeros that a restore skips). Read without pickle
(``allow_pickle=False``, and the vectors as raw numbers): a snapshot from S3 cannot execute code. Written to a
temporary file a chunk of vectors at a time, fsynced, then renamed, so a crash never leaves a half-written snapshot
under a real name; read back the same way, chunk by chunk, so neither holds a second copy of the vectors
(bench/README.md, "Memory")."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import redis
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from bucketlens.outage import FailureRun
from vision import labels

from .backend import Indexed
from .feature_store import FeatureStore
from .vector_index import CHUNK, VectorIndex, release_freed_memory, scalar_quantizer

log = logging.getLogger(__name__)
SUFFIX = ".snapshot.npz"
# 2 added each object's pixel count and the feature store's name, 3 its labels and modification time, 4 what an
# IVF index's training left (``TRAINED``: a restart does not train it again), 5 an IVF-SQ8 index's vectors as
# float16 (v4 held its 8-bit codes: a restored index re-ranks with those decoded until its objects are uploaded again),
# 6 ``left``: the rows of objects that a merge removed while the snapshot was written (zeros, skipped by a restore)
VERSION = 6
TRAINED = ("centroids", "scalar_quantizer")  # vector_index.trained_state's arrays, one .npy each
READABLE = (1, 2, 3, 4, 5, 6)  # older snapshots still load (their objects without labels and times, IVF retrained)
ABANDONED_S = 600  # a snapshot's temporary file untouched this long was left by a killed writer


class SnapshotError(ValueError):
    """A snapshot that cannot be used (truncated, foreign model or dimension, unknown version)."""


def encode(index: VectorIndex, last_id: str, out: BinaryIO, spool: Path | None = None) -> dict[str, Any]:
    """Write the snapshot of ``index`` to ``out``, its vectors a chunk at a time (``np.load`` reads the result);
    returns its meta, less the objects and tombstones. ``last_id`` must have been applied before this is called;
    merges go on while it runs (a checkpoint has a thread of its own): the snapshot holds the objects the index held
    when it began, less those a merge removed before their chunk was read (their rows are zeros, listed in ``left``).
    Each of those went in a batch after ``last_id``, which a restore replays. The meta's JSON is made a few thousand
    objects at a time in a file in ``spool`` (at 5M objects it is ~1 GB, and made whole it held 2.7 GB while the
    vectors were written: bench/README.md "Memory")."""
    objects, ids, tombstones = index.contents()
    index_type, trained = index.structure()
    meta = {
        "v": VERSION,
        "model": index.model,
        "dim": index.dim,
        "index_type": index_type,
        "generation": index.generation,
        "last_id": last_id,
        "created": time.time(),
        "count": len(objects),
        "features": index.features.path.name if index.features.path is not None else None,
    }

    def object_row(o: Indexed) -> list[Any]:
        return [o.bucket, o.key, o.etag, o.sequencer, str(o.order), o.generation, o.pixels,
                None if o.labels is None else labels.encode(o.labels), o.modified]

    lists: dict[str, tuple[list[Any], Callable[[Any], Any]]] = {
        "objects": (objects, object_row),
        "tombstones": (list(tombstones.items()), lambda item: [item[0], str(item[1][0]), item[1][1]]),
    }
    name, dtype, _ = _vectors_member(VERSION, trained, index.dim)
    left: list[int] = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(name, "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                      "shape": (len(ids), index.dim)}
            np.lib.format.write_array_header_2_0(member, header)
            start = 0
            for kept, vectors in index.vectors_of(ids):
                left += (start + np.flatnonzero(~kept)).tolist()
                member.write(np.ascontiguousarray(vectors, dtype).data.cast("B"))
                start += len(kept)
        for part, array in trained.items():
            with archive.open(f"{part}.npy", "w") as member:
                np.lib.format.write_array(member, array)
        meta["left"] = left
        _write_json(archive, "meta.npy", meta, lists, spool)
    if left:
        log.info("%d objects left the index while its snapshot was written; a restore replays their changes",
                 len(left))
    return meta


def _write_json(archive: zipfile.ZipFile, name: str, fields: dict[str, Any],
                lists: dict[str, tuple[list[Any], Callable[[Any], Any]]], spool: Path | None) -> None:
    """The .npy member ``name``: a UTF-8 JSON object of ``fields`` and, for each of ``lists``, the list of its
    items as its function writes them, made a slice at a time in a spooled file (its length goes in the header)."""
    with tempfile.SpooledTemporaryFile(64 * 2**20, dir=None if spool is None else str(spool)) as text:
        text.write(json.dumps(fields)[:-1].encode())  # all but the closing brace
        for key, (items, row) in lists.items():
            text.write(f", {json.dumps(key)}: [".encode())
            for start in range(0, len(items), 4096):
                part = json.dumps([row(item) for item in items[start : start + 4096]])[1:-1]  # no brackets
                text.write(((", " if start else "") + part).encode())
            text.write(b"]")
        text.write(b"}")
        size = text.tell()
        text.seek(0)
        with archive.open(name, "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("u1")), "fortran_order": False, "shape": (size,)}
            np.lib.format.write_array_header_2_0(member, header)
            shutil.copyfileobj(text, member, 2**20)


def decode(source: str | Path | BinaryIO, dims: Mapping[str, int],
           features: Callable[[int], FeatureStore] = lambda _: FeatureStore()) -> tuple[VectorIndex, dict[str, Any]]:
    """The index in the snapshot ``source`` (a path or a seekable file) and its meta (``encode``'s, less the lists
    of objects and tombstones: the last applied stream id, when it was created, ...); raises
    SnapshotError rather than half-loading. ``features`` opens a generation's feature store (which lives beside the
    snapshots: feature_store.py). The vectors are read a chunk at a time into the index, never all at once.

    ``dims`` maps the models this service can run to their dimension: a snapshot of another model, or whose
    dimension does not match its model's, is refused. (After a model-switching rebuild the newest snapshot's
    model is not ``settings.model``, which only names the model of a brand-new index.)"""
    try:
        with zipfile.ZipFile(source) as archive:
            meta = json.loads(np.lib.format.read_array(archive.open("meta.npy"), allow_pickle=False).tobytes())
            if meta.get("v") not in READABLE:
                raise SnapshotError(f"snapshot schema version {meta.get('v')!r}, expected one of {READABLE}")
            model, dim = meta.get("model"), meta.get("dim")
            if model not in dims:
                raise SnapshotError(f"snapshot is for model {model!r}; this service knows {', '.join(dims)}")
            if dim != dims[model]:
                raise SnapshotError(f"snapshot has dim {dim}, but {model} embeds {dims[model]}-d vectors")
            objects = [_object(row) for row in meta["objects"]]
            tombstones = {oid: (int(order), float(when)) for oid, order, when in meta["tombstones"]}
            if len(objects) != meta["count"]:
                raise SnapshotError(f"snapshot lists {len(objects)} objects, its count says {meta['count']}")

            trained = {name: np.lib.format.read_array(archive.open(f"{name}.npy"), allow_pickle=False)
                       for name in TRAINED if f"{name}.npy" in archive.namelist()}
            if any(array.dtype != np.float32 for array in trained.values()) or (
                    "centroids" in trained and trained["centroids"].shape[1:] != (dim,)) or (
                    "scalar_quantizer" in trained and trained["scalar_quantizer"].shape != (2 * dim,)):
                raise SnapshotError(f"snapshot holds {[(a.shape, a.dtype) for a in trained.values()]} training")
            name, dtype, decoded = _vectors_member(meta["v"], trained, dim)
            if name not in archive.namelist():
                raise SnapshotError(f"snapshot has no {name}")
            kept = np.ones(len(objects), bool)
            kept[np.asarray(meta.get("left", []), np.int64)] = False  # objects removed while it was written (v6)
            if not kept.all():
                objects = [o for o, keep in zip(objects, kept) if keep]

            def chunks() -> Iterator[np.ndarray]:
                start = 0
                for rows in _rows(archive, name, dtype, (meta["count"], dim)):
                    mine = kept[start : start + len(rows)]
                    yield decoded(rows if mine.all() else rows[mine])
                    start += len(rows)

            generation = int(meta["generation"])
            index = VectorIndex.restored(model, dim, generation, objects, chunks, tombstones,
                                         meta.get("index_type", "Flat"), features(generation), trained)
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise SnapshotError(f"unreadable snapshot: {exc}") from exc
    return index, {k: v for k, v in meta.items() if k not in ("objects", "tombstones", "left")}


def _vectors_member(version: int, trained: dict[str, np.ndarray], dim: int
                    ) -> tuple[str, np.dtype[Any], Callable[[np.ndarray], np.ndarray]]:
    """Where a snapshot of ``version`` keeps its vectors: the .npy member's name, its dtype, and what makes float32
    rows of its rows."""
    if "scalar_quantizer" not in trained:
        return "vectors.npy", np.dtype("<f4"), lambda rows: rows
    if version >= 5:
        return "float16.npy", np.dtype("<f2"), lambda rows: rows.astype(np.float32)
    return "codes.npy", np.dtype("u1"), scalar_quantizer(trained, dim).decode


def _rows(archive: zipfile.ZipFile, name: str, dtype: np.dtype[Any], shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """The rows of the .npy member ``name``, ``CHUNK`` at a time; its header must say ``dtype`` and ``shape``."""
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise SnapshotError(f"snapshot {name} in .npy format {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found, fortran, found_dtype = read_header(member)
        if found_dtype != dtype or fortran or found != shape:
            raise SnapshotError(f"snapshot {name} holds {found} {found_dtype}, expected {shape} {dtype}")
        row_bytes = dtype.itemsize * shape[1]
        for start in range(0, shape[0], CHUNK):
            rows = min(CHUNK, shape[0] - start)
            data = member.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise SnapshotError(f"snapshot truncated at row {start + len(data) // row_bytes} of {name}")
            yield np.frombuffer(data, dtype).reshape(rows, shape[1])


def _object(row: list[Any]) -> Indexed:
    """One object row of any readable version: v1 has 6 fields, v2 adds pixels, v3 labels and the time."""
    bucket, key, etag, sequencer, order, generation, *rest = row
    pixels = int(rest[0]) if rest else 0
    found = labels.decode(rest[1]) if len(rest) > 1 and rest[1] else None
    modified = float(rest[2]) if len(rest) > 2 else 0.0
    return Indexed(bucket, key, etag, sequencer, int(order), int(generation), pixels, found, modified)


class SnapshotHealth(FailureRun):
    """Whether snapshots are being written: a disk that is full or read-only (or a refused S3 copy) must not stop
    serving or merging, but it must show (log, metrics, and ``/readyz`` once it has lasted ``grace_s``), since the
    result stream is not trimmed meanwhile and a restart would replay all of it."""

    def __init__(self, retry_s: float, grace_s: float, client: redis.Redis | None = None, key: str = "") -> None:
        super().__init__()
        self.retry_s = retry_s
        self.grace_s = grace_s
        self.retry_at = 0.0  # monotonic: no attempt before (a full disk is not hammered after every merge)
        # Where the time a run of failures began is kept (a wall-clock time in Redis), so that a restarted service
        # goes on counting: each restart began the grace again (review 83: "failing for 4 s" after ~3 minutes), and
        # one restarted more often than ``grace_s`` never said it was not ready.
        self._client, self._key = client, key

    def failed(self, exc: BaseException) -> bool:
        begins = super().failed(exc)
        self.retry_at = time.monotonic() + self.retry_s
        if self._client is not None:  # (kept while failures go on: a run not continued soon, the service down a
            # while or its disk mended meanwhile, is forgotten, or a later failure would start at its end)
            with contextlib.suppress(redis.RedisError, ValueError, TypeError):
                kept = round(self.grace_s + 3 * self.retry_s)
                if not begins:
                    self._client.expire(self._key, kept)
                elif not self._client.set(self._key, repr(time.time()), nx=True, ex=kept):
                    self._client.expire(self._key, kept)
                    began = float(self._client.get(self._key))  # type: ignore[arg-type]
                    self.since = time.monotonic() - max(0.0, time.time() - began)
        if begins:
            log.error("snapshot failed, serving and merging go on, the result stream is not trimmed; retrying every "
                      "%.0f s, /readyz answers 503 after %.0f s of this: %s", self.retry_s, self.grace_s, self.error)
        else:
            log.warning("snapshot failed again (failing for %.0f s): %s", self.failing_s(), self.error)
        return begins

    def written(self) -> None:
        if (lasted := self.worked()) is not None:
            log.warning("snapshot written again after failing for %.0f s", lasted)
        if self._client is not None:
            with contextlib.suppress(redis.RedisError):  # (a run a previous process began ends here too)
                self._client.delete(self._key)

    def unready_reason(self) -> str | None:
        """Why ``/readyz`` should answer 503, once snapshots have failed for longer than ``grace_s``."""
        if not self.lasted(self.grace_s):
            return None
        return (f"snapshots failing for {self.failing_s():.0f} s ({self.error}); the result stream is not trimmed "
                "meanwhile: free the snapshot folder's disk or make it writable")


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def local_folder(home: str | Path, namespace: str) -> Path:
    """Where a namespace's snapshots lie on disk (the FAISS backend writes them; a Milvus service looks whether FAISS
    ran in this home)."""
    return Path(home) / "snapshots" / namespace


class SnapshotStore:
    """Snapshots in a local folder and, optionally, under an S3 prefix; keeps the newest ``keep``."""

    def __init__(self, folder: Path, keep: int = 3, s3: Any = None, bucket: str = "", prefix: str = "",
                 older: str | None = None) -> None:
        self.folder = folder
        self.keep = max(1, keep)
        self.s3, self.bucket, self.prefix = s3, bucket, prefix
        self.older = older  # a prefix whose copies (directly under it) are read when ``prefix`` holds none
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last: dict[str, Any] | None = None  # name, time, count, last_id of the newest snapshot written

    def write(self, index: VectorIndex, last_id: str) -> Path:
        # Named after the newest there is even if the clock stepped back: named by the clock alone, each new snapshot
        # sorted below the older ones and was pruned as soon as written (an independent review).
        newest = max((int(p.name[:20]) for p in self._local() if p.name[:20].isdigit()), default=0)
        name = f"{max(time.time_ns(), newest + 1):020d}-g{index.generation}{SUFFIX}"
        path = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as handle:
                meta = encode(index, last_id, handle, self.folder)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _sync_folder(self.folder)  # the rename itself is durable before the stream is trimmed to it
        except OSError:
            with contextlib.suppress(OSError):  # a full disk leaves no half file behind (a read-only one none)
                tmp.unlink(missing_ok=True)
            raise
        finally:
            release_freed_memory()
        try:
            if self.s3 is not None:
                self.s3.upload_file(str(path), self.bucket, self.prefix + name)  # streamed (multipart when large)
                self._prune_remote()
        finally:  # (a refused S3 copy left every local one behind: a full snapshot more per attempt)
            self._prune_local()
        self.last = {"name": name, "time": meta["created"], "count": meta["count"] - len(meta["left"]),
                     "last_id": last_id, "bytes": path.stat().st_size}
        return path

    def _prune_local(self) -> None:
        """Older snapshots still hold deleted images' vectors: keep only the newest few. A temporary file that has not
        grown for ``ABANDONED_S`` is what a process killed while writing a snapshot left (as large as the index)."""
        for old in self._local()[self.keep :]:
            old.unlink(missing_ok=True)
        for partial in self.folder.glob(f".*{SUFFIX}.tmp"):
            with contextlib.suppress(OSError):  # (gone meanwhile: renamed by the writer that was still on it)
                if time.time() - partial.stat().st_mtime > ABANDONED_S:
                    partial.unlink()
                    log.warning("removed %s, a snapshot its writer never finished", partial.name)

    def _prune_remote(self) -> None:
        for key in self._remote()[self.keep :]:
            self.s3.delete_object(Bucket=self.bucket, Key=key)

    def _local(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SUFFIX}"), reverse=True)

    def _download(self, key: str) -> BinaryIO:
        """An S3 snapshot copy in a temporary file (gone once closed), not in memory."""
        spool = tempfile.TemporaryFile(dir=self.folder)
        try:
            self.s3.download_fileobj(self.bucket, key, spool)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool  # type: ignore[return-value]

    def _remote(self, prefix: str | None = None) -> list[str]:
        """The S3 copies directly under ``prefix`` (``self.prefix``), newest first."""
        prefix = self.prefix if prefix is None else prefix
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted((key for o in listing.get("Contents", []) if (key := o["Key"]).endswith(SUFFIX)
                       and "/" not in key[len(prefix) :]), reverse=True)

    def load_newest(self, dims: Mapping[str, int], features: Callable[[int], FeatureStore] = lambda _: FeatureStore()
                    ) -> tuple[VectorIndex, str] | None:
        """The newest snapshot that loads, the local ones first, then the S3 copies; one that does not load is reported
        and skipped for the previous one. S3 unreachable or refusing raises ``ConnectionError``: the caller waits for
        it, as for a Milvus server, rather than start empty (the next checkpoints then pruned the real copies: an
        independent review)."""
        local = [(p.name, functools.partial(contextlib.nullcontext, p)) for p in self._local()]
        loaded = self._first_loading(local, dims, features)
        if loaded is not None or self.s3 is None:
            return loaded
        try:
            remote = self._remote() or (self._remote(self.older) if self.older is not None else [])
            return self._first_loading([(k, functools.partial(self._download, k)) for k in remote], dims, features)
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            where = f"s3://{self.bucket}/{self.prefix}"
            raise ConnectionError(f"cannot read the snapshot copies in {where}: {exc}") from exc

    def _first_loading(self, candidates: Sequence[tuple[str, Callable[[], ContextManager[Any]]]],
                       dims: Mapping[str, int], features: Callable[[int], FeatureStore]
                       ) -> tuple[VectorIndex, str] | None:
        for name, opened in candidates:
            try:
                with opened() as source:
                    index, meta = decode(source, dims, features)
            except SnapshotError as exc:
                log.error("skipping snapshot %s: %s", name, exc)
                continue
            except (BotoCoreError, ClientError, Boto3Error):
                raise
            except Exception:  # (a bug decoding it must not hide the older ones)
                log.exception("skipping snapshot %s, which did not load", name)
                continue
            last_id = str(meta["last_id"])
            log.info("loaded snapshot %s: %d vectors, stream position %s", name, len(index), last_id)
            self.last = {"name": name, "time": meta.get("created"), "count": len(index), "last_id": last_id}
            return index, last_id
        return None
