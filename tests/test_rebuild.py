"""Zero-downtime rebuilds and reconcile on the real stack."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError

import index_service.rebuild as rebuild_module
from bucketlens.keys import Keys
from bucketlens.ordering import parse_iso
from bucketlens.records import Records
from bucketlens.redis_client import connect
from bucketlens.schemas import ObjectRef, ResultEntry, failure_record
from index_service.filters import Filter
from index_service.orphans import drop_settled
from index_service.rebuild import MODEL_FAILS, PASSING_ROUNDS, NotWriter, RebuildConflict, RebuildJob, Rebuilds, public
from index_service.service import Service
from index_service.vector_index import VectorIndex
from infra.notifications import ensure_bucket, ensure_notifications, remove_notifications
from infra.stack import Stack

from .helpers import object_state, photo, wait_for, wait_rebuild

pytestmark = pytest.mark.slow
DIM = 8
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "coins.png",
          "camera.png", "moon.png")


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def upsert(bucket: str, key: str, order: int, **fields: Any) -> ResultEntry:
    return ResultEntry("upsert", bucket, key, f"e{order}", "", order, 1, "m", unit(order), **fields)


def admin(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.settings.admin_token}"}


def indexed_etag(api: httpx.Client, bucket: str, key: str) -> str | None:
    state = object_state(api, bucket, key)
    return state["etag"] if state and state["state"] == "indexed" else None


def listing(s3: Any, bucket: str, prefix: str) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"].strip('"') for page in pages for o in page.get("Contents", [])}


def test_reembed_under_concurrent_uploads_deletes_and_queries(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    bucket = stack.settings.bucket
    keys = [f"{unique_prefix}{i:02d}-{name}.jpg" for i, name in enumerate(PHOTOS * 3)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=photo(PHOTOS[i % len(PHOTOS)], transform=i >= len(PHOTOS)))
    wait_for(lambda: all(indexed_etag(api, bucket, k) for k in keys), 120, what="initial uploads indexed")
    generation = api.get("/stats").json()["generation"]

    answered: list[int] = []
    stop = threading.Event()

    def query() -> None:  # every query during the rebuild must get results from the serving generation
        with httpx.Client(base_url=stack.api_url, timeout=30) as client:
            while not stop.is_set():
                response = client.post("/search", json={"key": keys[0], "bucket": bucket, "k": 5})
                answered.append(len(response.json().get("results", [])) if response.status_code == 200 else -1)
                time.sleep(0.05)

    queries = threading.Thread(target=query)
    queries.start()
    try:
        started = api.post("/rebuild", json={"mode": "reembed"}, headers=admin(stack))
        assert started.status_code == 202, started.text
        job = started.json()
        assert job["state"] == "running" and job["generation"] > generation  # numbers of abandoned rebuilds skipped
        second = api.post("/rebuild", json={"mode": "reembed"}, headers=admin(stack))
        assert second.status_code == 409 and second.json()["error"]["code"] == "rebuild_running"

        # Live traffic during the rebuild: new uploads, overwrites and deletes reach both generations.
        added = [f"{unique_prefix}during-{i}.jpg" for i in range(3)]
        for i, key in enumerate(added):
            s3.put_object(Bucket=bucket, Key=key, Body=photo(PHOTOS[i], transform=True))
        for key in keys[-4:]:
            s3.delete_object(Bucket=bucket, Key=key)

        done = wait_rebuild(api, job["id"])
    finally:
        stop.set()
        queries.join()
    assert done["state"] == "done" and done["total"] >= len(keys) - 4 and done["done"] == done["total"]
    assert done["finished"] >= done["started"]
    assert answered and min(answered) == 5, answered  # no query ever saw an empty or missing index
    stats = api.get("/stats").json()
    assert stats["generation"] == job["generation"]

    current = listing(s3, bucket, unique_prefix)
    assert set(current) == set(keys[:-4]) | set(added)
    wait_for(lambda: all(indexed_etag(api, bucket, k) == etag for k, etag in current.items()), 120,
             what="every current object indexed in the new generation")
    for key in keys[-4:]:
        assert object_state(api, bucket, key) is None


def test_cancel_keeps_the_serving_generation_and_reindex_switches_structure(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    for name in PHOTOS[:4]:
        s3.put_object(Bucket=stack.settings.bucket, Key=unique_prefix + name, Body=photo(name))
    wait_for(lambda: all(indexed_etag(api, stack.settings.bucket, unique_prefix + n) for n in PHOTOS[:4]), 120)
    generation = api.get("/stats").json()["generation"]
    assert api.post("/rebuild", json={"mode": "reembed"}).status_code == 401
    job = api.post("/rebuild", json={"mode": "reembed"}, headers=admin(stack)).json()
    cancelled = api.delete(f"/rebuild/{job['id']}", headers=admin(stack))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert api.get("/stats").json()["generation"] == generation
    assert api.get("/rebuild/nope").status_code == 404
    current = api.get("/rebuild/current")  # the key naming the newest job, not a job: it answered 500
    assert current.status_code == 404 and current.json()["error"]["code"] == "unknown_rebuild", current.text
    assert api.delete("/rebuild/nope", headers=admin(stack)).status_code == 404  # was 409 "not running"
    again = api.delete(f"/rebuild/{job['id']}", headers=admin(stack))
    assert again.status_code == 409 and "is cancelled, not running" in again.json()["error"]["message"]
    assert api.post("/rebuild", json={"mode": "sideways"}, headers=admin(stack)).status_code == 400
    typo = api.post("/rebuild", json={"mode": "reembed", "modle": "x"}, headers=admin(stack))  # not started
    assert typo.status_code == 400 and typo.json()["error"]["code"] == "unknown_field", typo.text
    assert api.post("/reconcile", json={"buckt": "x"}, headers=admin(stack)).status_code == 400

    def reindex(index_type: str) -> dict[str, Any]:
        snapshot = api.get("/stats").json()["last_snapshot"]
        job = api.post("/rebuild", json={"mode": "reindex", "index_type": index_type}, headers=admin(stack)).json()
        done = wait_for(lambda j=job: (s := api.get(f"/rebuild/{j['id']}").json())["state"] != "running" and s, 60)
        assert done["state"] == "done", done
        stats = api.get("/stats").json()
        assert stats["last_snapshot"] != snapshot  # the new structure is kept (a restart loaded the old one)
        return stats  # type: ignore[no-any-return]

    for index_type in ("IVF-SQ8", "IVF", "Flat"):  # IVF-SQ8: its searches re-rank from its float16 vector file
        stats = reindex(index_type)
        assert stats["index_type"] == index_type and stats["generation"] == generation
        assert (stats["vector_file_bytes"] >= stats["vectors"] * 2 * 1280) == (index_type == "IVF-SQ8"), stats
        assert len(api.post("/search", json={"vector": [1.0] * 1280, "k": 3}).json()["results"]) == 3
        like = api.post("/search", json={"bucket": stack.settings.bucket, "key": unique_prefix + PHOTOS[0], "k": 3,
                                             "prefix": unique_prefix})
        hits = like.json()["results"]  # the object's stored vector: the three others, best first
        assert {h["key"] for h in hits} == {unique_prefix + n for n in PHOTOS[1:4]}, like.text
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    # The type asked for stays, though the size policy would make so few vectors Flat, until "auto" lets it pick.
    assert reindex("IVF")["index_type_chosen"] == "IVF"
    key = unique_prefix + "after-reindex.jpg"
    s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=photo(PHOTOS[5]))
    wait_for(lambda: indexed_etag(api, stack.settings.bucket, key), 120, what=f"{key} indexed")
    time.sleep(2)  # (the size policy looks after each merged batch, and restructures in a thread of its own)
    assert api.get("/stats").json()["index_type"] == "IVF"
    stats = reindex("auto")
    assert stats["index_type"] == "Flat" and stats["index_type_chosen"] is None, stats


def set_notifications(stack: Stack, bucket: str, on: bool) -> None:
    """Switch a bucket's notifications on (through the S3 API) or off (RGW's DELETE ?notification)."""
    settings = dataclasses.replace(stack.settings, bucket=bucket)
    if on:
        ensure_notifications(settings, stack_s3(stack), f"{stack.ingest_url}/events?token={settings.webhook_token}")
        return
    remove_notifications(settings, bucket)


def stack_s3(stack: Stack) -> Any:
    from bucketlens.s3 import make_client

    return make_client(stack.settings)


def test_reconcile_heals_what_notifications_missed(stack: Stack, s3: Any, api: httpx.Client) -> None:
    bucket = "test-reconcile"
    ensure_bucket(s3, bucket)
    set_notifications(stack, bucket, on=True)
    before = {f"seen-{i}.jpg": photo(name) for i, name in enumerate(PHOTOS[:4])}
    for key, body in before.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    wait_for(lambda: all(indexed_etag(api, bucket, k) for k in before), 120, what="notified uploads indexed")

    set_notifications(stack, bucket, on=False)
    missed = {f"missed-{i}.jpg": photo(name, transform=True) for i, name in enumerate(PHOTOS[4:])}
    for key, body in missed.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3.put_object(Bucket=bucket, Key="seen-0.jpg", Body=photo("page.png"))  # overwritten unnoticed
    s3.delete_object(Bucket=bucket, Key="seen-1.jpg")  # deleted unnoticed
    time.sleep(2)
    assert all(object_state(api, bucket, k) is None for k in missed)

    response = api.post("/reconcile", json={"bucket": bucket}, headers=admin(stack))
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["missing"], report["changed"], report["removed"]) == (len(missed), 1, 1)
    current = listing(s3, bucket, "")
    wait_for(lambda: all(indexed_etag(api, bucket, k) == e for k, e in current.items()), 120, what="healed")
    assert object_state(api, bucket, "seen-1.jpg") is None
    set_notifications(stack, bucket, on=True)


def test_reembed_with_another_model_feeds_both_generations_then_switches_back(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    bucket = stack.settings.bucket
    serving = api.get("/stats").json()
    bad = api.post("/rebuild", json={"mode": "reembed", "model": "efficientnet-lite9"}, headers=admin(stack))
    assert bad.status_code == 400 and "unknown model" in bad.json()["error"]["message"]

    # The first also restructures its new generation (off the merger's thread) before the swap.
    for model, index_type in (("efficientnet-lite1", "IVF-SQ8"), (serving["model"], serving["index_type"])):
        job = api.post("/rebuild", json={"mode": "reembed", "model": model, "index_type": index_type},
                       headers=admin(stack))
        assert job.status_code == 202, job.text
        key = f"{unique_prefix}live-during-{model}.jpg"  # a live upload while two models are in use
        s3.put_object(Bucket=bucket, Key=key, Body=photo("chelsea.png", transform=True))
        done = wait_rebuild(api, job.json()["id"], what=f"the rebuild to {model} finished")
        assert done["state"] == "done" and done["index_type"] == index_type, done
        stats = api.get("/stats").json()
        assert stats["model"] == model and stats["vectors"] > 0
        wait_for(lambda k=key: indexed_etag(api, bucket, k), 60, what=f"{key} indexed under {model}")
        # Queries are embedded with the serving model: the same photo finds itself.
        hits = api.post("/search", files={"image": ("q.jpg", photo("chelsea.png", transform=True), "image/jpeg")})
        assert hits.json()["model"] == model and hits.json()["results"][0]["score"] > 0.99


def test_reembed_of_one_bucket_keeps_the_other_buckets(stack: Stack, s3: Any, api: httpx.Client) -> None:
    other = "test-other-bucket"
    ensure_bucket(s3, other)
    keys = [f"kept-{name}.jpg" for name in PHOTOS[:3]]
    for key, name in zip(keys, PHOTOS[:3]):
        s3.put_object(Bucket=other, Key=key, Body=photo(name))
    assert api.post("/reconcile", json={"bucket": other}, headers=admin(stack)).status_code == 200
    wait_for(lambda: all(indexed_etag(api, other, k) for k in keys), 120, what="other bucket indexed")

    job = api.post("/rebuild", json={"mode": "reembed", "bucket": stack.settings.bucket}, headers=admin(stack))
    assert job.status_code == 202, job.text
    done = wait_rebuild(api, job.json()["id"], what="the one-bucket rebuild finished")
    assert done["state"] == "done", done
    assert api.get("/stats").json()["generation"] == done["generation"]
    for key in keys:  # carried over into the new generation, not dropped
        state = object_state(api, other, key)
        assert state is not None and state["state"] == "indexed", (key, state)
    switch = {"mode": "reembed", "bucket": other, "model": "efficientnet-lite1"}
    assert api.post("/rebuild", json=switch, headers=admin(stack)).status_code == 400


def carrying_service(bucket: str, serving: VectorIndex | None = None) -> tuple[SimpleNamespace, VectorIndex,
                                                                               VectorIndex]:
    """A service whose running reembed of ``bucket`` has a shadow generation 2 beside serving generation 1, with
    ``Service.apply`` of its own (pure logic: no stack)."""
    serving = VectorIndex("m", DIM, 1) if serving is None else serving  # (an empty index is falsy: it has a length)
    shadow = VectorIndex("m", DIM, 2)

    class JobRecords:  # where the job is saved (Redis): nothing to keep here
        def pipeline(self) -> JobRecords:
            return self

        def set(self, *args: Any, **kwargs: Any) -> None:
            pass

        def execute(self) -> None:
            pass

        def incr(self, key: str) -> int:
            return 2

        def hdel(self, *args: Any) -> None:
            pass

        def hset(self, *args: Any) -> None:
            pass

        def hgetall(self, key: str) -> dict[bytes, bytes]:  # (no pending marks: a job's end drops none)
            return {}

        def register_script(self, script: str) -> Callable[..., list[bytes]]:
            return lambda **kwargs: []

    service = SimpleNamespace(index=serving, shadow=shadow, redis=JobRecords(), keys=Keys("t"),
                              restructuring=threading.Lock(), routing=threading.Lock(), snapshot=lambda: True,
                              retiring=[],
                              duplicates=SimpleNamespace(wake=lambda found: None, arriving=lambda: None))
    service.promote = lambda new: (setattr(service, "index", new), setattr(service, "shadow", None))
    service.rebuilds = Rebuilds(service)  # type: ignore[arg-type]
    service.rebuilds.current = RebuildJob("j", "reembed", 2, "m", "Flat", bucket=bucket)
    service.apply = lambda entries: Service.apply(service, entries)  # type: ignore[arg-type]
    return service, serving, shadow


def test_a_one_bucket_reembed_carries_the_other_buckets_labels_and_times_over() -> None:
    """Carried-over objects lost their labels and modification times: after the promote, text search and a date
    filter no longer found any object of the other buckets (an independent review)."""
    service, serving, shadow = carrying_service("photos")
    serving.apply([upsert("other", f"k{i}", i, labels="281:0.9", modified=1_700_000_000.0 + i) for i in range(3)])
    service.rebuilds._carry_over(service.rebuilds.current)
    for i in range(3):
        assert shadow.get("other", f"k{i}") == dataclasses.replace(serving.get("other", f"k{i}"), generation=2)
    assert len(shadow.text_search([281], 10)) == 3
    assert len(shadow.search(unit(0), 10, where=Filter(after=1_600_000_000.0))) == 3


def test_a_swap_keeps_the_near_duplicate_pairs_of_objects_of_the_same_views() -> None:
    """Each swap left ``/duplicates`` all but empty until the finder had checked every object again (16 groups
    right after it where there had been 872; ~1.5 h at 100k objects: review 81). The promoted generation keeps the
    pairs whose objects it holds with the same etags and local features: here a carried-over bucket's."""
    service, serving, shadow = carrying_service("photos")
    serving.apply([upsert("other", key, order, features=b"views of " + key.encode())
                   for key, order in [("a", 1), ("b", 2), ("c", 3)]])
    serving.features.add_pairs([("other/a", "e1")],
                               [("other/a", "other/b", 50, "e2"), ("other/a", "other/c", 30, "e3")])
    service.rebuilds._carry_over(service.rebuilds.current)
    service.apply([upsert("other", "c", 4, features=b"views of another c")])  # c changed meanwhile
    service.rebuilds._complete(service.rebuilds.current)
    assert service.index is shadow and shadow.features.pairs() == [("other/a", "other/b", 50)]


