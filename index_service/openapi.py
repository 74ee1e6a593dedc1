"""The index service's OpenAPI document (``GET /openapi.json``): every endpoint of ``app.py``, what it takes and
every status it answers with. ``tests/test_openapi.py`` fuzzes the running service against it.

A search option or filter is declared once, in ``SEARCH_FIELDS``: it becomes a JSON body field, a multipart form
field and a query parameter of ``POST /search`` at once, as ``queries.py`` reads it from all three (in a JSON body
it may be null: the default). Search bodies are closed (``queries.py`` refuses unknown fields) and hold exactly one
query (the other query members null, or left out).
"""

from __future__ import annotations

from typing import Any

from bucketlens.openapi import ERROR, Schema, answer, bearer, document, errors, json_content, obj, parameter, ref
from bucketlens.settings import ALL_INDEX_TYPES, INDEX_TYPES, only_backend
from vision.local_features import IDENTICAL, MIN_INLIERS

from .duplicates import GROUP_MATCHES
from .queries import MAX_K, MAX_TEXT

TEXT = {"type": "string"}
SOME_TEXT = {"type": "string", "minLength": 1}
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


def nullable(schema: Schema) -> Schema:
    """``schema`` or null."""
    return {"anyOf": [schema, {"type": "null"}]}


SEARCH_OPTIONS = {name: schema for name, (schema, _) in SEARCH_FIELDS.items()}
JSON_SEARCH_OPTIONS = {name: nullable(schema) for name, schema in SEARCH_OPTIONS.items()}  # null: the default
SEARCH_QUERIES: dict[str, Schema] = {  # queries.QUERIES: a JSON body holds exactly one
    "key": {"type": "string", "minLength": 1},
    "vector": {"type": "array", "items": NUMBER, "description": "the index's dimension, finite, non-zero"},
    "vector_b64": {"type": "string", "contentEncoding": "base64",
                   "description": "base64 of the vector as little-endian float32"},
    "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
             "description": "words matched against the model's ImageNet labels"},
}

NULLABLE_NUMBER = {"type": ["number", "null"]}
TEXTS = {"type": "array", "items": TEXT}


def counts(description: str) -> Schema:
    """An object of integers by name."""
    return {"type": "object", "additionalProperties": INT, "description": description}


