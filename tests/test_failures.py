"""Failure records on the real stack: bad objects become records, listed over HTTP and the CLI, retried and cleared
with the admin token; plus the selection rules."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bucketlens.cli import _retry_note
from bucketlens.keys import Keys
from bucketlens.records import REMOVE_CHUNK, remove_unchanged
from bucketlens.redis_client import connect
from bucketlens.schemas import ObjectRef, failure_record, object_id
from index_service.failures import (
    RESCAN_S,
    RETRY_FIRST_S,
    RETRY_ROUNDS,
    Passing,
    Selection,
    _refs,
    clear_held,
    list_failures,
    retry_passing,
)
from index_service.merger import stream_order
from infra.stack import Stack, scratch_redis
from ingest.publisher import Publisher
from ingest.scanner import head
from workers.pipeline import Embedded
from workers.results import ResultWriter

from .helpers import object_state, photo, wait_for
from .integrity import StreamRecorder


def cli(stack: Stack, *args: str) -> Any:
    """Run ``bucketlens failures ... --json`` against the stack the way an operator would; its parsed output."""
    env = {**os.environ, "BUCKETLENS_HOME": str(stack.home)}
    env.pop("BUCKETLENS_ADMIN_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "bucketlens.cli", "failures", *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def records(api: httpx.Client, stack: Stack, keys: list[str]) -> dict[str, dict[str, Any]]:
    response = api.get("/failures", params={"bucket": stack.settings.bucket, "key": keys})
    assert response.status_code == 200
    return {record["key"]: record for record in response.json()["failures"]}


@pytest.mark.slow
def test_bad_objects_are_listed_retried_and_cleared(stack: Stack, s3: Any, api: httpx.Client,
                                                    unique_prefix: str) -> None:
    bucket = stack.settings.bucket
    empty, text = f"{unique_prefix}empty.jpg", f"{unique_prefix}notes.jpg"
    s3.put_object(Bucket=bucket, Key=empty, Body=b"")
    s3.put_object(Bucket=bucket, Key=text, Body=b"not an image at all")

    def both(newer_than: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]] | None:
        found = records(api, stack, [empty, text])
        fresh = all(found[k]["time"] > newer_than[k]["time"] for k in found) if newer_than else True
        return found if len(found) == 2 and fresh else None

    found = wait_for(both, 90, what="two failure records")
    assert found[empty]["reason"] == "empty" and found[text]["reason"] == "not_an_image"
    assert found[empty]["attempts"] == 1 and found[text]["etag"]
    assert object_state(api, bucket, text)["state"] == "failed"  # type: ignore[index]
    by_key = api.post("/search", json={"bucket": bucket, "key": text})  # said only "not in the index"
    assert by_key.status_code == 404 and "it failed (not_an_image: " in by_key.json()["error"]["message"], by_key.text
    by_reason = api.get("/failures", params={"reason": "empty", "bucket": bucket}).json()["failures"]
    assert empty in [r["key"] for r in by_reason] and text not in [r["key"] for r in by_reason]

    listed = cli(stack, "--bucket", bucket, "--key", empty, "--key", text)
    assert {r["key"] for r in listed["failures"]} == {empty, text} and listed["total"] == 2

    selection = {"bucket": bucket, "keys": [empty, text]}
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    assert api.post("/failures/retry", json=selection).status_code == 401
    assert api.post("/failures/retry", json=selection, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert api.request("DELETE", "/failures", json=selection).status_code == 401
    assert len(records(api, stack, [empty, text])) == 2  # refused requests changed nothing
    # A typo in a selection is refused: it was read as no selection, all records (`?reasn=` cleared every one)
    for method, path in (("DELETE", "/failures"), ("POST", "/failures/retry")):
        typo = api.request(method, path, json={"reasn": "empty"}, headers=admin)
        assert typo.status_code == 400 and typo.json()["error"]["code"] == "unknown_field", typo.text
        assert "'reasn'" in typo.json()["error"]["message"]
        assert api.request(method, path, params={"reasn": "empty"}, headers=admin).status_code == 400
        twice = api.request(method, path, content=b'{"bucket": "%s", "bucket": "other"}' % bucket.encode(),
                            headers={**admin, "content-type": "application/json"})  # (was read last-wins)
        assert twice.status_code == 400 and "'bucket' given twice" in twice.json()["error"]["message"], twice.text
    assert api.get("/failures", params={"reasn": "empty"}).status_code == 400
    assert len(records(api, stack, [empty, text])) == 2

    response = api.post("/failures/retry", json=selection, headers=admin)
    assert response.status_code == 202 and response.json()["retried"] == 2
    # the objects are still bad: each fails again and gets a fresh record
    again = wait_for(lambda: both(newer_than=found), 90, what="fresh failure records after the retry")
    assert again[text]["reason"] == "not_an_image"

    response = api.request("DELETE", "/failures", json={"bucket": bucket, "keys": [empty]}, headers=admin)
    assert response.status_code == 200 and response.json() == {"cleared": 1}
    assert cli(stack, "--clear", "--bucket", bucket, "--key", text) == {"cleared": 1}
    assert records(api, stack, [empty, text]) == {}
    assert object_state(api, bucket, text) is None  # nothing pending, nothing failed, never indexed


@pytest.mark.slow
def test_a_photo_overwritten_with_a_broken_file_leaves_the_index(stack: Stack, s3: Any, api: httpx.Client,
                                                                 unique_prefix: str) -> None:
    """Overwritten with a text or a truncated upload, a photo stayed searchable under its key at score 1.0, and its
    result's link served the new bytes (an independent check). The failed version now takes the older one out."""
    bucket, key = stack.settings.bucket, f"{unique_prefix}overwritten.jpg"
    original = photo("coffee.png")
    recorder = StreamRecorder(stack, unique_prefix)  # (a checkpoint trims the stream exactly: read as written)
    recorder.start()
    s3.put_object(Bucket=bucket, Key=key, Body=original)
    wait_for(lambda: (state := object_state(api, bucket, key)) and state["state"] == "indexed", 90,
             what="the photo indexed")
    s3.put_object(Bucket=bucket, Key=key, Body=b"this is not an image\n")
    state = wait_for(lambda: (found := object_state(api, bucket, key)) and not found["indexed"] and found, 90,
                     what="the photo out of the index")
    assert state["state"] == "failed" and state["failure"]["reason"] == "not_an_image", state
    hits = api.post("/search", files={"image": ("q.jpg", original, "image/jpeg")}, data={"k": "50"})
    assert hits.status_code == 200 and key not in [hit["key"] for hit in hits.json()["results"]], hits.text
    # The other order: the text's note merged while nothing was held, then the photo's upsert (its task downloaded
    # before the overwrite and finished last), sent here as the worker would have written it.
    redis, keys = connect(stack.settings.redis_url), Keys(stack.settings.namespace)
    wait_for(lambda: {"upsert", "failed"} <= {e.op for e in recorder.entries.get(key, [])}, 10, what="both read")
    recorder.stop()
    photo_entry = next(e for e in recorder.entries[key] if e.op == "upsert")
    note = next(e for e in recorder.entries[key] if e.op == "failed")
    assert note.reason == "not_an_image", note
    late = f"{unique_prefix}late.jpg"
    s3.put_object(Bucket=bucket, Key=late, Body=b"this is not an image either\n")
    failure = wait_for(lambda: (found := object_state(api, bucket, late)) and found["state"] == "failed" and found,
                       90, what="the text's failure")
    last = redis.xadd(keys.results, dataclasses.replace(photo_entry, key=late, order=int(failure["order"]) - 5)
                      .to_fields())
    wait_for(lambda: stream_order(api.get("/stats").json()["last_applied_id"]) >= stream_order(last.decode()), 60,
             what="the late upsert merged")
    assert not object_state(api, bucket, late)["indexed"]