def test_pairs_that_cannot_be_taken_over_do_not_fail_the_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking the pairs over is a convenience: an error in it (a full disk) failed the job and threw its whole
    reembed away (review 84). The swap goes on; the finder finds the pairs again."""
    service, _, shadow = carrying_service("photos")

    def full(old: Any) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(shadow.features, "inherit_pairs", full)
    service.rebuilds._complete(service.rebuilds.current)
    assert service.index is shadow and service.rebuilds.current.state == "done"


def test_the_serving_generations_late_entries_of_carried_buckets_reach_the_shadow() -> None:
    """An upload or delete in another bucket whose event reached ingest before the rebuild's generation was
    registered is tagged for the serving generation only; merged after the carry-over's copy, it reached only the
    generation the promote retires (an upload went missing, a deleted object came back: an independent review).
    The rebuilt bucket's own entries stay out: the rebuild embeds that bucket itself."""
    service, serving, shadow = carrying_service("photos")
    serving.apply([upsert("other", "doomed", 1)])
    service.rebuilds._carry_over(service.rebuilds.current)
    service.apply([upsert("other", "uploaded", 5), ResultEntry("delete", "other", "doomed", "", "", 6, 1),
                   upsert("photos", "rebuilt-here", 7)])
    assert sorted(o.key for o in serving.objects()) == ["rebuilt-here", "uploaded"]
    assert sorted(o.key for o in shadow.objects()) == ["uploaded"]
    service.rebuilds.current.state = "done"  # promoted: entries go where their generation says again
    service.apply([upsert("other", "after", 8)])
    assert shadow.get("other", "after") is None