SCHEMAS: dict[str, Schema] = {
    # (the other query members may be null, the default: review 87, {"text": "dog", "key": null} was refused)
    "SearchJSON": {"oneOf": [obj({**dict.fromkeys(SEARCH_QUERIES, {"type": "null"}), name: schema,
                                  **JSON_SEARCH_OPTIONS}, (name,), closed=True)
                             for name, schema in SEARCH_QUERIES.items()]},
    "SearchForm": obj({"image": {"type": "string", "format": "binary"}, **SEARCH_OPTIONS}, ("image",), closed=True),
    "Tag": obj({"id": {"type": "string", "description": "WordNet 3.0 synset id of the ImageNet class"},
                "name": TEXT, "score": {"type": "number", "description": "the classifier's probability"}},
               ("id", "name", "score")),
    "Tags": {"type": ["array", "null"], "items": ref("Tag"),
             "description": "the object's tags, most probable first (null: its model or worker kept none)"},
    "Class": obj({"id": {"type": "string", "description": "WordNet 3.0 synset id"}, "name": TEXT}, ("id", "name")),
    "Hit": obj({"bucket": TEXT, "key": TEXT, "etag": TEXT,
                "score": {"type": "number", "description": "cosine similarity (text: summed class probability)"},
                "verified": {"type": "boolean",
                             "description": "confirmed the same photo by local features, or the same bytes, "
                                            "when candidates were verified (rerank)"},
                "matches": {"type": ["integer", "null"],
                            "description": "local features matched with the query's (null: not checked; "
                                           f"{IDENTICAL} for the same bytes)"},
                "identical": {"type": "boolean",
                              "description": "the same bytes as the query image or object (equal etags), with "
                                             "or without rerank"},
                "labels": ref("Tags"),
                "modified": {"type": ["string", "null"], "description": "ISO 8601 UTC (null: unknown)"},
                "url": {"type": "string", "description": "presigned GET"}},
               ("bucket", "key", "etag", "score", "verified", "matches", "identical", "labels", "modified", "url")),
    "Filter": {**obj({"bucket": NULLABLE_TEXT, "prefix": TEXT,
                      "modified_after": {"type": ["string", "null"], "description": "ISO 8601 UTC"},
                      "modified_before": {"type": ["string", "null"], "description": "ISO 8601 UTC"}},
                     ("bucket", "prefix", "modified_after", "modified_before")),
               "type": ["object", "null"], "description": "the filter applied (null: none)"},
    "SearchResults": obj({
        "model": TEXT, "took_ms": NUMBER, "filter": ref("Filter"),
        "matched": {"type": "array", "description": "text queries: what each word meant",
                    "items": obj({"text": {"type": "string", "description": "the words as typed"},
                                  "lemma": {"type": "string", "description": "WordNet's lemma"},
                                  "labels": {"type": "array", "items": ref("Class"),
                                             "description": "the classes it reaches"}},
                                 ("text", "lemma", "labels"))},
        "unmatched": {**TEXTS, "description": "text queries: words that reach no class, as typed"},
        "ignored": {**TEXTS, "description": "text queries: stop words and symbols, not looked up"},
        "query_object": {**obj({"bucket": TEXT, "key": TEXT}, ("bucket", "key")),
                         "description": "key queries: the object searched by (its bucket the service's default "
                                        "where the query named none)"},
        "results": {"type": "array", "items": ref("Hit")}}, ("model", "took_ms", "filter", "results")),
    "ObjectState": obj({"bucket": TEXT, "key": TEXT,
                        "indexed": {"type": "boolean", "description": "some version of it is in the index"},
                        "state": {"enum": ["indexed", "pending", "failed"]},
                        "etag": {"type": "string", "description": "of the version the state is about"},
                        "order": {"type": "string", "description": "the version's event order (an integer)"},
                        "generation": INT,
                        "sequencer": {"type": "string", "description": "indexed: the S3 event sequencer"},
                        "labels": ref("Tags"),
                        "modified": {"type": ["string", "null"], "description": "indexed: ISO 8601 UTC (null: "
                                                                               "unknown)"},
                        "failure": {**obj({"reason": TEXT, "message": TEXT, "attempts": INT,
                                           "time": {"type": "number", "description": "seconds since the epoch"}},
                                          ("reason", "message", "attempts", "time")), "description": "failed: why"}},
                       ("bucket", "key", "state", "indexed", "etag", "order", "generation"))
                    | {"description": "sequencer, labels and modified: indexed only; failure: failed only"},
    "Ready": obj({"ready": BOOL, "reason": TEXT}, ("ready", "reason")),
    "Snapshot": obj({"name": {"type": "string", "description": "snapshot file, or Milvus collection"},
                     "time": {"type": ["number", "null"], "description": "when it was written (seconds since the "
                                                                         "epoch)"},
                     "count": {"type": "integer", "description": "vectors it holds"},
                     "last_id": {"type": "string", "description": "the last stream entry it covers"},
                     "bytes": {"type": "integer", "description": "FAISS: the file's size (one this process wrote)"},
                     "flush_s": {"type": "number", "description": "Milvus: how long the flush took"},
                     "repaired_objects": {"type": "integer",
                                          "description": "Milvus: keys with more than one row, repaired"}},
                    ("name", "time", "count", "last_id")),
    "Stats": obj({"vectors": INT, "model": TEXT, "dim": INT, "index_type": TEXT, "generation": INT,
                  "index_type_chosen": {"type": ["string", "null"],
                                        "description": "the type a rebuild asked for, kept whatever the size; "
                                                       "null: APPROX_THRESHOLD's size policy picks"},
                  "vector_file_bytes": {"type": "integer",
                                        "description": "IVF-SQ8's float16 vectors on disk (0 for other types)"},
                  "last_applied_id": {"type": "string", "description": "the last stream entry merged"},
                  "applied_entries": {"type": "integer",
                                      "description": "stream entries merged by this process's merger"},
                  "malformed_entries": {"type": "integer",
                                        "description": "stream entries this process's merger could not read and "
                                                       "skipped (logged)"},
                  "newer_entries_held": {"type": "integer",
                                         "description": "stream entries of a later version (workers upgraded "
                                                        "first) this process's merger holds unacknowledged for an "
                                                        "upgraded index service to apply (logged)"},
                  "last_snapshot": {**nullable(ref("Snapshot")), "description": "the newest checkpoint (null: none "
                                                                                "yet)"},
                  "snapshot_failures": obj({"failures": INT, "failing_s": NUMBER, "error": TEXT},
                                           ("failures", "failing_s", "error")),
                  "merge_failures": {**obj({"failures": INT, "failing_s": NUMBER, "error": TEXT},
                                              ("failures", "failing_s", "error")),
                                     "description": "merge steps that raised since start (the features folder's "
                                                    "disk full), how long the current run has lasted, its error"},
                  "rebuild": {**nullable(ref("RebuildJob")), "description": "the running or last rebuild, of this "
                                                                            "process or (on the writer) the one "
                                                                            "before it (null: none)"},
                  "backend": {"enum": list(INDEX_TYPES)}, "replica": TEXT,
                  "writer": {"type": "boolean", "description": "this replica merges the stream"},
                  "duplicates": obj({"pending": {"type": "integer", "description": "objects not yet checked"},
                                     "checked": {"type": "integer", "description": "objects checked since start"},
                                     "cpu_s": {"type": "number",
                                               "description": "the finder's CPU seconds since start"}},
                                    ("pending", "checked", "cpu_s"))},
                 ("vectors", "model", "dim", "index_type", "index_type_chosen", "vector_file_bytes", "generation",
                  "last_applied_id", "applied_entries", "malformed_entries", "newer_entries_held", "backend",
                  "replica", "writer", "last_snapshot", "snapshot_failures", "merge_failures", "rebuild",
                  "duplicates")),
    "Worker": obj({"id": TEXT, "hostname": TEXT, "pid": INT, "model": TEXT, "device": TEXT,
                   "started": NUMBER, "state": {"enum": ["idle", "busy"]},
                   "batch_size": {"type": "integer", "description": "objects of the current batch"},
                   "batch_started": NULLABLE_NUMBER, "batches": INT, "objects": INT,
                   "last_seen": {"type": "number", "description": "its last heartbeat (seconds since the epoch)"},
                   "age_s": {"type": "number", "description": "seconds since its last heartbeat"},
                   "limits": {"type": "object", "additionalProperties": INT,
                              "description": "what it refuses objects by (max_object_bytes, max_pixels): every "
                                             "worker should have the same"}},
                  ("id", "age_s")),
    "Queues": obj({
        "queues": {"type": "object", "description": "by queue name",
                   "additionalProperties": obj({"depth": INT, "by_priority": counts("by priority (0, 3, 6, 9)")},
                                               ("depth", "by_priority"))},
        "unacked": {"type": "integer", "description": "tasks delivered to workers, not yet acknowledged"},
        "unacked_live": {"type": "integer", "description": "held by a live worker"},
        "unacked_dead": {"type": "integer", "description": "held by none: their worker died (redelivered)"},
        "stream": obj({"length": INT, "lag": {"type": ["integer", "null"], "description": "entries not yet read"},
                       "pending": {"type": "integer", "description": "read, not yet acknowledged"},
                       "last_delivered_id": NULLABLE_TEXT}, ("length", "lag", "pending", "last_delivered_id")),
        "failures": {"type": "integer", "description": "failure records"},
        "pending_objects": {"type": "integer", "description": "objects sent to the workers, not yet indexed"},
        "events": counts("event counters of ingest"),
        "canary": obj({"last_seen": NULLABLE_NUMBER, "age_s": NULLABLE_NUMBER, "lag_s": NULLABLE_NUMBER,
                       "waiting_s": NUMBER,
                       "after_restart": {"type": "boolean", "description": "the outstanding canary was written just "
                                         "after the S3 server (or the supervisor) was restarted: uploads may wait "
                                         "~30 s in its topic"}},
                      ("last_seen", "age_s", "lag_s", "waiting_s", "after_restart")),
        "workers": {"type": "array", "items": ref("Worker"), "description": "live workers"},
        "index": obj({"replica": TEXT, "writer": BOOL,
                      "writer_lease": {"type": ["string", "null"],
                                       "description": "the replica that merges the stream now"}},
                     ("replica", "writer", "writer_lease"))},
        ("queues", "unacked", "unacked_live", "unacked_dead", "stream", "failures", "pending_objects", "events",
         "canary", "workers", "index")),
    "FailureRecord": obj({"bucket": TEXT, "key": TEXT, "etag": TEXT,
                          "order": {"type": "string", "description": "the version's event order (an integer)"},
                          "reason": {"type": "string", "description": "stable, machine-readable"},
                          "message": TEXT, "attempts": INT,
                          "time": {"type": "number", "description": "seconds since the epoch"}, "generation": INT,
                          "event_time": {"type": "string",
                                         "description": "when the version was written (ISO 8601; empty: unknown)"},
                          "retries": {"type": "integer", "description": "times the service sent it again by itself"},
                          "retry_at": {"type": ["number", "null"], "description": "when the service sends it again by "
                                       "itself, if S3 answers then (unreachable, fetch_timeout: at most 6 times); "
                                       "null: only POST /failures/retry does"}},
                         ("bucket", "key", "reason", "message", "attempts", "time", "retries", "retry_at")),
    "Failures": obj({"total": INT, "offset": INT, "limit": INT,
                     "failures": {"type": "array", "items": ref("FailureRecord")}},
                    ("total", "offset", "limit", "failures")),
    "FailureSelection": obj({"reason": SOME_TEXT, "bucket": SOME_TEXT,
                             "keys": {"type": "array", "items": SOME_TEXT, "minItems": 1}}, closed=True),
    "Labels": obj({"model": TEXT, "labels_kept": {"type": "boolean", "description": "the model keeps tags"},
                   "labels": {"type": "array", "items": obj({
                       "id": {"type": "string", "description": "WordNet 3.0 synset id"}, "name": TEXT,
                       "names": {**TEXTS, "description": "ImageNet's names for the class"},
                       "count": {"type": "integer", "description": "indexed objects that keep it"}},
                       ("id", "name", "names", "count"))}},
                  ("model", "labels_kept", "labels")),
    "Duplicates": obj({"model": TEXT, "total": INT, "offset": INT, "limit": INT,
                       "pending": {"type": "integer", "description": "objects not yet checked"},
                       "groups": {"type": "array", "items": obj({
                           "size": INT, "pairs": {"type": "integer", "description": "links from the largest copy"},
                           "min_matches": {"type": "integer", "description": "the weakest link's matches"},
                           "members": {"type": "array",
                                       "description": "the best copy (most pixels; within 3 % of those, the oldest)",
                                       "items": obj({"bucket": TEXT, "key": TEXT, "etag": TEXT,
                                                     "pixels": {"type": "integer",
                                                                "description": "width x height (0: unknown)"},
                                                     "url": {"type": "string", "description": "presigned GET"}},
                                                    ("bucket", "key", "etag", "pixels", "url"))}},
                           ("size", "pairs", "min_matches", "members"))}},
                      ("model", "total", "offset", "limit", "pending", "groups")),
    "RebuildRequest": obj({"mode": {"enum": ["reembed", "reindex"], "default": "reembed"},
                           "bucket": {"type": "string", "minLength": 1},
                           "index_type": {"enum": [*ALL_INDEX_TYPES, "auto"],
                                          "description": "kept whatever the index's size from the job's end on "
                                                         "(auto: the size policy picks again); " + "; ".join(
                                                             f"{t}: the {b} backend only" for t in ALL_INDEX_TYPES
                                                             if (b := only_backend(t)))},
                           "model": {"type": "string", "description": "switch models (reembed of every bucket)"}},
                          closed=True),
    "RebuildJob": obj({"id": TEXT, "mode": {"enum": ["reembed", "reindex"]},
                       "generation": {"type": "integer", "description": "the generation it builds"},
                       "model": {"type": "string", "description": "the model it embeds with"},
                       "index_type": {"type": "string", "description": "the type the index gets"},
                       "bucket": {"type": ["string", "null"], "description": "the one bucket (null: every bucket)"},
                       "chosen": {"type": ["string", "null"],
                                  "description": "index_type as asked (a type or auto; null: not asked)"},
                       "state": {"enum": ["running", "done", "failed", "cancelled"]},
                       "total": {"type": "integer", "description": "objects listed so far"},
                       "done": {"type": "integer", "description": "objects settled"},
                       "failed": {"type": "integer", "description": "objects that failed"},
                       "listed": {"type": "boolean", "description": "the listing is complete"},
                       "progress": {"type": "number", "minimum": 0, "maximum": 1, "description": "done / total"},
                       "started": {"type": "number", "description": "seconds since the epoch"},
                       "finished": {"type": ["number", "null"], "description": "seconds since the epoch"},
                       "error": {"type": "string", "description": "why it failed (empty otherwise)"},
                       "error_detail": {"type": ["string", "null"], "description": "the object that failed it, and "
                                        "what its failure said (empty if none); null where the request holds no "
                                        "read or admin token that the service asks for: it names a key"},
                       "backend": {"type": "string", "description": "the index backend it ran on (empty: a job of "
                                                                   "an earlier version)"},
                       "retrying": {"type": "integer", "description": "objects it waits on after an attempt that met "
                                    "S3 away or slow, or the model failing: sent again once the queues are quiet"},
                       "retired": {"type": ["integer", "null"], "description": "a one-bucket reembed that swapped "
                                   "in: the generation it retired, whose late results for the other buckets go to "
                                   "the new one"}},
                      ("id", "mode", "generation", "model", "index_type", "bucket", "chosen", "state", "total",
                       "done", "failed", "listed", "progress", "started", "finished", "error", "error_detail",
                       "backend", "retrying", "retired")),
    "ReconcileRequest": obj({"bucket": {"type": "string", "minLength": 1},
                             "dry_run": {"type": "boolean", "description": "count only: send and remove nothing"}},
                            closed=True),
    "Reconcile": obj({"listed": INT, "missing": INT, "changed": INT, "removed": INT,
                      "failed": {"type": "integer", "description": "missing or changed, not sent: that version "
                                                                  "already failed by its content"},
                      "in_flight": {"type": "integer", "description": "missing or changed, not sent: that version "
                                                                     "is queued already"},
                      "failures_cleared": {"type": "integer", "description": "failure records of objects the "
                                                                            "listing did not find, removed"},
                      "seconds": NUMBER,
                      "dry_run": {"type": "boolean", "description": "counted only: nothing sent, nothing removed"}},
                     ("listed", "missing", "changed", "removed", "failed", "in_flight", "failures_cleared", "seconds",
                      "dry_run")),
}

