"""The index service's OpenAPI document (``GET /openapi.json``): every endpoint of ``app.py``, what it takes and
every status it answers with. ``tests/test_openapi.py`` fuzzes the running service against it.

A search option or filter is declared once, in ``SEARCH_FIELDS``: it becomes a JSON body field, a multipart form
field and a query parameter of ``POST /search`` at once, as ``queries.py`` reads it from all three. Search bodies are
closed (``queries.py`` refuses unknown fields) and hold exactly one query.
"""

from __future__ import annotations

from typing import Any

from bucketlens.openapi import Schema, answer, bearer, document, errors, obj, parameter, ref
from vision.local_features import MIN_INLIERS

from .duplicates import GROUP_MATCHES
from .queries import MAX_K, MAX_TEXT

TEXT = {"type": "string"}
INT = {"type": "integer"}
NUMBER = {"type": "number"}
BOOL = {"type": "boolean"}
TIME = {"type": "string", "description": "ISO 8601 date or date-time (UTC when no offset is given)"}
NULLABLE_TEXT = {"type": ["string", "null"]}

# name -> (schema, description): options and filters every kind of search takes (queries.OPTIONS).
SEARCH_FIELDS: dict[str, tuple[Schema, str]] = {
    "k": ({"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}, "how many results"),
    "min_score": (NUMBER, "drop results scoring below this"),
    "rerank": (BOOL, "verify candidates with local features (image and key queries; default: the model's)"),
    "bucket": (TEXT, "only objects of this bucket (with a key query: the key's bucket)"),
    "prefix": (TEXT, "only keys starting with this (a folder)"),
    "modified_after": (TIME, "only objects modified at or after this time"),
    "modified_before": (TIME, "only objects modified before this time"),
}

SEARCH_OPTIONS = {name: schema for name, (schema, _) in SEARCH_FIELDS.items()}
SEARCH_QUERIES: dict[str, Schema] = {  # queries.QUERIES: a JSON body holds exactly one
    "key": {"type": "string", "minLength": 1},
    "vector": {"type": "array", "items": NUMBER, "description": "the index's dimension, finite, non-zero"},
    "vector_b64": {"type": "string", "contentEncoding": "base64",
                   "description": "base64 of the vector as little-endian float32"},
    "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
             "description": "words matched against the model's ImageNet labels"},
}

SCHEMAS: dict[str, Schema] = {
    "SearchJSON": {"oneOf": [obj({name: schema, **SEARCH_OPTIONS}, (name,), closed=True)
                             for name, schema in SEARCH_QUERIES.items()]},
    "SearchForm": obj({"image": {"type": "string", "format": "binary"}, **SEARCH_OPTIONS}, ("image",), closed=True),
    "Hit": obj({"bucket": TEXT, "key": TEXT, "etag": TEXT, "score": NUMBER, "verified": BOOL,
                "matches": {"type": ["integer", "null"],
                            "description": "local features matched with the query's (null: not checked)"},
                "labels": {"type": ["array", "null"]}, "modified": NULLABLE_TEXT,
                "url": {"type": "string", "description": "presigned GET"}},
               ("bucket", "key", "etag", "score", "url")),
    "SearchResults": obj({"model": TEXT, "took_ms": NUMBER, "filter": {"type": ["object", "null"]},
                          "results": {"type": "array", "items": ref("Hit")}}, ("model", "took_ms", "results")),
    "ObjectState": obj({"bucket": TEXT, "key": TEXT, "indexed": BOOL,
                        "state": {"enum": ["indexed", "pending", "failed"]}, "etag": TEXT, "order": TEXT,
                        "generation": INT, "failure": obj({"reason": TEXT, "message": TEXT, "attempts": INT,
                                                           "time": NUMBER})},
                       ("bucket", "key", "state", "indexed", "etag", "order", "generation")),
    "Ready": obj({"ready": BOOL, "reason": TEXT}, ("ready", "reason")),
    "Stats": obj({"vectors": INT, "model": TEXT, "dim": INT, "index_type": TEXT, "generation": INT,
                  "index_type_chosen": {"type": ["string", "null"],
                                        "description": "the type a rebuild asked for, kept whatever the size; "
                                                       "null: APPROX_THRESHOLD's size policy picks"},
                  "vector_file_bytes": {"type": "integer",
                                        "description": "IVF-SQ8's float16 vectors on disk (0 for other types)"},
                  "last_applied_id": TEXT, "last_snapshot": {"type": ["object", "null"]},
                  "snapshot_failures": obj({"failures": INT, "failing_s": NUMBER, "error": TEXT}),
                  "rebuild": {"type": ["object", "null"]}, "backend": TEXT, "replica": TEXT,
                  "writer": {"type": "boolean", "description": "this replica merges the stream"}},
                 ("vectors", "model", "dim", "generation")),
    "Queues": obj({"queues": {"type": "object"}, "unacked": INT, "unacked_live": INT, "unacked_dead": INT,
                   "stream": {"type": "object"}, "failures": INT, "pending_objects": INT, "events": {"type": "object"},
                   "canary": {"type": "object"}, "workers": {"type": "array", "items": {"type": "object"}},
                   "index": obj({"replica": TEXT, "writer": BOOL, "writer_lease": {"type": ["string", "null"]}})},
                  ("queues", "unacked", "unacked_live", "unacked_dead", "stream", "failures", "workers")),
    "Failures": obj({"total": INT, "offset": INT, "limit": INT, "failures": {"type": "array"}},
                    ("total", "offset", "limit", "failures")),
    "FailureSelection": obj({"reason": TEXT, "bucket": TEXT, "keys": {"type": "array", "items": TEXT}}),
    "Labels": obj({"model": TEXT, "labels_kept": BOOL, "labels": {"type": "array"}}, ("model", "labels")),
    "Duplicates": obj({"model": TEXT, "total": INT, "offset": INT, "limit": INT, "pending": INT,
                       "groups": {"type": "array"}}, ("model", "total", "groups")),
    "RebuildRequest": obj({"mode": {"enum": ["reembed", "reindex"], "default": "reembed"},
                           "bucket": {"type": "string", "minLength": 1},
                           "index_type": {"enum": ["Flat", "IVF", "IVF-SQ8", "HNSW", "auto"],
                                          "description": "kept whatever the index's size from the job's end on "
                                                         "(auto: the size policy picks again); IVF-SQ8: FAISS "
                                                         "backend only; HNSW: Milvus backend only"},
                           "model": {"type": "string", "description": "switch models (reembed of every bucket)"}}),
    "RebuildJob": obj({"id": TEXT, "mode": TEXT, "generation": INT, "state":
                       {"enum": ["running", "done", "failed", "cancelled"]}, "total": INT, "done": INT, "failed": INT,
                       "started": NUMBER, "finished": {"type": ["number", "null"]}, "error": TEXT},
                      ("id", "mode", "state", "total", "done", "failed", "started")),
    "BucketRequest": obj({"bucket": {"type": "string", "minLength": 1}}),
    "Reconcile": obj({"listed": INT, "missing": INT, "changed": INT, "removed": INT, "failed": INT,
                      "seconds": NUMBER}, ("listed", "missing", "changed", "removed")),
}

READ: list[dict[str, list[str]]] = [{}, {"read": []}]  # open on the local stack; the read token when one is configured
ADMIN: list[dict[str, list[str]]] = [{"admin": []}]


def _search_parameters() -> list[dict[str, Any]]:
    return [parameter(name, schema, description) for name, (schema, description) in SEARCH_FIELDS.items()]


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": ref(name)}}}


PATHS: dict[str, Any] = {
    "/healthz": {"get": {"summary": "the process is alive", "responses": answer("alive", obj({"ok": BOOL}))}},
    "/readyz": {"get": {"summary": "ready: index loaded, stream replayed, model warm, Redis answering, snapshots "
                                   "written",
                        "responses": {**answer("ready", ref("Ready")),
                                      "503": {"description": "not ready; the reason says why",
                                              "content": {"application/json": {"schema": ref("Ready")}}}}}},
    "/search": {"post": {
        "summary": "similar images: by image (multipart field 'image'), JSON key, vector, vector_b64 or text, or a "
                   "raw float32 vector",
        "security": READ, "parameters": _search_parameters(),
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref("SearchJSON")},
            "multipart/form-data": {"schema": ref("SearchForm")},
            "application/octet-stream": {"schema": {
                "type": "string", "format": "binary",
                "description": "the vector as little-endian float32 (options as query parameters)"}}}},
        "responses": {**answer("best first", ref("SearchResults")), **errors(400, 401, 404, 413, 415, 503)},
    }},
    "/objects/{bucket}/{key}": {"get": {
        "summary": "whether and how an object is indexed, or its failure record", "security": READ,
        "parameters": [parameter("bucket", {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}, "bucket",
                                 "path"),
                       parameter("key", {"type": "string", "minLength": 1},
                                 "object key, percent-encoded (may hold '/', newlines, any character)", "path")],
        "responses": {**answer("known", ref("ObjectState")), **errors(401, 404, 503)},
    }},
    "/duplicates": {"get": {
        "summary": "groups of near-duplicate images", "security": READ,
        "parameters": [parameter("offset", {"type": "integer", "minimum": 0}, "groups to skip (above 10^9: 10^9)"),
                       parameter("limit", {"type": "integer", "minimum": 1, "default": 50},
                                 "groups to answer (above 1000: 1000)"),
                       parameter("min_matches", {"type": "integer", "minimum": MIN_INLIERS, "default": GROUP_MATCHES},
                                 f"verified matches a link needs (at least {MIN_INLIERS}: pairs with fewer are not "
                                 "kept; above 10^9 answered as 10^9)"),
                       parameter("bucket", TEXT, "only this bucket"), parameter("prefix", TEXT, "only these keys")],
        "responses": {**answer("a page of groups", ref("Duplicates")), **errors(400, 401, 503)},
    }},
    "/labels": {"get": {
        "summary": "the model's labels (for text search), the most used first", "security": READ,
        "parameters": [parameter("q", TEXT, "labels with a word starting with this"),
                       parameter("limit", {"type": "integer", "minimum": 1, "default": 20},
                                 "how many (above 1000: 1000)")],
        "responses": {**answer("labels", ref("Labels")), **errors(400, 401, 503)},
    }},
    "/stats": {"get": {"summary": "the serving index", "responses": {**answer("stats", ref("Stats")),
                                                                       **errors(503)}}},
    "/queues": {"get": {"summary": "queue depths, unacked tasks (live and dead workers), stream, failures, workers",
                        "responses": {**answer("the queue report", ref("Queues")), **errors(503)}}},
    "/metrics": {"get": {"summary": "Prometheus text format", "responses": {"200": {
        "description": "metrics", "content": {"text/plain": {"schema": TEXT}}}}}},
    "/failures": {
        "get": {"summary": "failure records, newest first", "security": READ,
                "parameters": [parameter("offset", {"type": "integer", "minimum": 0},
                                         "records to skip (above 10^9: 10^9)"),
                               parameter("limit", {"type": "integer", "minimum": 1, "default": 100},
                                         "records (above 1000: 1000)"),
                               parameter("reason", TEXT, "only this reason"), parameter("bucket", TEXT, "only here"),
                               parameter("key", {"type": "array", "items": TEXT}, "only these keys")],
                "responses": {**answer("a page of records", ref("Failures")), **errors(400, 401, 503)}},
        "delete": {"summary": "clear the selected failure records", "security": ADMIN,
                   "requestBody": {"required": False, **_json("FailureSelection")},
                   "responses": {**answer("cleared", obj({"cleared": INT}, ("cleared",))),
                                 **errors(400, 401, 403, 503)}},
    },
    "/failures/retry": {"post": {
        "summary": "send the selected failed objects to the workers again", "security": ADMIN,
        "requestBody": {"required": False, **_json("FailureSelection")},
        "responses": {**answer("queued", obj({"retried": INT, "tasks": INT}, ("retried", "tasks")), 202),
                      **errors(400, 401, 403, 503)},
    }},
    "/rebuild": {"post": {
        "summary": "start a rebuild (reembed: a new generation beside the serving one; reindex: restructure)",
        "security": ADMIN, "requestBody": {"required": False, **_json("RebuildRequest")},
        "responses": {**answer("started", ref("RebuildJob"), 202), **errors(400, 401, 403, 404, 409, 503)},
    }},
    "/rebuild/{job_id}": {
        "get": {"summary": "a rebuild's state", "parameters": [parameter("job_id", TEXT, "job id", "path")],
                "responses": {**answer("the job", ref("RebuildJob")), **errors(404, 503)}},
        "delete": {"summary": "cancel a running rebuild (the serving generation stays)", "security": ADMIN,
                   "parameters": [parameter("job_id", TEXT, "job id", "path")],
                   "responses": {**answer("cancelled", ref("RebuildJob")), **errors(401, 403, 404, 409, 503)}},
    },
    "/reconcile": {"post": {
        "summary": "list the bucket and bring the index to it", "security": ADMIN,
        "requestBody": {"required": False, **_json("BucketRequest")},
        "responses": {**answer("done", ref("Reconcile")), **errors(400, 401, 403, 404, 503)},
    }},
}

OPENAPI = document(
    "bucketlens index service",
    "Similarity search over the images of S3 buckets, kept up to date from bucket notifications. Errors are "
    "JSON `{\"error\": {\"code\", \"message\"}}`.",
    PATHS, SCHEMAS,
    {"read": bearer("BUCKETLENS_READ_TOKEN, when set (also accepted as ?token=)"),
     "admin": bearer("BUCKETLENS_ADMIN_TOKEN (also accepted as ?token=)")},
)