def test_the_retired_generations_late_entries_of_carried_buckets_reach_the_promoted_one() -> None:
    """Such an entry can also come after the promote (its worker read the generations before it): the retired
    generation is neither serving nor built, and it was dropped (an independent review: an upload lost with its
    pending mark cleared; a deleted object still searchable). The rebuilt bucket's own stay dropped: the rebuild
    listed and embedded that bucket for the new generation."""
    service, serving, shadow = carrying_service("photos")
    serving.apply([upsert("other", "doomed", 1)])
    job = service.rebuilds.current
    service.rebuilds._carry_over(job)
    service.rebuilds._complete(job)  # every object of the rebuilt bucket settled: the shadow is promoted
    assert service.index is shadow and job.state == "done" and job.retired == 1  # (saved: a restart reads it)
    service.apply([upsert("other", "uploaded", 5), ResultEntry("delete", "other", "doomed", "", "", 6, 1),
                   upsert("photos", "stale", 7)])
    assert sorted(o.key for o in shadow.objects()) == ["uploaded"]
    assert shadow.get("other", "uploaded").generation == 2  # type: ignore[union-attr]


def test_a_one_bucket_reembed_that_starts_during_a_batchs_write_carries_that_batch_over() -> None:
    """Review 66: the merger routed a batch with no shadow yet, and its write to the serving index (a Milvus round
    trip) landed after the rebuild, started meanwhile, had copied the other buckets: the batch reached neither the
    copy nor the shadow, and the promote lost it (an upload missing, a deleted object back). A start now waits
    for the batch in flight, so the copy holds it."""
    writing, landed = threading.Event(), threading.Event()

    class SlowServing(VectorIndex):  # a write that takes as long as Milvus's read-then-upsert
        def apply(self, entries: Any) -> Any:
            writing.set()
            time.sleep(0.3)
            try:
                return super().apply(entries)
            finally:
                landed.set()

    service, serving, shadow = carrying_service("photos", SlowServing("m", DIM, 1))
    service.rebuilds.current, service.shadow = None, None
    service.writing, service.lease = threading.Event(), SimpleNamespace(acquire=lambda: True)
    service.writing.set()
    service.backend = SimpleNamespace(index_types=("Flat",), discard=None, name="faiss")
    service.new_generation = lambda model, generation: shadow
    copied = threading.Event()
    service.rebuilds._list_and_send = lambda job: (service.rebuilds._carry_over(job), copied.set())
    merger = threading.Thread(target=service.apply, args=([upsert("other", "uploaded", 5)],))
    merger.start()
    assert writing.wait(5)
    job = service.rebuilds.start("reembed", bucket="photos")
    assert copied.wait(5) and job.state == "running"
    merger.join(5)
    assert landed.is_set() and serving.get("other", "uploaded") is not None
    assert shadow.get("other", "uploaded") is not None  # ... and the generation the promote swaps in holds it too