READ: list[dict[str, list[str]]] = [{}, {"read": []}]  # open on the local stack; the read token when one is configured
ADMIN: list[dict[str, list[str]]] = [{"admin": []}]


def _search_parameters() -> list[dict[str, Any]]:
    return [parameter(name, schema, description) for name, (schema, description) in SEARCH_FIELDS.items()]


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": ref(name)}}}


def _selection_parameters() -> list[dict[str, Any]]:
    """Which failure records (``failures.Selection``): query parameters, or a JSON body's fields (one given in
    both with two values is 400; an empty one is 400, not "every record")."""
    return [parameter("reason", SOME_TEXT, "only this reason"), parameter("bucket", SOME_TEXT, "only this bucket"),
            parameter("key", {"type": "array", "items": SOME_TEXT}, "only these keys (repeatable)")]


def _error(status: int, description: str) -> dict[str, Any]:
    """One error answer with a description of its own (``errors`` gives each status a generic one)."""
    return {str(status): {"description": description, "content": json_content(ref("Error"))}}


OBJECT_PATH = [parameter("bucket", {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}, "bucket", "path"),
               parameter("key", {"type": "string", "minLength": 1},
                         "object key, percent-encoded (may hold '/', newlines, any character)", "path")]

PATHS: dict[str, Any] = {
    "/healthz": {"get": {"summary": "the process is alive", "responses": answer("alive", obj({"ok": BOOL}, ("ok",)))}},
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
        "responses": {**answer("best first", ref("SearchResults")), **errors(400, 401),
                      **_error(404, "not_indexed: the key of a key query is not in the index; unknown_bucket: no "
                                    "result, and the bucket filter names a bucket S3 does not have"),
                      **errors(413, 415, 503)},
    }},
    "/objects/{bucket}/{key}": {"get": {
        "summary": "whether and how an object is indexed, or its failure record", "security": READ,
        "parameters": OBJECT_PATH,
        "responses": {**answer("known", ref("ObjectState")), **errors(400, 401, 404, 503)},
    }},
    "/preview/{bucket}/{key}": {"get": {
        "summary": "a small JPEG of an indexed object, for a browser that cannot show its file (HEIC, TIFF, ...)",
        "security": READ,
        "parameters": [*OBJECT_PATH, parameter("etag", TEXT, "only this version (404 object_changed for another); "
                                               "the answer may then be kept a day")],
        "responses": {"200": {"description": "the indexed version, oriented, its longer side at most 320 pixels",
                              "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                      **errors(400, 401, 404, 413, 415, 502, 503)},
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
        "responses": {**answer("a page of groups", ref("Duplicates")), **errors(400, 401),
                      **_error(404, "unknown_bucket: no group, and the bucket filter names a bucket S3 does not have"),
                      **errors(503)},
    }},
    "/labels": {"get": {
        "summary": "the model's labels (for text search), the most used first", "security": READ,
        "parameters": [parameter("q", TEXT, "labels with a word starting with this"),
                       parameter("limit", {"type": "integer", "minimum": 1, "default": 20},
                                 "how many (above 1000: 1000)")],
        "responses": {**answer("labels", ref("Labels")), **errors(400, 401, 503)},
    }},
    "/stats": {"get": {"summary": "the serving index", "responses": {**answer("stats", ref("Stats")), "503": {
        "description": "the index server (Milvus) unreachable: still which replica this is and whether it writes",
        "content": json_content(obj({"error": ERROR["properties"]["error"], "replica": {"type": "string"},
                                     "writer": {"type": "boolean"}}, ("error",), closed=True))}}}},
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
                               *_selection_parameters()],
                "responses": {**answer("a page of records", ref("Failures")), **errors(400, 401, 503)}},
        "delete": {"summary": "clear the selected failure records (query parameters or JSON body; none: all)",
                   "security": ADMIN, "parameters": _selection_parameters(),
                   "requestBody": {"required": False, **_json("FailureSelection")},
                   "responses": {**answer("cleared", obj({"cleared": INT}, ("cleared",))),
                                 **errors(400, 401, 403, 503)}},
    },
    "/failures/retry": {"post": {
        "summary": "send the selected failed objects to the workers again and drop their records (query "
                   "parameters or JSON body; none: all)",
        "security": ADMIN, "parameters": _selection_parameters(),
        "requestBody": {"required": False, **_json("FailureSelection")},
        "responses": {**answer("queued", obj({"retried": INT, "tasks": INT}, ("retried", "tasks")), 202),
                      **errors(400, 401, 403, 503)},
    }},
    "/rebuild": {"post": {
        "summary": "start a rebuild (reembed: a new generation beside the serving one; reindex: restructure)",
        "security": ADMIN, "requestBody": {"required": False, **_json("RebuildRequest")},
        "responses": {**answer("started", ref("RebuildJob"), 202), **errors(400, 401, 403),
                      **_error(404, "unknown_bucket: the bucket does not exist"),
                      **_error(409, "rebuild_running: one runs already; not_durable: the last rebuild's generation "
                                    "is not durable yet (its first snapshot is not written); not_writer: this replica "
                                    "does not write the index"),
                      **_error(502, "s3_refused: S3 refused to say whether the bucket exists"), **errors(503)},
    }},
    "/rebuild/{job_id}": {
        "get": {"summary": "a rebuild's state", "parameters": [parameter("job_id", TEXT, "job id", "path")],
                "responses": {**answer("the job", ref("RebuildJob")), **_error(404, "unknown_rebuild: no such job"),
                              **errors(400, 503)}},
        "delete": {"summary": "cancel a running rebuild (the serving generation stays)", "security": ADMIN,
                   "parameters": [parameter("job_id", TEXT, "job id", "path")],
                   "responses": {**answer("cancelled", ref("RebuildJob")), **errors(400, 401, 403),
                                 **_error(404, "unknown_rebuild: no such job"),
                                 **_error(409, "not_running: the job is done, failed or cancelled already; "
                                          "not_cancellable: a reindex, which ends by itself; not_writer: this "
                                          "replica does not write the index (the message names the writer)"),
                                 **errors(503)}},
    },
    "/reconcile": {"post": {
        "summary": "list the bucket and bring the index to it", "security": ADMIN,
        "requestBody": {"required": False, **_json("ReconcileRequest")},
        "responses": {**answer("done", ref("Reconcile")), **errors(400, 401, 403),
                      **_error(404, "unknown_bucket: the bucket does not exist"),
                      **_error(502, "s3_refused: S3 refused the listing"), **errors(503)},
    }},
}

OPENAPI = document(
    "bucketlens index service",
    "Similarity search over the images of S3 buckets, kept up to date from bucket notifications. Errors are "
    "JSON `{\"error\": {\"code\", \"message\"}}`.",
    PATHS, SCHEMAS,
    {"read": bearer("BUCKETLENS_READ_TOKEN, when set, or the admin token (also accepted as ?token=)"),
     "admin": bearer("BUCKETLENS_ADMIN_TOKEN (also accepted as ?token=)")},
    guarded=True,
)
