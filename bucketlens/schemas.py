"""Wire formats every part agrees on: object references (task payloads) and result-stream entries.

Everything is JSON or flat Redis fields; nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from .ordering import time_order

SCHEMA_VERSION = 1  # object references (task payloads)
# Result-stream entries: 2 added ``features`` and ``pixels``, 3 ``labels`` and ``modified``, 4 a ``failed`` note's
# ``reason``. Older entries are still read: a worker of the previous release may be running.
RESULT_VERSION = 4
READABLE_RESULTS = (b"1", b"2", b"3", b"4")
UNIT_TOLERANCE = 0.01  # how far from 1 an upsert's vector length may be (every model's are normalised; float16 on CUDA)
OPS = ("upsert", "delete", "failed", "skipped")
# Failure reasons that the object's bytes decide: the same version fails again whatever the retry (the others, S3
# unreachable, too slow, a lost worker, can pass).
CONTENT_REASONS = frozenset({"empty", "not_an_image", "corrupt", "too_many_pixels", "too_large"})


class SchemaError(ValueError):
    """A payload or stream entry that does not match the schema."""


class NewerVersion(SchemaError):
    """A stream entry of a later version than this release reads: a worker was upgraded before the index service."""


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    """What a task carries for one object: never its bytes."""

    bucket: str
    key: str
    etag: str
    size: int = 0
    sequencer: str = ""
    order: int = 0
    event_time: str = ""
    version_id: str = ""
    generation: int = 1

    @property
    def object_id(self) -> str:
        return object_id(self.bucket, self.key)

    @property
    def modified(self) -> float:
        """When the object was written (seconds since the epoch): its event's time or the listing's LastModified;
        0 when neither is known or it does not parse. To the millisecond, the precision of S3 listings: Ceph's
        events carry microseconds, and one object reached by an event and by a listing (a reembed, a reconcile)
        must keep one time, or a time filter at its own shown time would keep it once and drop it the next."""
        try:
            return time_order(self.event_time) // 1_000_000 / 1e3 if self.event_time else 0.0
        except ValueError:
            return 0.0

    def to_json(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        payload["order"] = str(self.order)  # may exceed JSON's safe integer range (hex sequencers)
        payload["v"] = SCHEMA_VERSION
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ObjectRef:
        if not isinstance(payload, dict) or payload.get("v") != SCHEMA_VERSION:
            raise SchemaError(f"unsupported object reference: {payload!r:.200}")
        try:
            return cls(
                bucket=str(payload["bucket"]),
                key=str(payload["key"]),
                etag=str(payload.get("etag", "")),
                size=int(payload.get("size", 0)),
                sequencer=str(payload.get("sequencer", "")),
                order=int(payload.get("order", 0)),
                event_time=str(payload.get("event_time", "")),
                version_id=str(payload.get("version_id", "")),
                generation=int(payload.get("generation", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"bad object reference: {exc}") from exc


def object_id(bucket: str, key: str) -> str:
    """One string per object, used as a Redis hash field; ``/`` cannot occur in a bucket name."""
    return f"{bucket}/{key}"


def split_object_id(oid: str) -> tuple[str, str]:
    bucket, _, key = oid.partition("/")
    return bucket, key


def normalise_etag(etag: str) -> str:
    return etag.strip().strip('"')


@dataclasses.dataclass(frozen=True)
class ResultEntry:
    """One result-stream entry: an upsert with its vector, a delete, or a worker's note that an object was
    ``failed`` (failure record written) or ``skipped`` (changed or gone since its event). The index applies
    upserts and deletes; the notes let a rebuild count every listed object as settled."""

    op: str  # one of OPS
    bucket: str
    key: str
    etag: str
    sequencer: str
    order: int
    generation: int
    model: str = ""
    vector: np.ndarray | None = None
    features: bytes = b""  # the object's local features (``vision.local_features`` format), when its model keeps them
    pixels: int = 0  # width x height of the stored image: the best of a group of copies has the most
    labels: str = ""  # the classifier's most probable classes (``vision.labels.encode``); "" when not known
    modified: float = 0.0  # ``ObjectRef.modified``
    reason: str = ""  # a ``failed`` note's failure reason ("" in entries of version 3 and before)

    def to_fields(self) -> dict[Any, Any]:
        """Flat Redis stream fields (typed loosely: redis-py's annotations want its own union types)."""
        fields: dict[str, bytes | str] = {
            "v": str(RESULT_VERSION),
            "op": self.op,
            "bucket": self.bucket,
            "key": self.key,
            "etag": self.etag,
            "sequencer": self.sequencer,
            "order": str(self.order),
            "generation": str(self.generation),
            "model": self.model,
            "dim": "0",
            "vector": b"",
            "features": self.features,
            "pixels": str(self.pixels),
            "labels": self.labels,
            "modified": repr(self.modified),
            "reason": self.reason,
        }
        if self.vector is not None:
            vector = np.ascontiguousarray(self.vector, dtype="<f4")
            fields["dim"] = str(vector.shape[0])
            fields["vector"] = vector.tobytes()
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> ResultEntry:
        try:
            get = {k.decode(): v for k, v in fields.items()}
            if get["v"] not in READABLE_RESULTS:
                if get["v"].isdigit() and int(get["v"]) > RESULT_VERSION:
                    raise NewerVersion(f"result entry of version {get['v'].decode()}: this index service reads "
                                       f"versions up to {RESULT_VERSION}")
                raise SchemaError(f"unsupported result entry version {get['v']!r}")
            op = get["op"].decode()
            if op not in OPS:
                raise SchemaError(f"unknown op {op!r}")
            vector = None
            if op == "upsert":
                dim = int(get["dim"])
                vector = np.frombuffer(get["vector"], dtype="<f4")
                if vector.shape[0] != dim or dim == 0:
                    raise SchemaError(f"vector has {vector.shape[0]} values, dim says {dim}")
                norm = float(np.linalg.norm(vector.astype(np.float64)))  # (NaN or infinite with such a value)
                if not abs(norm - 1) <= UNIT_TOLERANCE:  # one of huge values came first for half the queries
                    raise SchemaError(f"vector's length is {norm:.6g}: workers write vectors of length 1")
            modified = float(get.get("modified", b"0"))
            if not math.isfinite(modified):
                raise SchemaError(f"modified is {modified}")
            return cls(
                op=op,
                bucket=get["bucket"].decode(),
                key=get["key"].decode(),
                etag=get["etag"].decode(),
                sequencer=get["sequencer"].decode(),
                order=int(get["order"]),
                generation=int(get["generation"]),
                model=get["model"].decode(),
                vector=vector,
                features=get.get("features", b""),
                pixels=int(get.get("pixels", b"0")),
                labels=get.get("labels", b"").decode(),
                modified=modified,
                reason=get.get("reason", b"").decode(),
            )
        except SchemaError:
            raise
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise SchemaError(f"bad result entry: {exc}") from exc


def failure_record(ref: ObjectRef, reason: str, message: str, attempts: int, when: float) -> str:
    return json.dumps(
        {"bucket": ref.bucket, "key": ref.key, "etag": ref.etag, "order": str(ref.order), "reason": reason,
         "message": message[:500], "attempts": attempts, "time": when, "generation": ref.generation,
         "event_time": ref.event_time}
    )


def json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object read from Redis, or None for nothing there and for anything else (something else wrote into
    the namespace, or another version of bucketlens): every reader skips it rather than answering 500."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