def test_a_promote_writes_the_new_generations_snapshot_with_its_locks_let_go() -> None:
    """Review 66: the swap wrote the new generation's first snapshot (12-20 s at 1M vectors) under the rebuilds' lock:
    a rebuild's start waited that long, on the event loop, and so did the merger's next batch."""
    service, _, shadow = carrying_service("photos")

    def free(lock: Any) -> bool:
        """Whether another thread (a rebuild's start, the merger) could take ``lock`` now."""
        taken: list[bool] = []
        other = threading.Thread(target=lambda: taken.append(lock.acquire(timeout=0)) or (taken[0] and lock.release()))
        other.start()
        other.join()
        return taken == [True]

    seen: list[tuple[bool, bool, bool]] = []
    service.snapshot = lambda: seen.append((free(service.rebuilds._lock), free(service.restructuring),
                                            service.index is shadow))
    service.rebuilds._complete(service.rebuilds.current)
    assert seen == [(True, True, True)] and service.rebuilds.current.state == "done"


def test_a_reembed_swaps_in_nothing_that_lost_held_objects_for_a_passing_reason() -> None:
    """Review 53: a listed object whose new-generation task failed for a reason other than its bytes (S3 away past
    the workers' retries; a model no worker can run) counted as settled, and the job swapped in a generation
    without it: objects searchable before were gone (all of them, for a model the workers could not load). Such
    an object now waits to be sent again (``resend_lost``); one that keeps failing fails the job, and the serving
    generation stays. One failure counts per attempt (its live event and its listing failed in one S3 blip: review
    54); refused access and a worker dying on the object do not pass (a job waited for good on a 403: review 54)."""
    for outcome in ("embedded at last", "failing still"):
        service, serving, shadow = carrying_service(None)
        service.backend = SimpleNamespace(discard=lambda generation: None)
        serving.apply([upsert("photos", f"k{i}", i) for i in range(4)])
        rebuilds, job = service.rebuilds, service.rebuilds.current
        job.listed = True
        rebuilds._expected = {f"photos/k{i}" for i in range(6)}  # k4: new, which nothing serves yet
        serving.apply([upsert("photos", "k5", 5)])

        def failed(key: str, reason: str) -> ResultEntry:
            return ResultEntry("failed", "photos", key, "e", "", 10, 2, reason=reason)

        embedded = [dataclasses.replace(upsert("photos", f"k{i}", 10 + i), generation=2) for i in range(3)]
        rebuilds.observe([*embedded[:2], failed("k2", "unreachable"), failed("k3", "corrupt"),
                          failed("k4", "unreachable"), failed("k5", "access_denied"), failed("k2", "fetch_timeout")])
        # k3 failed by its bytes, k5 by S3's refusal; k4 leaves out nothing a search found: they settle. k2 waits to
        # be sent again, one failed attempt counted.
        assert rebuilds._expected == {"photos/k2"} and job.state == "running", (rebuilds._expected, job)
        assert (job.done, job.failed) == (5, 3) and rebuilds._passing == {"photos/k2": 1} and job.retrying == 1
        if outcome == "embedded at last":
            rebuilds.observe([embedded[2]])
            wait_for(lambda held=service, built=shadow: held.index is built, 10, what="the new generation swapped in")
            assert job.state == "done" and (job.done, job.failed, job.retrying) == (6, 3, 0)
        else:  # (the job's end takes the record away: its error quotes it, review 58)
            service.redis.hget = lambda key, field: json.dumps({"etag": "e", "message": "CUDA out of memory"})
            for _ in range(PASSING_ROUNDS - 1):
                rebuilds._counted.clear()  # sent again (resend_lost)
                rebuilds.observe([failed("k2", "internal")])
            assert job.state == "failed" and service.index is serving and service.shadow is None
            assert job.error.startswith(f"an object failed {PASSING_ROUNDS} times in the new generation for a "
                                        "reason other than its content (internal)"), job.error
            assert job.error_detail == "photos/k2: CUDA out of memory"  # (a key: for readers only, review 70)