@pytest.mark.slow
def test_a_reconcile_clears_the_failure_records_of_objects_the_bucket_no_longer_holds(
        stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    """A broken upload deleted while its worker's batch ran: the delete cleared the failure records when it came, the
    worker wrote its record after, and it stayed for good, ``/objects`` saying ``failed`` for a key S3 no longer held
    (an independent check). Written here as that worker writes, after the delete; a reconcile removes it, and keeps
    the records of a broken object S3 still holds and of one written after its listing began."""
    bucket, gone, kept = stack.settings.bucket, f"{unique_prefix}deleted-broken.jpg", f"{unique_prefix}broken.jpg"
    for key in (gone, kept):
        s3.put_object(Bucket=bucket, Key=key, Body=b"this is not an image\n")
    wait_for(lambda: len(records(api, stack, [gone, kept])) == 2, 90, what="the failures")
    redis, keys = connect(stack.settings.redis_url), Keys(stack.settings.namespace)
    late_raw = redis.hget(keys.failures, object_id(bucket, gone))
    s3.delete_object(Bucket=bucket, Key=gone)
    wait_for(lambda: object_state(api, bucket, gone) is None, 90, what="the delete")
    unseen = f"{unique_prefix}uploaded-during-the-listing.jpg"  # its record written after the listing began
    redis.hset(keys.failures, object_id(bucket, unseen), failure_record(
        ObjectRef(bucket, unseen, "e1", order=1), "corrupt", "truncated", 1, time.time() + 60))
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    for _ in range(3):  # the stack's supervisor reconciles after a stalled canary: one in the window clears it first
        redis.hset(keys.failures, object_id(bucket, gone), late_raw)  # the late worker's write
        assert object_state(api, bucket, gone)["state"] == "failed"  # type: ignore[index]
        time.sleep(1.5)  # a reconcile keeps a record written in the second before it began (clocks of two hosts)
        counted = api.post("/reconcile", json={"dry_run": True}, headers=admin, timeout=120)
        assert counted.status_code == 200, counted.text
        left = set(records(api, stack, [gone, kept, unseen]))
        if counted.json()["failures_cleared"] >= 1 and left == {gone, kept, unseen}:  # a dry run removes nothing
            break
    else:
        raise AssertionError(f"three dry runs in a row: {counted.text}, records left {left}")
    done = api.post("/reconcile", json={}, headers=admin, timeout=120)
    assert done.status_code == 200 and done.json()["failures_cleared"] >= 1, done.text
    assert set(records(api, stack, [gone, kept, unseen])) == {kept, unseen}
    assert object_state(api, bucket, gone) is None
    redis.hdel(keys.failures, object_id(bucket, unseen))


def test_selection_from_query_and_body() -> None:
    record = {"reason": "corrupt", "bucket": "b", "key": "k"}
    assert Selection().matches(record)
    assert Selection.parse({"reason": "corrupt"}).matches(record)
    assert not Selection.parse({"reason": "empty"}).matches(record)
    assert Selection.parse({"reason": "corrupt"}, {"reason": "corrupt", "keys": ["k"]}).matches(record)
    assert not Selection.parse({}, {"bucket": "other"}).matches(record)
    assert Selection.parse({"bucket": "b"}, None, ["k", "j"]).matches(record)
    assert not Selection.parse({}, None, ["j"]).matches(record)
    with pytest.raises(ValueError, match="keys must be a non-empty list of non-empty strings"):
        Selection.parse({}, {"keys": "k"})
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        Selection.parse({}, {"reason": 3})
    with pytest.raises(ValueError, match="reason is given twice"):  # the body won, silently
        Selection.parse({"reason": "empty"}, {"reason": "corrupt"})


@pytest.mark.parametrize("query, body, keys", [
    ({"reason": ""}, None, []), ({}, {"keys": []}, []), ({}, {"reason": None}, []), ({}, {"reason": ""}, []),
    ({}, {"bucket": 0}, []), ({}, None, [""]), ({"bucket": ""}, None, []),
])
def test_an_empty_or_mistyped_selection_is_refused_not_read_as_every_record(
        query: dict[str, str], body: dict[str, Any] | None, keys: list[str]) -> None:
    """Empty and falsy values were dropped before their types were checked, and an empty selection means every
    record: ``DELETE /failures?reason=`` or ``{"keys": []}`` cleared them all, and a retry sent every failed object
    again (an independent review)."""
    with pytest.raises(ValueError, match="non-empty"):
        Selection.parse(query, body, keys)


def test_an_object_sent_again_keeps_its_modification_time() -> None:
    """A failure retried (and a lost task the orphan sweep sends again, from its pending mark) went out without its
    event's time, so the object was indexed as modified at 0, and every date filter left it out (an independent
    review). The record keeps the time and the ref sent again carries it."""
    ref = ObjectRef("b", "k.jpg", "e", order=5, event_time="2024-05-01T10:00:00.123Z", generation=1)
    record = json.loads(failure_record(ref, "fetch_timeout", "too slow", 1, 0.0))
    (again,) = _refs(record, [1])
    assert again.modified == ref.modified > 0
    assert _refs({k: v for k, v in record.items() if k != "event_time"}, [1])[0].modified == 0  # an older record


def test_records_are_removed_only_if_unchanged_since_read_in_short_calls(tmp_path: Path) -> None:
    """One compare-and-delete serves the failure records and the pending marks (it was written twice: review 63),
    in calls of ``REMOVE_CHUNK`` fields; a record written again meanwhile stays."""
    with scratch_redis(tmp_path) as (url, _):
        client = connect(url)
        read = {f"b/k{i}".encode(): f'{{"etag": "e{i}"}}'.encode() for i in range(2 * REMOVE_CHUNK + 3)}
        client.hset("h", mapping=read)
        client.hset("h", "b/k7", '{"etag": "newer"}')  # settled and queued again since it was read
        client.hdel("h", "b/k9")  # gone meanwhile
        removed = remove_unchanged(client, "h", read)
        assert sorted(removed) == sorted(set(read) - {b"b/k7", b"b/k9"})
        assert client.hgetall("h") == {b"b/k7": b'{"etag": "newer"}'}


def test_a_rebuild_that_fails_a_version_again_by_its_bytes_keeps_its_failure_time(stack: Stack) -> None:
    """Each rebuild rewrote every failure record with its own time: the records said the rebuild's time, not the
    upload's, and jumped to the top of the newest-first listing while it was paged (review 81: of 297 rows, 56
    twice and 56 records never). A rebuild's failure of the same version for the same content reason keeps the
    record's time; a retry's (the same generation), another reason, or a reason of S3 away (whose automatic retries
    count from the last try) takes the new one."""
    keys, redis = Keys(f"time{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    writer = ResultWriter(redis, keys)
    bad, away = ObjectRef("b", "bad.jpg", "e1", order=5), ObjectRef("b", "away.jpg", "e2", order=6)

    def when(ref: ObjectRef) -> float:
        return float(json.loads(redis.hget(keys.failures, ref.object_id))["time"])

    try:
        writer.write([], [(bad, "corrupt", "broken"), (away, "fetch_timeout", "slow")], [], {})
        first_bad, first_away = when(bad), when(away)
        time.sleep(0.05)
        listed = dataclasses.replace(bad, order=4, generation=2)  # a rebuild's listing of the same version
        writer.write([], [(listed, "corrupt", "broken"), (away, "fetch_timeout", "slow")], [], {})
        assert when(bad) == pytest.approx(first_bad, abs=1e-3) and when(away) > first_away
        time.sleep(0.05)
        writer.write([], [(listed, "corrupt", "broken")], [], {})  # `failures --retry` of it: when it failed again
        assert when(bad) > first_bad + 0.04
        retried = when(bad)
        time.sleep(0.05)
        writer.write([], [(bad, "too_many_pixels", "mended, then too big")], [], {})  # another reason: its time
        assert when(bad) > retried + 0.04
        assert [found["key"] for found in list_failures(redis, keys)] == ["bad.jpg", "away.jpg"]
    finally:
        redis.delete(keys.failures, keys.pending, keys.counters, keys.results, keys.stages)


def test_a_worker_settles_only_the_version_it_handled(stack: Stack) -> None:
    """A success cleared the object's failure record whatever its version, and a failed or skipped version dropped
    the object's pending mark whatever version it named (an independent review): a late success of v1 hid corrupt
    v2's record; a skipped v1 dropped v2's mark, so a lost v2 task was never sent again. On the real Redis, with
    AWS-sized orders that differ in the last digit (beyond a double's precision)."""
    keys, redis = Keys(f"settle{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    writer = ResultWriter(redis, keys)
    v1 = ObjectRef("b", "k.jpg", "etag1", order=6174108383193498085)
    v2 = ObjectRef("b", "k.jpg", "etag2", order=6174108383193498086)

    def embedded(ref: ObjectRef) -> Embedded:
        return Embedded(ref, np.ones(4, np.float32) / 2, "m")

    def failure() -> str | None:
        raw = redis.hget(keys.failures, v1.object_id)
        return json.loads(raw)["etag"] if raw else None

    try:
        writer.write([], [(v2, "corrupt", "cannot identify image file")], [], {})
        writer.write([embedded(v1)], [], [], {})  # an older version's late success
        assert failure() == "etag2"
        listed = ObjectRef("b", "k.jpg", "etag2", order=v2.order - 10)  # v2 as a listing orders it
        writer.write([embedded(listed)], [], [], {})
        assert failure() is None
        writer.write([], [(v1, "corrupt", "bad")], [], {})
        writer.write([embedded(v2)], [], [], {})  # a newer version's success clears an older one's record
        assert failure() is None
        writer.write([], [(v2, "corrupt", "cannot identify image file")], [], {})
        writer.write([], [(v1, "fetch_timeout", "timed out")], [], {})  # an older version's late failure
        assert failure() == "etag2", "it replaced corrupt v2's record, which every reconcile then sent again"
        writer.write([embedded(v2)], [], [], {})
        assert failure() is None

        redis.hset(keys.pending, v1.object_id, json.dumps({"etag": "etag2", "order": str(v2.order),
                                                             "queued": time.time()}))
        writer.write([], [(v1, "corrupt", "bad")], [v1], {})  # v1 failed, then skipped: v2's mark stays
        assert redis.hexists(keys.pending, v1.object_id)
        writer.write([], [], [v2], {})
        assert not redis.hexists(keys.pending, v1.object_id)
        redis.hset(keys.failures, v1.object_id, "not json")  # whatever wrote it: it goes, and the batch is written
        redis.hset(keys.pending, v1.object_id, "[1]")
        writer.write([embedded(v2)], [], [v1], {})
        assert not redis.hexists(keys.failures, v1.object_id) and not redis.hexists(keys.pending, v1.object_id)
    finally:
        redis.delete(keys.results, keys.failures, keys.pending, keys.counters, keys.stages)


def test_a_late_event_never_replaces_a_newer_versions_pending_mark(stack: Stack) -> None:
    """Ingest wrote an object's pending mark whatever version it named (an independent review): v1's event arriving
    after v2's replaced v2's mark, and a lost v2 task was then healed as v1. A delete cleared a newer version's
    failure record the same way. Orders differ in the last digit of an AWS-sized sequencer."""
    settings = dataclasses.replace(stack.settings, namespace=f"mark{uuid.uuid4().hex[:6]}")
    keys, redis = Keys(settings.namespace), connect(settings.redis_url)
    publisher = Publisher(settings, redis)
    v1 = ObjectRef("b", "k.jpg", "etag1", order=6174108383193498085, event_time="2024-05-01T10:00:00Z")
    v2 = dataclasses.replace(v1, etag="etag2", order=v1.order + 1)

    def mark() -> dict[str, Any]:
        return json.loads(redis.hget(keys.pending, v1.object_id) or "null")

    try:
        publisher.send_embeds([v2])
        publisher.send_embeds([v1])  # late
        assert mark()["etag"] == "etag2"
        first = mark()["queued"]
        publisher.send_embeds([v2])  # sent again (a retry, an orphan): its mark is refreshed
        assert mark()["etag"] == "etag2" and mark()["queued"] > first and mark()["event_time"] == v1.event_time
        publisher.send_embeds([dataclasses.replace(v1, etag="etag3", order=v2.order + 1)])  # a newer version
        assert mark()["etag"] == "etag3"
        redis.hset(keys.pending, v1.object_id, "not ours")
        publisher.send_embeds([v1])
        assert mark()["etag"] == "etag1"

        redis.hset(keys.failures, v1.object_id, failure_record(v2, "corrupt", "bad", 1, 0.0))
        publisher.write_deletes([v1])  # a late delete of v1
        assert redis.hexists(keys.failures, v1.object_id)
        publisher.write_deletes([dataclasses.replace(v1, etag="", order=v2.order + 1)])
        assert not redis.hexists(keys.failures, v1.object_id)
    finally:
        publisher.close()
        redis.delete(keys.results, keys.failures, keys.pending, *redis.scan_iter(keys.celery_prefix + "*"))


def test_an_empty_selection_over_http_clears_nothing(stack: Stack, api: httpx.Client) -> None:
    """``DELETE /failures?reason=`` and ``{"keys": []}`` cleared every record, and ``?limit=5&limit=6`` took the
    last (an independent review): each is 400 now, and the records stay. A record that is not ours is skipped."""
    keys, redis = Keys(stack.settings.namespace), connect(stack.settings.redis_url)
    ref = ObjectRef(stack.settings.bucket, f"empty-selection-{uuid.uuid4().hex[:6]}.jpg", "e", order=1)
    redis.hset(keys.failures, ref.object_id, failure_record(ref, "corrupt", "bad", 1, time.time()))
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    try:
        for answer in (api.delete("/failures?reason=", headers=admin),
                       api.request("DELETE", "/failures", json={"keys": []}, headers=admin),
                       api.post("/failures/retry", json={"reason": None}, headers=admin),
                       api.get("/failures?limit=5&limit=6")):
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_parameter", answer.text
        assert redis.hexists(keys.failures, ref.object_id)
        redis.hset(keys.failures, ref.object_id + ".foreign", "not ours")  # skipped, not a 500 for every page
        listed = api.get("/failures", params={"bucket": ref.bucket, "limit": 1000})
        assert listed.status_code == 200 and ref.key in [r["key"] for r in listed.json()["failures"]]
        assert api.get(f"/objects/{ref.bucket}/{ref.key}.foreign").status_code == 404  # (was 500)
        redis.hset(keys.failures, ref.object_id + ".bare", '{"etag": "e2"}')  # an etag and nothing else (was 500)
        bare = api.get(f"/objects/{ref.bucket}/{ref.key}.bare")
        assert bare.status_code == 200 and bare.json()["state"] == "failed" and bare.json()["order"] is None, bare.text
    finally:
        redis.hdel(keys.failures, ref.object_id, ref.object_id + ".foreign", ref.object_id + ".bare")


def test_failures_of_s3_away_are_sent_again_by_themselves_less_and_less_often(stack: Stack) -> None:
    """Review 53: an S3 outage past the workers' retries (~3 min) failed every upload queued meanwhile for good (an
    overwritten key lost its older picture too); only `failures --retry` or a reconcile brought them back. Such a
    record is now sent again by the index service while S3 answers, each time 4x as long after the last; a failure
    by the object's bytes is not. On the real Redis, with the real publisher (its tasks go to a namespace of its
    own, which no worker reads)."""
    settings = dataclasses.replace(stack.settings, namespace=f"auto{uuid.uuid4().hex[:6]}")
    keys, redis = Keys(settings.namespace), connect(settings.redis_url)
    publisher = Publisher(settings, redis)
    away, corrupt = ObjectRef("b", "away.jpg", "e1", order=1), ObjectRef("b", "bad.jpg", "e2", order=2)
    answers = [False]

    def fail(ref: ObjectRef, reason: str, when: float) -> None:
        redis.hset(keys.failures, ref.object_id, failure_record(ref, reason, "S3 did not answer", 9, when))

    def retry(now: float) -> int:
        return retry_passing(redis, keys, publisher, lambda: answers[0], now)

    redis.hset(keys.generations, "1", "m")  # (as the index service registers its serving generation)
    try:
        fail(away, "unreachable", 1000.0)
        fail(corrupt, "corrupt", 1000.0)
        assert retry(1000 + RETRY_FIRST_S - 1) == 0  # too soon
        assert retry(1000 + RETRY_FIRST_S) == 0 and redis.hexists(keys.failures, away.object_id)  # S3 still away
        answers[0] = True
        assert retry(1000 + RETRY_FIRST_S) == 1
        assert not redis.hexists(keys.failures, away.object_id) and redis.hexists(keys.pending, away.object_id)
        assert redis.hexists(keys.failures, corrupt.object_id)  # its bytes: the same again, whatever the retry
        assert retry(9000) == 0 and redis.hget(keys.auto_retries, away.object_id) == b"1"  # in flight: counted still
        fail(away, "fetch_timeout", 2000.0)  # and failed again
        assert retry(2000 + 4 * RETRY_FIRST_S - 1) == 0
        # `failures` says when, and how often so far (an operator saw such a record and could not tell: review 55)
        listed = {found["key"]: found for found in list_failures(redis, keys)}
        assert (listed["away.jpg"]["retries"], listed["away.jpg"]["retry_at"]) == (1, 2000 + 4 * RETRY_FIRST_S)
        assert (listed["bad.jpg"]["retries"], listed["bad.jpg"]["retry_at"]) == (0, None)
        assert "to be sent again by itself once S3 answers; 1 time so far" in _retry_note(listed["away.jpg"])
        assert _retry_note(listed["bad.jpg"]) == ""
        assert retry(2000 + 4 * RETRY_FIRST_S) == 1 and redis.hget(keys.auto_retries, away.object_id) == b"2"
        redis.hdel(keys.pending, away.object_id)  # indexed at last: the worker took its mark away
        assert retry(9000) == 0 and not redis.hexists(keys.auto_retries, away.object_id)
        # A running rebuild's records are its own to send again; and rounds end, the record left for the user.
        shadow = dataclasses.replace(away, generation=2)
        fail(shadow, "unreachable", 1000.0)
        assert retry_passing(redis, keys, publisher, lambda: True, 9000, leave=(2,)) == 0
        redis.hset(keys.auto_retries, away.object_id, RETRY_ROUNDS)
        redis.hset(keys.pending, away.object_id, "{}")  # (still marked: the count stays)
        assert retry(10**9) == 0 and redis.hexists(keys.failures, away.object_id)
        given_up = next(found for found in list_failures(redis, keys) if found["key"] == "away.jpg")
        assert (given_up["retries"], given_up["retry_at"]) == (RETRY_ROUNDS, None)
        assert _retry_note(given_up) == f" (sent again by itself {RETRY_ROUNDS} times: yours to retry)"
    finally:
        publisher.close()
        redis.delete(keys.failures, keys.pending, keys.auto_retries, keys.counters, keys.generations,
                     *redis.scan_iter(keys.celery_prefix + "*"))


def test_the_sweep_reads_every_record_only_when_a_worker_counted_one_of_s3_away(stack: Stack) -> None:
    """``retry_passing`` read and parsed every failure record every 30 s: 1.3-2.0 s of the index service's CPU
    and a 62 ms HGETALL at 100k records of objects that are not images (review 54). ``Passing`` reads them all
    when a worker's write counted a new record of S3 away or slow, or ``RESCAN_S`` after the last whole read, and
    in between only those it found. On the real Redis, records written by the workers' own writer."""
    keys, redis = Keys(f"passing{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    writer, passing = ResultWriter(redis, keys), Passing()
    away, other, bad = (ObjectRef("b", key, "e", order=1) for key in ("away.jpg", "other.jpg", "bad.jpg"))

    def read(now: float) -> list[str]:
        return sorted(found["key"] for _, _, found in passing.read(redis, keys, now))

    try:
        writer.write([], [(away, "unreachable", "S3 did not answer"), (bad, "corrupt", "truncated")], [], {})
        assert read(1000) == ["away.jpg"]  # the corrupt one: not S3's, not parsed
        redis.hset(keys.failures, other.object_id, failure_record(other, "fetch_timeout", "slow", 9, 999))
        assert read(1030) == ["away.jpg"]  # written without a worker's count: only the records known are read
        assert read(1000 + RESCAN_S) == ["away.jpg", "other.jpg"]  # ... until the whole read comes round
        redis.hdel(keys.failures, away.object_id)
        assert read(1000 + RESCAN_S + 30) == ["other.jpg"]
        writer.write([], [(away, "fetch_timeout", "slow")], [], {})  # counted: read at once
        assert read(1000 + RESCAN_S + 60) == ["away.jpg", "other.jpg"]
    finally:
        redis.delete(keys.failures, keys.pending, keys.counters, keys.results, keys.stages)


def test_a_cancelled_rebuild_leaves_no_record_on_what_serves_nor_one_sent_below_its_tombstone(stack: Stack) -> None:
    """Review 57, after a reembed under a lower MAX_PIXELS was cancelled: (1) ~20 photos that searches found stayed
    listed as failed (the cancelled generation's records), counted as failures for good; (2) its listing's record
    of an upload that had failed replaced the event's, ordered by the listing's millisecond time, below the
    tombstone that the event's failure left: `failures --retry` sent it, the worker embedded it, and the index
    discarded it as older. On the real Redis, written by the workers' own writer."""
    keys, redis = Keys(f"held{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    writer = ResultWriter(redis, keys)
    event = ObjectRef("b", "big.png", "e1", order=1_765_000_000_123_456_789, generation=4)  # a sequencer's order
    listed = dataclasses.replace(event, order=1_765_000_000_123_000_000, generation=6)  # LastModified's, in ms
    fine = ObjectRef("b", "fine.png", "e2", order=5, generation=6)
    try:
        writer.write([], [(event, "too_many_pixels", "too big")], [], {})
        writer.write([], [(listed, "too_many_pixels", "too big"), (fine, "too_many_pixels", "too big")], [], {})
        records = {found["key"]: found for found in list_failures(redis, keys)}
        assert records["big.png"]["generation"] == 6 and records["big.png"]["order"] == str(event.order)
        [sent] = _refs(records["big.png"], [4])  # sent to the serving generation with the event's order
        assert (sent.generation, sent.order) == (4, event.order)
        # The rebuild ends; the serving generation holds fine.png (it failed only under the rebuild's limit).
        assert clear_held(redis, keys, 6, lambda oids: {fine.object_id: "e2"} if fine.object_id in oids else {}) == 1
        assert [found["key"] for found in list_failures(redis, keys)] == ["big.png"]  # not held: it stays
        # A batch that ran on past the cancel writes no record for its generation (its note and count, as ever)
        late = ObjectRef("b", "late.png", "e3", order=7, generation=6)
        writer.write([], [(late, "too_large", "too big")], [], {}, abandoned={6})
        assert not redis.hexists(keys.failures, late.object_id)
        assert redis.hget(keys.counters, "failed:too_large") == b"1" and redis.xlen(keys.results) == 4
        # An order the record's writer was not ours (a number, null) is not kept (review 58: "1e+20", "userdata"),
        # and a record cjson cannot read (a lone surrogate, which Python's json writes) is written as it is
        odd = ObjectRef("b", "odd.png", "e4", order=9, generation=4)
        for foreign in ('{"etag": "e4", "order": 1e20}', '{"etag": "e4", "order": null}'):
            redis.hset(keys.failures, odd.object_id, foreign)
            writer.write([], [(odd, "corrupt", "bad")], [], {})
            assert json.loads(redis.hget(keys.failures, odd.object_id))["order"] == "9"
        redis.hset(keys.failures, odd.object_id, json.dumps({"etag": "e4", "order": "99"}))
        writer.write([], [(odd, "corrupt", "bad \ud800 bytes")], [], {})
        assert json.loads(redis.hget(keys.failures, odd.object_id))["message"] == "bad \ud800 bytes"
    finally:
        redis.delete(keys.failures, keys.pending, keys.counters, keys.results, keys.stages)


@pytest.mark.slow
def test_an_object_whose_fetch_met_s3_away_is_indexed_once_s3_answers(stack: Stack, s3: Any, api: httpx.Client) -> None:
    """The index service's own sweep, at its default timing: a record of S3 away, written as the workers write it
    once their retries are spent, for an object in a bucket no notification covers (only the retry brings it)."""
    bucket, key = f"auto-retry-{uuid.uuid4().hex[:8]}", "coffee.jpg"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=photo("coffee.png"))
    keys, redis = Keys(stack.settings.namespace), connect(stack.settings.redis_url)
    found = head(s3, bucket, key, generation=api.get("/stats").json()["generation"])
    assert found is not None
    written = redis.pipeline()  # as a worker writes it (results.py), its count too, dated back to be due now
    written.hset(keys.failures, found.object_id, failure_record(found, "unreachable", "S3 unreachable: refused", 9,
                                                                time.time() - RETRY_FIRST_S))
    written.hincrby(keys.counters, "failed:unreachable", 1)
    written.execute()
    try:
        wait_for(lambda: (object_state(api, bucket, key) or {}).get("state") == "indexed", 180,
                 what="the object sent again and indexed")
        assert not redis.hexists(keys.failures, found.object_id)
        retried = re.search(r"^bucketlens_failures_retried_total (\S+)$", api.get("/metrics").text, re.MULTILINE)
        assert retried is not None and float(retried.group(1)) >= 1
    finally:
        s3.delete_object(Bucket=bucket, Key=key)
        admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
        assert api.post("/reconcile", json={"bucket": bucket}, headers=admin).status_code == 200  # out of the index
        s3.delete_bucket(Bucket=bucket)
