"""End to end on the real stack: upload -> Ceph notification -> ingest -> Celery -> stream -> index -> HTTP."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from typing import Any
from urllib.parse import quote_plus

import httpx
import numpy as np
import pytest
from PIL import Image

from bucketlens.s3 import make_client
from index_service.presign import Presigner
from infra.stack import Stack

from .helpers import FIXTURES, object_state, photo, truncated_jpeg, wait_for

pytestmark = pytest.mark.slow


def put(s3: Any, stack: Stack, key: str, body: bytes) -> str:
    etag: str = s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=body)["ETag"].strip('"')
    return etag


def wait_indexed(api: httpx.Client, stack: Stack, key: str, etag: str, timeout_s: float = 90) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        state = object_state(api, stack.settings.bucket, key)
        return state if state and state["state"] == "indexed" and state["etag"] == etag else None

    return wait_for(done, timeout_s, what=f"{key} indexed with etag {etag}")  # type: ignore[no-any-return]


def search_image(api: httpx.Client, data: bytes, k: int = 10, prefix: str = "") -> list[dict[str, Any]]:
    """``prefix``: the test's own objects (the suite uploads the same photos under other prefixes: byte-identical
    copies score the same, and equal scores come in key order, so another test's copy could come first)."""
    response = api.post("/search", files={"image": ("q.jpg", data, "image/jpeg")},
                        data={"k": str(k), **({"prefix": prefix} if prefix else {})})
    assert response.status_code == 200, response.text
    return response.json()["results"]  # type: ignore[no-any-return]


def test_the_stacks_redis_fsyncs_before_it_answers(stack: Stack) -> None:
    """With ``everysec`` a power loss of the Redis host lost up to a second of events ingest had acknowledged."""
    from bucketlens.redis_client import connect

    config = connect(stack.settings.redis_url).config_get("append*")
    assert (config["appendonly"], config["appendfsync"]) == ("yes", "always"), config