def test_a_model_no_worker_can_run_fails_the_job_at_once_and_one_that_runs_somewhere_does_not() -> None:
    """A model switch that no worker could run failed only after three passes over the listing (each object's
    worker retries spent three times: hours at 1M objects), and where the serving generation held none of the
    objects it swapped in an empty index (review 54). Now ``MODEL_FAILS`` distinct objects failed ``internal``
    with none embedded, or every awaited one once all are listed, fail the job, quoting a worker's message."""
    def failed(key: str) -> ResultEntry:
        return ResultEntry("failed", "photos", key, "e", "", 10, 2, reason="internal")

    # Nothing awaited (the one object failed so, and the serving generation did not hold it): the job completes
    # as ever, not "could not embed" (review 58)
    service, serving, shadow = carrying_service(None)
    service.redis.hget = lambda key, field: None
    service.rebuilds._expected, service.rebuilds.current.listed = {"photos/new"}, True
    service.rebuilds.observe([failed("new")])
    wait_for(lambda: service.rebuilds.current.state == "done", 10, what="the job done")
    for case in ("many", "all listed", "runs somewhere"):
        service, serving, _ = carrying_service(None)
        service.backend = SimpleNamespace(discard=lambda generation: None)
        message = json.dumps({"message": "RuntimeError: the model's weights are not installed"})
        service.redis.hget = lambda key, field, said=message: said
        rebuilds, job = service.rebuilds, service.rebuilds.current
        listing = [f"k{i}" for i in range(MODEL_FAILS + 10 if case != "all listed" else 3)]
        serving.apply([upsert("photos", key, i) for i, key in enumerate(listing[:2])])  # held: they stay awaited
        rebuilds._expected = {f"photos/{key}" for key in listing}
        job.listed = case == "all listed"
        if case == "runs somewhere":  # a GPU worker embeds while the CPU ones cannot load it: the rounds decide
            rebuilds.observe([dataclasses.replace(upsert("photos", "k9", 9), generation=2)])
        enough = MODEL_FAILS if case == "many" else len(listing)
        rebuilds.observe([failed(key) for key in listing[: enough - 1]])
        assert job.state == "running", job.error  # one short: the next may still embed
        rebuilds.observe([failed(listing[enough - 1])])
        if case == "runs somewhere":
            assert job.state == "running" and service.index is serving
            continue
        assert job.state == "failed" and service.index is serving and service.shadow is None, job
        assert job.error.startswith("the workers could not embed with model m: no object was embedded in the new "
                                    f"generation, and {enough} failed (internal)"), job.error
        assert job.error_detail == "e.g. photos/k0: RuntimeError: the model's weights are not installed"


def test_a_listed_object_s3_refuses_settles_failed_and_the_lost_after_it_are_sent(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """``resend_lost`` took S3's 403 on a HEAD for S3 away and stopped there at every sweep: the job stayed running
    for good, and the lost objects listed after that one were never sent (review 54)."""
    service, _, _ = carrying_service(None)
    rebuilds, job = service.rebuilds, service.rebuilds.current
    job.listed, rebuilds._expected = True, {"photos/a", "photos/b"}

    def head(s3: Any, bucket: str, key: str, generation: int) -> ObjectRef:
        if key == "a":
            raise ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                              "HeadObject")
        return ObjectRef(bucket, key, "e", generation=generation)

    sent: list[ObjectRef] = []
    monkeypatch.setattr(rebuild_module, "quiet", lambda service: True)
    monkeypatch.setattr(rebuild_module, "head", head)
    service.s3, service.publisher = None, SimpleNamespace(send_embeds=lambda refs, queue: sent.extend(refs))
    counted: list[tuple[str, int]] = []
    service.redis.hincrby = lambda key, field, n: counted.append((field, n))
    rebuilds._passing = {"photos/b": 1}  # its attempt failed with S3 away: not a lost task (review 55)
    assert rebuilds.resend_lost(0) == 0  # the first quiet sweep: suspects
    assert rebuilds.resend_lost(0) == 1
    assert [ref.key for ref in sent] == ["b"] and rebuilds._expected == {"photos/b"} and job.failed == 1
    assert counted == [("failures_retried", 1)]


def test_a_failed_object_indexed_again_during_the_rebuild_is_not_counted_failed_at_its_end() -> None:
    """``rebuild --wait`` ended with "451 failed" where 160 of those objects had been uploaded again, fixed, and
    indexed while the rebuild ran (review 81). At the swap, the failed are those the new generation does not hold:
    whatever came after (fixed, broken again, a late result of an older version: review 84)."""
    service, _, shadow = carrying_service(None)
    rebuilds, job = service.rebuilds, service.rebuilds.current
    job.listed, rebuilds._expected = True, {f"photos/{key}" for key in "abcd"}

    def entry(op: str, key: str, order: int) -> ResultEntry:
        return dataclasses.replace(upsert("photos", key, order), op=op, generation=2,
                                   reason="corrupt" if op == "failed" else "")

    service.apply([entry("failed", key, 10) for key in "abc"])
    assert job.failed == 3 and job.done == 3
    service.apply([entry("upsert", "b", 11), entry("upsert", "c", 11), entry("failed", "c", 12)])
    service.apply([entry("upsert", "d", 10)])  # the last listed one: the job completes
    wait_for(lambda: job.state == "done" or None, 10, what="the swap")
    assert service.index is shadow and job.failed == 2 and job.done == 4  # a, and c broken again; b fixed


