"""The webhook receiver's OpenAPI document (``GET /openapi.json``). ``tests/test_openapi.py`` fuzzes the running
receiver against it."""

from __future__ import annotations

from bucketlens.openapi import answer, bearer, document, errors, obj

from .events import SNS_TYPES

INT = {"type": "integer", "minimum": 0}

RECORD = obj({
    "eventName": {"type": "string", "description": "ObjectCreated:* queues an embedding; ObjectRemoved:*, "
                                                   "LifecycleExpiration:* and ObjectLifecycle:Expiration:Current or "
                                                   ":DeleteMarker a delete; others are counted as ignored (MinIO's "
                                                   "s3: prefix is dropped)"},
    "eventSource": {"type": "string", "description": "ceph:s3 keys arrive raw; others are URL-decoded"},
    "eventTime": {"type": "string", "description": "ISO 8601; the order when no sequencer comes"},
    "s3": obj({
        "bucket": obj({"name": {"type": "string", "minLength": 1}}, ("name",)),
        "object": obj({"key": {"type": "string", "minLength": 1}, "eTag": {"type": "string"},
                       "size": {"type": "integer", "minimum": 0}, "sequencer": {"type": "string"},
                       "versionId": {"type": "string"}}, ("key",)),
    }, ("bucket", "object")),
}, ("eventName", "s3"))

SCHEMAS = {
    "Notification": {"anyOf": [
        obj({"Records": {"type": "array", "items": {"$ref": "#/components/schemas/Record"}}}, ("Records",)),
        obj({"Event": {"const": "s3:TestEvent"}}, ("Event",)),
        {"$ref": "#/components/schemas/SNSMessage"},
    ]},
    "SNSMessage": obj({
        "Type": {"enum": list(SNS_TYPES)},
        "TopicArn": {"type": "string"},
        "Message": {"type": "string", "description": "a Notification's S3 notification, as a JSON string"},
        "SubscribeURL": {"type": "string", "description": "visited to confirm a subscription, on Amazon SNS's "
                                                          "hosts (sns.<region>.amazonaws.com, https) or SNS_HOSTS"},
    }, ("Type", "TopicArn")),
    "Record": RECORD,
    "Accepted": obj({"accepted": INT, "duplicates": INT, "ignored": INT, "future": INT, "stale_deletes": {
        **INT, "description": "deletes not applied: S3 still holds the key (written again since, or forged)"}},
                    ("accepted", "duplicates", "ignored", "future", "stale_deletes")),
    "Confirmed": obj({"confirmed": {"const": True}, "topic": {"type": "string"}}, ("confirmed", "topic")),
}

PATHS = {
    "/events": {"post": {
        "summary": "S3 bucket notifications (MinIO, Ceph RGW, AWS shapes, AWS through an SNS topic); answered 2xx "
                   "only once queued; an SNS subscription is confirmed (403 when its URL is not Amazon SNS's, and for "
                   "a request with an Origin header: a web page's)",
        "security": [{"webhook": []}],
        "parameters": [{"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "the webhook token, for notifiers that cannot add headers (Ceph RGW)"}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Notification"}}}},
        "responses": {**answer("queued (future: acknowledged, not applied: its order is beyond the clock skew), or "
                               "an SNS subscription confirmed",
                               {"anyOf": [{"$ref": "#/components/schemas/Accepted"},
                                          {"$ref": "#/components/schemas/Confirmed"}]}),
                      **errors(400, 401, 403, 413, 503)},
    }},
    "/healthz": {"get": {"summary": "the process is alive", "responses": answer("alive", obj({"ok": {
        "type": "boolean"}}))}},
}

OPENAPI = document(
    "bucketlens ingest", "The webhook receiver: S3 bucket notifications in, Celery tasks (object keys) out. 503 asks "
    "the S3 server to deliver again; its code says why: Redis unreachable (redis_unavailable) or near its memory "
    "limit (redis_near_full), no index generation registered (no_generation), S3 unreachable to check a delete "
    "(s3_unavailable), the broker refusing (broker_unavailable), another delivery of the same event queueing it now "
    "(in_flight), an SNS subscription not confirmed (subscription_unconfirmed).",
    PATHS, SCHEMAS, {"webhook": bearer("BUCKETLENS_WEBHOOK_TOKEN (or ?token=)")}, guarded=False,
)