def test_upload_becomes_searchable_and_near_duplicates_are_found(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    names = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png")
    etags = {f"{unique_prefix}{n}.jpg": put(s3, stack, f"{unique_prefix}{n}.jpg", photo(n)) for n in names}
    for key, etag in etags.items():
        state = wait_indexed(api, stack, key, etag)
        assert state["indexed"] is True and state["generation"] == api.get("/stats").json()["generation"]

    best = search_image(api, photo("chelsea.png"), prefix=unique_prefix)[0]
    assert best["key"] == f"{unique_prefix}chelsea.png.jpg" and best["score"] > 0.99
    assert best["url"].startswith(stack.settings.s3_endpoint) and "Signature" in best["url"]
    assert httpx.get(best["url"]).content == photo("chelsea.png")  # the presigned URL really serves it

    mine = [r for r in search_image(api, photo("rocket.jpg", transform=True), prefix=unique_prefix)
            if r["key"] in etags]
    assert mine[0]["key"] == f"{unique_prefix}rocket.jpg.jpg"

    by_key = api.post("/search", json={"key": f"{unique_prefix}coffee.png.jpg", "bucket": stack.settings.bucket})
    assert by_key.status_code == 200
    assert f"{unique_prefix}coffee.png.jpg" not in [r["key"] for r in by_key.json()["results"]]
    # A key named without its bucket is the default bucket's, and the answer says which (the web page shows it).
    by_key = api.post("/search", json={"key": f"{unique_prefix}coffee.png.jpg", "k": 1})
    assert by_key.json()["query_object"] == {"bucket": stack.settings.bucket, "key": f"{unique_prefix}coffee.png.jpg"}


def test_overwrite_replaces_and_delete_removes(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    key = f"{unique_prefix}changing.jpg"
    wait_indexed(api, stack, key, put(s3, stack, key, photo("chelsea.png")))
    wait_indexed(api, stack, key, put(s3, stack, key, photo("coffee.png")))
    hits = {r["key"]: r["score"] for r in search_image(api, photo("coffee.png"), k=50, prefix=unique_prefix)}
    assert hits[key] > 0.99
    hits = {r["key"]: r["score"] for r in search_image(api, photo("chelsea.png"), k=50, prefix=unique_prefix)}
    assert hits.get(key, 0) < 0.9  # the old content is gone

    s3.delete_object(Bucket=stack.settings.bucket, Key=key)
    wait_for(lambda: object_state(api, stack.settings.bucket, key) is None, 60, what=f"{key} deleted")
    assert key not in [r["key"] for r in search_image(api, photo("coffee.png"), k=100)]


def test_a_multi_object_delete_removes_every_object(stack: Stack, s3: Any, api: httpx.Client,
                                                    unique_prefix: str) -> None:
    """DeleteObjects (`aws s3 rm --recursive`, rclone, mc), which aborted Ceph 16's radosgw under beast with the
    stack's persistent notification topic (infra/ceph.sh, start_rgw)."""
    keys = [f"{unique_prefix}bulk-{name}.jpg" for name in ("chelsea.png", "coffee.png", "rocket.jpg")]
    for key, name in zip(keys, ("chelsea.png", "coffee.png", "rocket.jpg")):
        wait_indexed(api, stack, key, put(s3, stack, key, photo(name)))
    answer = s3.delete_objects(Bucket=stack.settings.bucket, Delete={"Objects": [{"Key": key} for key in keys]})
    assert sorted(d["Key"] for d in answer["Deleted"]) == sorted(keys) and not answer.get("Errors")
    wait_for(lambda: all(object_state(api, stack.settings.bucket, key) is None for key in keys), 60,
             what="every object deleted")
    assert s3.list_objects_v2(Bucket=stack.settings.bucket, Prefix=f"{unique_prefix}bulk-")["KeyCount"] == 0


def test_duplicate_notifications_give_one_vector(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    key = f"{unique_prefix}dup key+ü.jpg"
    etag = put(s3, stack, key, photo("moon.png"))
    wait_indexed(api, stack, key, etag)
    record = {"eventSource": "ceph:s3", "eventName": "ObjectCreated:Put", "eventTime": "2030-01-01T00:00:00Z",
              "s3": {"bucket": {"name": stack.settings.bucket},
                     "object": {"key": key, "eTag": etag, "size": 1, "sequencer": "00000000FFFFFFFF"}}}
    body = json.dumps({"Records": [record]})
    url = f"{stack.ingest_url}/events?token={stack.settings.webhook_token}"
    first, second = httpx.post(url, content=body), httpx.post(url, content=body)
    assert first.json()["accepted"] == 1
    assert second.json() == {"accepted": 0, "duplicates": 1, "ignored": 0, "future": 0, "stale_deletes": 0}
    stats = api.get("/stats").json()
    wait_for(lambda: api.get("/queues").json()["stream"]["lag"] == 0, 60, what="stream drained")
    assert api.get("/stats").json()["vectors"] >= stats["vectors"]
    keys = [r["key"] for r in search_image(api, photo("moon.png"), k=100)]
    assert keys.count(key) == 1


def test_bad_objects_become_failures_and_the_batch_goes_on(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    bad = {"zero.jpg": (b"", "empty"), "text.jpg": (b"just some text, not a picture", "not_an_image"),
           "truncated.jpg": (truncated_jpeg(), "corrupt")}
    for name, (body, _) in bad.items():
        put(s3, stack, unique_prefix + name, body)
    good = unique_prefix + "good.jpg"
    wait_indexed(api, stack, good, put(s3, stack, good, photo("coins.png")))
    for name, (_, reason) in bad.items():
        state = wait_for(lambda n=name: (s := object_state(api, stack.settings.bucket, unique_prefix + n))
                         and s["state"] == "failed" and s, 60, what=f"failure record for {name}")
        assert state["failure"]["reason"] == reason and state["indexed"] is False
    listed = api.get("/failures", params={"reason": "empty"}).json()["failures"]
    assert unique_prefix + "zero.jpg" in [f["key"] for f in listed]

    # Fixing the object clears its failure record by itself.
    fixed = unique_prefix + "zero.jpg"
    wait_indexed(api, stack, fixed, put(s3, stack, fixed, photo("camera.png")))
    assert fixed not in [f["key"] for f in api.get("/failures", params={"limit": 1000}).json()["failures"]]


def test_receiver_requires_the_token_and_rejects_malformed_bodies(stack: Stack) -> None:
    url = f"{stack.ingest_url}/events"
    assert httpx.post(url, content=b'{"Records": []}').status_code == 401
    wrong = httpx.post(url, content=b'{"Records": []}', headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    auth = {"Authorization": f"Bearer {stack.settings.webhook_token}"}
    malformed = httpx.post(url, content=b'{"Records": [', headers=auth)
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    huge = httpx.post(url, content=b"x" * (stack.settings.max_body_bytes + 1), headers=auth)
    assert huge.status_code == 413


def test_search_input_errors_are_clear(stack: Stack, api: httpx.Client) -> None:
    cases = [
        ({"json": {"vector": [0.1] * 3}}, 400, "bad_vector"),
        ({"json": {"vector": [float("nan")] * 1280}}, 400, "bad_json"),  # NaN is not valid JSON
        ({"content": b'{"vector": [' + b"NaN," * 1279 + b"NaN]}", "headers": {"content-type": "application/json"}},
         400, "bad_vector"),
        ({"json": {"vector_b64": "not base64!"}}, 400, "bad_vector"),
        ({"json": {"vector_b64": base64.b64encode(b"\0" * 1280 * 4).decode()}}, 400, "bad_vector"),  # zero vector
        ({"content": b"\0\0\0", "headers": {"content-type": "application/octet-stream"}}, 400, "bad_vector"),
        ({"content": b"\0" * 12, "headers": {"content-type": "application/octet-stream"}}, 400, "bad_vector"),
        ({"json": {"key": "never/uploaded.jpg"}}, 404, "not_indexed"),
        ({"json": {"key": 5}}, 400, "bad_key"),
        ({"json": {}}, 400, "empty_query"),
        ({"json": {"vector": [1.0] * 1280, "k": "many"}}, 400, "bad_parameter"),
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "bad_json"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"files": {"image": ("x.jpg", b"not an image", "image/jpeg")}}, 415, "not_an_image"),
        ({"files": {"other": ("x.jpg", b"abc", "image/jpeg")}}, 400, "missing_image"),
    ]
    for kwargs, status, code in cases:
        if code == "bad_json" and "json" in kwargs:
            continue  # httpx refuses to serialise NaN; the raw-bytes case covers it
        response = api.post("/search", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert response.json()["error"]["code"] == code
    assert api.get("/objects/test-images/never/seen.jpg").status_code == 404


def test_a_vector_query_answers_the_same_in_every_form(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """JSON numbers, base64 float32 in JSON and a raw float32 body (the compact forms skip parsing 1280 numbers)."""
    key = f"{unique_prefix}coffee.jpg"
    wait_indexed(api, stack, key, put(s3, stack, key, photo("coffee.png")))
    vector = np.random.default_rng(0).random(1280).astype("<f4")
    forms = [
        api.post("/search", json={"vector": vector.tolist(), "k": 5, "prefix": unique_prefix}),
        api.post("/search", json={"vector_b64": base64.b64encode(vector.tobytes()).decode(), "k": 5,
                                  "prefix": unique_prefix}),
        api.post("/search", content=vector.tobytes(), params={"k": 5, "prefix": unique_prefix},
                 headers={"content-type": "application/octet-stream"}),
    ]
    answers = [(r.status_code, [(h["key"], h["score"]) for h in r.json()["results"]]) for r in forms]
    assert answers[0] == answers[1] == answers[2] == (200, answers[0][1]) and answers[0][1][0][0] == key


def test_presigned_urls_work_for_awkward_keys(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    key = f"{unique_prefix}a b+c%20d ü~ (1)&x=y.jpg"
    body = photo("horse.png")
    wait_indexed(api, stack, key, put(s3, stack, key, body))
    (hit,) = [r for r in search_image(api, body, prefix=unique_prefix) if r["key"] == key]
    response = httpx.get(hit["url"])  # signed by index_service/presign.py, served by radosgw
    assert response.status_code == 200 and response.content == body


def test_an_aws_event_through_sns_is_indexed(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    """AWS S3 -> SNS topic -> ingest: the envelope's Message is the notification, with AWS's URL-encoded key and
    hex sequencer. Sent to the running ingest for an object of a bucket without notifications of its own, so
    that only this event can bring it in."""
    bucket, key = f"sns-{unique_prefix.strip('/')}", "trips/new york/times sq+night 東京.jpg"
    s3.create_bucket(Bucket=bucket)
    etag = s3.put_object(Bucket=bucket, Key=key, Body=photo("coffee.png"))["ETag"].strip('"')
    envelope = json.loads((FIXTURES / "sns_notification.json").read_bytes())
    notification = json.loads(envelope["Message"])
    notification["Records"][0]["s3"]["bucket"]["name"] = bucket
    notification["Records"][0]["s3"]["object"].update(key=quote_plus(key, safe="/"), eTag=etag, size=1)
    envelope["Message"] = json.dumps(notification)
    response = httpx.post(f"{stack.ingest_url}/events", params={"token": stack.settings.webhook_token},
                          content=json.dumps(envelope), timeout=30,
                          headers={"content-type": "text/plain; charset=UTF-8", "x-amz-sns-message-type":
                                   "Notification"})  # as SNS posts it
    assert response.status_code == 200 and response.json()["accepted"] == 1, response.text
    state = wait_for(lambda: (o := object_state(api, bucket, key)) and o["state"] == "indexed" and o, 120,
                     what="the object of the SNS event indexed")
    assert state["etag"] == etag


def test_empty_s3_keys_take_boto3s_own_credentials(stack: Stack, s3: Any, monkeypatch: pytest.MonkeyPatch,
                                                    unique_prefix: str) -> None:
    """On AWS the keys usually come from an instance or task role: with both settings empty, the clients and the
    presigned URLs use boto3's chain (here its environment variables, holding the local S3 server's keys)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", stack.settings.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", stack.settings.s3_secret_key)
    chained = dataclasses.replace(stack.settings, s3_access_key="", s3_secret_key="")
    key = unique_prefix + "role.jpg"
    make_client(chained).put_object(Bucket=chained.bucket, Key=key, Body=b"bytes signed by the chain's keys")
    fetched = httpx.get(Presigner(chained).url(chained.bucket, key), timeout=30)
    assert fetched.status_code == 200 and fetched.content == b"bytes signed by the chain's keys", fetched.text
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert httpx.get(Presigner(chained).url(chained.bucket, key), timeout=30).status_code == 403  # signed by them
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ValueError, match="boto3 finds no credentials"):
        Presigner(chained)


def test_result_urls_never_serve_the_uploaders_content_type(stack: Stack, s3: Any, unique_prefix: str) -> None:
    """A valid PNG followed by HTML, stored as text/html, is indexed like any PNG; its result URL rendered the HTML
    and ran the uploader's script on the S3 server's origin (an independent security check). URLs now say the
    type S3 answers with: the key's image type, else application/octet-stream."""
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png, "PNG")
    body = png.getvalue() + b"<html><body><script>alert(document.domain)</script>"
    presigner = Presigner(stack.settings)
    for name, served in (("poly.png", "image/png"), ("poly.html", "application/octet-stream"),
                         ("poly.svg", "application/octet-stream")):
        s3.put_object(Bucket=stack.settings.bucket, Key=unique_prefix + name, Body=body, ContentType="text/html")
        fetched = httpx.get(presigner.url(stack.settings.bucket, unique_prefix + name), timeout=30)
        assert fetched.status_code == 200 and fetched.content == body, fetched.text[:200]
        assert fetched.headers["content-type"] == served, (name, fetched.headers)