def test_a_rebuild_that_cannot_start_is_failed_not_left_running() -> None:
    """Creating the shadow generation failed (Milvus down, say): the job stayed "running", and every later rebuild
    was refused as already running until the service restarted (an independent review)."""
    service, serving, _ = carrying_service("photos")
    service.rebuilds.current, service.shadow = None, None
    service.writing = threading.Event()
    service.backend = SimpleNamespace(index_types=("Flat",), discard=None, name="faiss")
    service.writing.set()
    service.lease = SimpleNamespace(acquire=lambda: True)

    def unavailable(model: str, generation: int) -> VectorIndex:
        raise ConnectionError("the index server is down")

    service.new_generation = unavailable
    for wrong in ({"model": ["m"]}, {"index_type": {"t": 1}}):  # (a list was a 500)
        with pytest.raises(ValueError, match="must be a string"):
            service.rebuilds.start("reembed", **wrong)
    with pytest.raises(ValueError, match="HNSW is the milvus backend's only"):  # (said only what FAISS takes)
        service.rebuilds.start("reindex", index_type="HNSW")
    with pytest.raises(ValueError, match="a reindex restructures the whole index: leave out 'bucket'"):
        service.rebuilds.start("reindex", bucket="photos")  # (taken, and every bucket restructured: review 57)
    for _ in range(2):  # the second is not refused as "already running"
        with pytest.raises(ConnectionError):
            service.rebuilds.start("reembed")
        job = service.rebuilds.current
        assert job.state == "failed" and "the index server is down" in job.error and service.shadow is None


def test_a_rebuild_waits_for_the_last_swaps_snapshot_and_a_failed_one_drops_its_shadow_outside_the_routing(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review 69: with the swap's snapshot written after the locks, a rebuild started in between, and a restart
    then restored the old generation, failed the new job and left the swapped one "done". A start is refused until
    the swapped-in generation is durable. And a job that fails drops its shadow after letting the merger's routing
    go (dropping a Milvus collection held a batch up to 10 s), and ends even where the drop fails."""
    service, _, shadow = carrying_service("photos")
    service.rebuilds.current = None
    service.writing, service.lease = threading.Event(), SimpleNamespace(acquire=lambda: True)
    service.writing.set()
    service.backend = SimpleNamespace(index_types=("Flat",), name="faiss")
    service.retiring = [SimpleNamespace(generation=1)]  # swapped out, the new generation's snapshot not written
    with pytest.raises(RebuildConflict, match="not durable yet") as refused:  # (its snapshot failed: a disk full)
        service.rebuilds.start("reembed")
    assert refused.value.code == "not_durable"  # (review 87: rebuild_running, and a script followed no rebuild)
    assert service.rebuilds.current is None
    service.rebuilds._durable.clear()  # a swap whose snapshot is being written: a start waits for it
    threading.Timer(0.3, lambda: (service.retiring.clear(), service.rebuilds._durable.set())).start()
    started = time.monotonic()
    assert service.rebuilds.start("reindex").mode == "reindex" and time.monotonic() - started >= 0.25
    wait_for(lambda: service.rebuilds.current.state == "done", 10, what="the reindex done")

    routing_free: list[bool] = []

    def discard(index: Any) -> None:
        routing_free.append(service.routing.acquire(blocking=False) and (service.routing.release() or True))
        raise ConnectionError("Milvus is away")

    service.backend.discard = discard
    job = service.rebuilds.current = RebuildJob("j", "reembed", 2, "m", "Flat")
    service.shadow = shadow
    with service.rebuilds._lock:
        service.rebuilds._finish(job, "failed")
    assert job.state == "failed" and service.shadow is None and routing_free == [True]
    assert "its generation 2 could not be dropped" in caplog.text


def test_a_replica_whose_lease_moved_refuses_a_rebuild_though_its_flag_lags() -> None:
    """The writing flag follows a lost lease only at the next renewal: a replica stalled on its index server accepted
    a rebuild, which the replica that had taken the lease then failed, dropping its collection (review 21)."""
    service, _, _ = carrying_service("photos")
    service.rebuilds.current, service.shadow = None, None
    service.writing = threading.Event()
    service.backend = SimpleNamespace(index_types=("Flat",), discard=None, name="faiss")
    service.writing.set()
    service.replica, service.lease = "api", SimpleNamespace(acquire=lambda: False, current=lambda: "api-2/f9d3")
    with pytest.raises(NotWriter, match="the writer is api-2/f9d3"):
        service.rebuilds.start("reembed")
    assert service.rebuilds.current is None and service.shadow is None
    # A cancel of the writer's job here says where to send it (review 87: 409 not_running, "r1 is running, not
    # running"); one that runs here is cancelled, whatever the flag says
    service.writing.clear()
    with pytest.raises(NotWriter, match="the writer is api-2/f9d3: send the cancel there"):
        service.rebuilds.cancel("r1")
    service.rebuilds.current = RebuildJob("r2", "reembed", 3, "m", "Flat")
    assert service.rebuilds.cancel("r2") is service.rebuilds.current and service.rebuilds.current.state == "cancelled"
    assert service.rebuilds.cancel("r2") is None  # its own job, ended (lost with the lease, say): not_running


def test_a_restarted_service_still_reports_the_last_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/stats`` ``rebuild`` (and so ``status`` and ``rebuild --cancel``'s "the last ... is done") said null after
    any restart, though ``GET /rebuild/{id}`` still had the job (an independent check). A job left running is
    reported failed, and its generation's failure records of objects the serving one holds go, as at a cancel."""
    keys = Keys("t")
    cleared: list[int] = []
    monkeypatch.setattr(rebuild_module, "clear_held", lambda redis, keys, generation, held: cleared.append(generation))
    for state, reported in (("done", "done"), ("running", "failed")):
        job = RebuildJob(id="j1", mode="reembed", generation=4, model="m", index_type="Flat", total=3, done=3,
                         state=state)
        stored = {keys.rebuild_current: b"j1", keys.rebuild_job("j1"): json.dumps(public(job)).encode()}
        redis = SimpleNamespace(get=stored.get, set=lambda key, value, ex=None, into=stored: into.update({key: value}))
        service = SimpleNamespace(redis=redis, keys=keys, index=SimpleNamespace(generation=4, etags=None),
                                  backend=SimpleNamespace(name="faiss"), forget_other_generations=lambda: None)
        rebuilds = Rebuilds(service)  # type: ignore[arg-type]
        assert rebuilds.progress() is None
        rebuilds.recover()
        last = rebuilds.progress()
        assert last is not None and (last["id"], last["state"]) == ("j1", reported), last
        assert cleared == ([4] if state == "running" else []), cleared


def test_a_one_bucket_swaps_late_entries_still_reach_the_new_generation_after_a_restart() -> None:
    """Review 66: where the retired generation's late entries for carried buckets go was kept in memory only: a
    restart after the swap replayed them from the stream and dropped them (an upload lost, a deleted object back)."""
    keys = Keys("t")
    for retired, generation, carried in ((3, 4, True), (None, 4, False), (3, 5, False)):  # (an older job: none)
        job = RebuildJob(id="j1", mode="reembed", generation=4, model="m", index_type="Flat", bucket="photos",
                         state="done", retired=retired)
        stored = {keys.rebuild_current: b"j1", keys.rebuild_job("j1"): json.dumps(public(job)).encode()}
        service = SimpleNamespace(redis=SimpleNamespace(get=stored.get), keys=keys,
                                  index=SimpleNamespace(generation=generation), backend=SimpleNamespace(name="faiss"),
                                  forget_other_generations=lambda: None)
        rebuilds = Rebuilds(service)  # type: ignore[arg-type]
        rebuilds.recover()
        assert rebuilds.carried_past(3, "other") is carried and not rebuilds.carried_past(3, "photos")


def test_a_stack_switched_to_the_other_backend_leaves_its_rebuilds_alone() -> None:
    """A FAISS service started where a Milvus one had finished a rebuild (`up --backend faiss` on the same stack)
    marked it failed, "restarted before the rebuilt generation's first snapshot": its own index was at an older
    generation. Back on Milvus, /stats and status kept saying failed (review 29)."""
    keys = Keys("t")
    job = RebuildJob(id="j1", mode="reembed", generation=2, model="m", index_type="Flat", total=3, done=3,
                     state="done", backend="milvus")
    record = json.dumps(public(job)).encode()
    stored = {keys.rebuild_current: b"j1", keys.rebuild_job("j1"): record}
    redis = SimpleNamespace(get=stored.get, set=lambda key, value, ex=None: stored.update({key: value}))
    for backend, generation, reported in (("faiss", 1, None), ("milvus", 2, "done")):
        service = SimpleNamespace(redis=redis, keys=keys, index=SimpleNamespace(generation=generation),
                                  backend=SimpleNamespace(name=backend), forget_other_generations=lambda: None)
        rebuilds = Rebuilds(service)  # type: ignore[arg-type]
        rebuilds.recover()
        assert stored[keys.rebuild_job("j1")] == record  # untouched
        assert (rebuilds.progress() or {}).get("state") == reported
    # One left running by the other backend is over all the same (`down` came between): it stayed "running" for good
    stored[keys.rebuild_job("j1")] = json.dumps(public(dataclasses.replace(job, state="running"))).encode()
    rebuilds = Rebuilds(SimpleNamespace(redis=redis, keys=keys, index=SimpleNamespace(generation=1),  # type: ignore[arg-type]
                                        backend=SimpleNamespace(name="faiss"), forget_other_generations=lambda: None))
    rebuilds.recover()
    assert json.loads(stored[keys.rebuild_job("j1")])["state"] == "failed"


def test_rebuild_progress_answers_while_a_promote_holds_the_lock() -> None:
    """``/stats`` and ``GET /rebuild`` read the job without the rebuilds lock, which a promote holds while it
    swaps (it wrote its snapshot under it too, ~15 s at 1M vectors, until review 66)."""
    rebuilds = Rebuilds(service=None)  # type: ignore[arg-type]  # progress and get need no service
    rebuilds.current = RebuildJob(id="j1", mode="reembed", generation=2, model="m", index_type="IVF", total=4, done=3)
    held, release, answers = threading.Event(), threading.Event(), []
    holder = threading.Thread(target=lambda: rebuilds._lock.acquire() and (held.set(), release.wait(30)))
    holder.start()
    held.wait(5)
    reader = threading.Thread(target=lambda: answers.extend([rebuilds.progress(), rebuilds.get("j1")]))
    reader.start()
    reader.join(5)
    release.set()
    holder.join()
    assert [answer and answer["progress"] for answer in answers] == [0.75, 0.75]


def test_a_versioned_bucket_indexes_whatever_version_is_current(stack: Stack, s3: Any, api: httpx.Client) -> None:
    """Deleting a version for good, or removing a delete marker, leaves the key's current version indexed (ingest
    asks S3 what the key holds: ``Receiver._settle``); a reconcile restores an object whose event was missed although
    the index holds a newer tombstone for it (the listing came after the delete)."""
    bucket, key = "test-versions", "kept.jpg"
    ensure_bucket(s3, bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    set_notifications(stack, bucket, on=True)

    def indexed(version: dict[str, Any], after: int = -1) -> dict[str, Any]:
        etag = version["ETag"].strip('"')

        def current() -> dict[str, Any] | None:
            state = object_state(api, bucket, key)
            ok = state and state["state"] == "indexed" and state["etag"] == etag and int(state["order"]) > after
            return state if ok else None

        return wait_for(current, 90, what=f"{key} indexed with etag {etag} after order {after}")  # type: ignore

    def gone(what: str) -> None:
        wait_for(lambda: object_state(api, bucket, key) is None, 60, what=what)

    first = s3.put_object(Bucket=bucket, Key=key, Body=photo(PHOTOS[0]))
    indexed(first)
    second = s3.put_object(Bucket=bucket, Key=key, Body=photo(PHOTOS[1]))
    before = indexed(second)
    s3.delete_object(Bucket=bucket, Key=key, VersionId=first["VersionId"])  # an old version: the current one stays
    indexed(second, after=int(before["order"]))  # (settled again, at the deletion's order)
    marker = s3.delete_object(Bucket=bucket, Key=key)
    gone(f"{key} hidden by a delete marker")
    s3.delete_object(Bucket=bucket, Key=key, VersionId=marker["VersionId"])  # undeleted
    # ... with its own time, not the undeletion's: a search by date missed it, and a reconcile never mended it
    # (review 78)
    written = s3.head_object(Bucket=bucket, Key=key)["LastModified"]
    assert parse_iso(indexed(second)["modified"]) == written
    s3.delete_object(Bucket=bucket, Key=key, VersionId=second["VersionId"])  # its last version
    gone(f"{key} deleted with its last version")

    third = s3.put_object(Bucket=bucket, Key=key, Body=photo(PHOTOS[2]))
    indexed(third)
    marker = s3.delete_object(Bucket=bucket, Key=key)
    gone(f"{key} hidden by a delete marker")
    set_notifications(stack, bucket, on=False)
    s3.delete_object(Bucket=bucket, Key=key, VersionId=marker["VersionId"])  # undeleted, and the index never hears
    report = api.post("/reconcile", json={"bucket": bucket}, headers=admin(stack)).json()
    assert report["missing"] == 1 and report["failed"] == 0, report
    indexed(third)


def test_a_reindex_cannot_be_cancelled_and_an_ended_jobs_thread_leaves_the_next_job_alone() -> None:
    """Cancelling a reindex answered "cancelled" while its restructure went on; the next rebuild could start, and
    when the restructure ended, its thread marked the old job done and emptied the new reembed's objects still to
    come: the new generation was promoted with 2 of 5 objects (an independent review)."""
    service, _, _ = carrying_service("photos")
    rebuilds = service.rebuilds
    rebuilds.current = RebuildJob("r", "reindex", 1, "m", "Flat")
    with pytest.raises(RebuildConflict, match="cannot be cancelled"):
        rebuilds.cancel("r")
    assert rebuilds.current.state == "running"
    ended = RebuildJob("old", "reembed", 3, "m", "Flat", state="cancelled")
    rebuilds.current = RebuildJob("new", "reembed", 4, "m", "Flat")
    rebuilds._expected = {"photos/a", "photos/b"}
    rebuilds._finish(ended, "cancelled")  # what the old job's thread does last
    assert rebuilds._expected == {"photos/a", "photos/b"} and rebuilds.current.id == "new"


def test_an_ended_reembed_drops_the_pending_marks_of_versions_the_index_holds(stack: Stack) -> None:
    """Review 78: after `rebuild --cancel`, `pending_objects` counted every object the job had queued (1,318) for
    ~15 s with every queue empty, until the lost-task sweep dropped their marks; a finished one left marks too. On a
    real Redis: the ended job drops the marks of versions the serving index (or a failure record) holds, and keeps a
    newer version's, which is on its way, the same bytes' too; while a rebuild runs, nothing is dropped."""
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")
    redis = connect(stack.settings.redis_url)
    service, serving, _ = carrying_service("photos")
    service.redis, service.keys, service.backend = redis, keys, SimpleNamespace(discard=lambda shadow: None)
    serving.apply([upsert("photos", "held", 1), upsert("photos", "replaced", 2), upsert("photos", "failed", 3),
                   upsert("photos", "reverted", 5)])
    records = Records(redis, keys)
    pipe = redis.pipeline()
    records.mark_pending(pipe, [ObjectRef("photos", "held", "e1", order=1, generation=2),  # the job's own
                                ObjectRef("photos", "replaced", "e9", order=19),  # an upload on its way
                                ObjectRef("photos", "failed", "bad", order=13, generation=2),
                                # the bytes the index holds, uploaded again after another version (review 82)
                                ObjectRef("photos", "reverted", "e5", order=25)], time.time())
    records.record_failures(pipe, [(ObjectRef("photos", "failed", "bad", order=13),
                                    failure_record(ObjectRef("photos", "failed", "bad", order=13), "corrupt", "x", 1,
                                                   0.0))])
    pipe.execute()
    try:
        assert drop_settled(service) == 0  # (the shadow serves the running job: its marks name what serving holds)
        service.rebuilds.cancel("j")
        assert service.shadow is None
        wait_for(lambda: set(redis.hkeys(keys.pending)) == {b"photos/replaced", b"photos/reverted"}, 10,
                 what="the ended job's settled marks dropped at once")
    finally:
        redis.delete(*redis.keys(f"{keys.namespace}:*"))
        redis.close()


def test_a_reindex_keeps_its_type_only_once_its_restructure_ends() -> None:
    """A reindex killed midway was marked failed ("the serving generation is intact"), and the restarted service
    made the type it asked for all the same: the type had been kept before the restructure (review 29)."""
    service, serving, _ = carrying_service("photos")
    chosen: list[str] = []
    service.choose_type = chosen.append
    service.snapshot = lambda: None

    def killed(index_type: str, progress: Any = None) -> None:
        raise RuntimeError("killed midway")

    serving.restructure = killed  # type: ignore[method-assign]
    job = RebuildJob("r", "reindex", 1, "m", "IVF", chosen="IVF")
    with pytest.raises(RuntimeError):
        service.rebuilds._reindex(job)
    assert chosen == []
    serving.restructure = lambda index_type, progress=None: None  # type: ignore[method-assign]
    service.snapshot = lambda: killed("")  # FAISS: the new structure is durable once its snapshot is written
    with pytest.raises(RuntimeError):
        service.rebuilds._reindex(job)
    assert chosen == []
    service.snapshot = lambda: None
    service.rebuilds._reindex(job)
    assert chosen == ["IVF"] and job.state == "done"


def test_a_job_failed_under_an_earlier_release_keeps_its_error_for_readers() -> None:
    """Its ``error`` may name an object, and ``/stats`` and ``GET /rebuild/{id}`` are open: it moves to
    ``error_detail``, which only readers see (review 72)."""
    old = {"id": "j1", "mode": "reembed", "state": "failed", "error": "photos/x.jpg failed 3 times ..."}
    service = SimpleNamespace(redis=SimpleNamespace(get=lambda key: json.dumps(old)), keys=Keys("t"))
    job = Rebuilds(service).get("j1")  # type: ignore[arg-type]
    assert job is not None and job["error_detail"] == old["error"] and "photos/" not in job["error"], job
    done = {**old, "state": "done", "error": ""}
    service.redis.get = lambda key: json.dumps(done)
    assert Rebuilds(service).get("j1")["error_detail"] == ""  # type: ignore[arg-type,index]
