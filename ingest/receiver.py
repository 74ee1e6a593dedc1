"""The webhook receiver: ``POST /events`` from MinIO, Ceph RGW or any S3-style notifier.

Answers 2xx only once every created object is in the broker and every delete is in the result stream;
otherwise 503, so the S3 server delivers the event again; also 503 while Redis is near its ``maxmemory``, so a
burst never fills Redis past the room the workers' results need to drain it. Repeated notifications are
suppressed. An event whose time-based order lies beyond now + the tolerated clock skew is acknowledged and
dropped (counted as ``future``): applied, it would outrank every real event for its object; reconcile settles
that object from the listing. A version of a versioned object deleted for good may leave the key with a current
version: ingest asks S3 which (``Receiver._settle``). An Amazon SNS subscription (AWS S3 -> SNS -> this
endpoint) is confirmed by visiting its ``SubscribeURL``, only on Amazon SNS's own hosts (``Receiver._confirm``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import re
import time
import uuid
from typing import Any, AsyncIterator, Sequence
from urllib.parse import SplitResult, urlsplit

import httpx
import redis
from botocore.exceptions import BotoCoreError, ClientError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bucketlens.auth import token_ok
from bucketlens.http import EXCEPTION_HANDLERS, HTTPError, read_limited
from bucketlens.keys import Keys
from bucketlens.openapi import route as openapi_route
from bucketlens.ordering import MAX_CLOCK_SKEW_NS, beyond_clock_skew, event_time
from bucketlens.outage import Outage
from bucketlens.redis_client import connect, text
from bucketlens.s3 import http_status, make_client
from bucketlens.schemas import ObjectRef, normalise_etag
from bucketlens.settings import Settings, host_and_port

from .batcher import Batcher
from .errors import BadEvent, NoGeneration, S3Unavailable
from .events import ObjectEvent, ParsedBody, parse_body
from .openapi import OPENAPI
from .publisher import Publisher

log = logging.getLogger(__name__)
DELETES = ("removed", "version_removed")  # the event kinds checked against S3 before they are applied
REDIS_DOWN = "cannot queue events, answering 503 until Redis is back: %s"  # said once per outage
REFUSED_LOG_S = 60.0  # requests refused for their token: one warning per this many seconds, with their count
AMAZON_SNS = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")  # the hosts of SubscribeURLs (over https)
# An event's dedup key holds a delivery's token while that delivery queues it (for at most CLAIM_S: then a
# redelivery of an event whose delivery died, or runs slow, is queued too: a duplicate, where a longer claim could
# spend a notifier's retries, Amazon SNS's 3 in ~60 s, and lose it), "1" once queued (for ``dedup_ttl_s``). Per key:
# CLAIMED by this delivery (a retried call finds its own token), QUEUEING by another, or QUEUED already.
CLAIM_S = 15
CLAIMED, QUEUEING, QUEUED = 0, 1, 2
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'EX', ARGV[2]) then out[i] = 0
  else
    local held = redis.call('GET', key)
    if held == ARGV[1] then out[i] = 0 elseif held == '1' then out[i] = 2 else out[i] = 1 end
  end
end
return out
"""
_UNCLAIM = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
"""


class Receiver:
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.redis = client
        self.publisher = Publisher(settings, client)
        self.batcher = Batcher(self._flush_created, settings.batch_window_ms / 1000, settings.batch_size)
        self._redis_down = Outage(log, "Redis reachable again")
        self._near_full = Outage(log, "Redis has room again (%d of %d bytes)")
        self._head_refused_logged = False
        self._claim_script = client.register_script(_CLAIM)
        self._unclaim_script = client.register_script(_UNCLAIM)
        self._refused = (0, -math.inf)  # requests refused for their token since the last warning, and when that was

    @functools.cached_property
    def s3(self) -> Any:
        """Only to check deletes (``_settle``): made when the first one arrives, not at start-up."""
        return make_client(self.settings)

    async def _flush_created(self, refs: Sequence[ObjectRef]) -> None:
        await run_in_threadpool(self.publisher.send_embeds, refs)

    def _claim(self, events: list[ObjectEvent], token: str) -> tuple[list[ObjectEvent], int, int]:
        """The events this delivery (``token``) queues (not queued before, nor being queued by another delivery: the
        same event, ``_digest``), each once however often the body repeats it; how many are duplicates, and how many
        another delivery is queueing now. A mark set only once queued let every delivery the S3 server sent again
        while Redis was frozen through: each was queued, and 300 uploads were embedded ~5 times (review 83)."""
        distinct: dict[str, ObjectEvent] = {}
        for event in events:
            distinct.setdefault(_digest(event), event)
        if not distinct:
            return [], 0, 0
        states = self._claim_script(keys=[self.keys.dedup(digest) for digest in distinct], args=[token, CLAIM_S])
        fresh = [event for event, state in zip(distinct.values(), states) if state == CLAIMED]
        queueing = states.count(QUEUEING)
        return fresh, len(events) - len(fresh) - queueing, queueing

    def _mark_seen(self, events: list[ObjectEvent]) -> None:
        """Remember events once they are queued (their claim becomes a mark for ``dedup_ttl_s``)."""
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.set(self.keys.dedup(_digest(event)), b"1", ex=self.settings.dedup_ttl_s)
        pipe.execute()

    def _unclaim(self, events: list[ObjectEvent], token: str) -> None:
        """Let the S3 server's redelivery of events this delivery could not queue through at once (its own claims
        only; with Redis gone too, they run out after ``CLAIM_S``)."""
        with contextlib.suppress(redis.RedisError):
            if events:
                self._unclaim_script(keys=[self.keys.dedup(_digest(event)) for event in events], args=[token])

    def _room_left(self) -> None:
        """Refuse (503) above ``ingest_max_memory_fraction`` of Redis's ``maxmemory``: with ``noeviction`` a full
        Redis refuses every write, the workers' results included, and the queue could not drain. The S3 server
        keeps the refused events and delivers them again."""
        info = self.redis.info("memory")
        limit = int(info.get("maxmemory", 0))
        used = int(info["used_memory"])
        if limit and used >= limit * self.settings.ingest_max_memory_fraction:
            self._near_full.failed("Redis holds %d of its %d bytes (maxmemory): answering 503 until the queue drains",
                                   used, limit, level=logging.WARNING, exc_info=False)
            self.redis.hincrby(self.keys.counters, "refused_near_full", 1)
            raise HTTPError(503, "redis_near_full", f"Redis is near its memory limit ({used} of {limit} bytes); "
                            "deliver the event again later")
        self._near_full.worked(used, limit)

    def _note_refused(self) -> None:
        """Count a request refused for its token (``unauthorized``), and say so at most once a minute: a bucket
        notification still pushing an earlier webhook token (one made by hand, which ``up`` does not put again) lost
        every event, with no log line and no metric (review 67)."""
        count, said = self._refused
        count += 1
        if time.monotonic() - said >= REFUSED_LOG_S:
            log.warning("refused %d notification request(s) with a missing or wrong webhook token since the last such "
                        "warning: an S3 bucket notification that pushes an earlier token loses its events; put it "
                        "again with the current one (README, \"Notifications from your S3 server\"), then run "
                        "`bucketlens reconcile`", count)
            count, said = 0, time.monotonic()
        self._refused = (count, said)
        try:
            self.redis.hincrby(self.keys.counters, "unauthorized", 1)
        except redis.RedisError:
            pass  # (the warning said it; Redis away is said by the requests that need it)

    def _note_canaries(self, events: list[ObjectEvent]) -> None:
        """Mark the outstanding canary (``infra/canary.py``: its writer names it in ``pending_key``) as delivered.
        Other reserved-prefix events (snapshot copies, a canary seen already) change nothing: each one was marked,
        so one body of forged ones wrote thousands of keys and made a stalled topic look healthy (review 10)."""
        key = text(self.redis.hget(self.keys.canary, "pending_key") or b"")
        if key and any(event.ref.key == key for event in events):
            now = time.time()
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.keys.canary_seen(key), now, ex=3600)
            pipe.hset(self.keys.canary, mapping={"last_key": key, "last_seen": now})
            pipe.execute()

    async def handle(self, request: Request) -> JSONResponse:
        if "origin" in request.headers:  # S3 servers and SNS send none; browsers send one with every POST
            raise HTTPError(403, "forbidden", "ingest takes notifications from S3 servers, not from web pages (the "
                            "request has an Origin header): with no webhook token, any page could post events")
        if not token_ok(request, self.settings.webhook_token):
            await run_in_threadpool(self._note_refused)
            raise HTTPError(401, "unauthorized", "missing or wrong webhook token")
        body = await read_limited(request, self.settings.max_body_bytes)
        try:
            parsed = parse_body(body)
        except BadEvent as exc:
            raise HTTPError(400, "bad_event", str(exc)) from exc
        if parsed.subscribe_url:
            return await run_in_threadpool(self._confirm, parsed)
        reserved = [e for e in parsed.events if e.ref.key.startswith(self.settings.reserved_prefix)]
        events = [e for e in parsed.events if not e.ref.key.startswith(self.settings.reserved_prefix)]
        now = time.time_ns()
        future = [e for e in events if beyond_clock_skew(e.order, now)]
        if future:
            events = [e for e in events if not beyond_clock_skew(e.order, now)]
            log.warning("dropped %d events whose order is more than %d s ahead of this clock (forged, or the S3 "
                        "server's clock is wrong), e.g. %r; a reconcile settles those objects", len(future),
                        MAX_CLOCK_SKEW_NS // 1_000_000_000, future[0].ref.object_id)
        try:
            if events:
                await run_in_threadpool(self._room_left)
            generations = await run_in_threadpool(self.publisher.generations)
            token = uuid.uuid4().hex
            fresh, duplicates, elsewhere = await run_in_threadpool(self._claim, events, token)
        except redis.RedisError as exc:
            self._redis_down.failed(REDIS_DOWN, exc, level=logging.WARNING, exc_info=False)
            raise HTTPError(503, "redis_unavailable", "Redis is unreachable; deliver the event again") from exc
        except NoGeneration as exc:
            raise HTTPError(503, "no_generation", f"{exc}; deliver the event again") from exc
        settled, stale = fresh, 0
        try:
            if any(e.kind in DELETES for e in fresh):  # (uploads, the usual request, make no trip to S3)
                settled = await run_in_threadpool(self._settle, fresh)
                stale = len(fresh) - len(settled)
            created = [_tag(e.ref, g) for e in settled if e.kind == "created" for g in generations]
            removed = [_tag(e.ref, g) for e in settled if e.kind == "removed" for g in generations]
            if removed:
                await run_in_threadpool(self.publisher.write_deletes, removed)
            await self.batcher.submit(created)
            await run_in_threadpool(self._mark_seen, fresh)
        except S3Unavailable as exc:
            await run_in_threadpool(self._unclaim, fresh, token)
            raise HTTPError(503, "s3_unavailable", f"{exc}; deliver the event again") from exc
        except Exception as exc:  # broker or Redis down: nothing was acknowledged, the S3 server retries
            await run_in_threadpool(self._unclaim, fresh, token)
            self._redis_down.failed(REDIS_DOWN, exc, level=logging.WARNING, exc_info=False)
            raise HTTPError(503, "broker_unavailable", "could not queue the event; deliver it again") from exc
        try:
            await run_in_threadpool(self._record, parsed.ignored, duplicates, len(settled), len(future), stale,
                                    reserved, elsewhere)
        except redis.RedisError as exc:  # (a canary not noted: the S3 server sends it again, the rest duplicates)
            self._redis_down.failed(REDIS_DOWN, exc, level=logging.WARNING, exc_info=False)
            raise HTTPError(503, "redis_unavailable", "Redis is unreachable; deliver the event again") from exc
        self._redis_down.worked()
        if elsewhere:  # queued by now, or not: its redelivery is then a duplicate, or queued by itself
            raise HTTPError(503, "in_flight", f"{elsewhere} of these events are being queued by another delivery of "
                            "them; deliver them again")
        return JSONResponse(
            {"accepted": len(settled), "duplicates": duplicates, "ignored": parsed.ignored + len(reserved),
             "future": len(future), "stale_deletes": stale},
            status_code=200,
        )

    def _trusted(self, url: SplitResult) -> bool:
        """Whether ``sns_hosts`` names the host of ``url`` (in any case), and its port where an entry gives one (an
        entry with a port never matched, one in capitals neither; a port dropped trusted every port: reviews 86,
        88)."""
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:  # (a port that is no number: a 500 with a traceback, review 89)
            return False
        for entry in filter(None, map(str.strip, self.settings.sns_hosts.split(","))):
            host, given = host_and_port(entry)  # (each checked at start: settings)
            if host == url.hostname and given in (None, port):
                return True
        return False

    def _confirm(self, parsed: ParsedBody) -> JSONResponse:
        """Confirm an SNS subscription by visiting its SubscribeURL: on Amazon SNS's hosts over https, or on a host
        of ``sns_hosts``; never elsewhere (the body chooses the URL: ingest must not fetch whatever it names).
        A failed visit answers 503, and SNS sends the confirmation again."""
        url = urlsplit(parsed.subscribe_url)
        host = url.hostname or ""
        if not ((url.scheme == "https" and AMAZON_SNS.fullmatch(host)) or (url.scheme in ("http", "https")
                                                                           and self._trusted(url))):
            log.warning("not confirming the SNS subscription to %r: its SubscribeURL is on %r, not Amazon SNS "
                        "(BUCKETLENS_SNS_HOSTS names other hosts)", parsed.topic, host)
            raise HTTPError(403, "subscription_refused", f"not confirming the SNS subscription to {parsed.topic}: "
                            f"its SubscribeURL is on {host!r}, not sns.<region>.amazonaws.com over https "
                            "(BUCKETLENS_SNS_HOSTS names other hosts to trust)")
        try:
            response = httpx.get(parsed.subscribe_url, timeout=10)
            response.raise_for_status()
        except httpx.InvalidURL as exc:  # (a port such as ':1x' passes the host check)
            raise HTTPError(403, "subscription_refused", f"the SubscribeURL of {parsed.topic} is not a valid URL: "
                            f"{exc}") from exc
        except httpx.HTTPError as exc:  # said without the URL: its token confirms the subscription
            reason = (f"HTTP {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError)
                      else str(exc) or type(exc).__name__)
            log.warning("could not confirm the SNS subscription to %r at %r: %s", parsed.topic, host, reason)
            raise HTTPError(503, "subscription_unconfirmed", f"could not confirm the SNS subscription to "
                            f"{parsed.topic} at {host}: {reason}; send the confirmation again") from exc
        log.info("confirmed the SNS subscription to %r", parsed.topic)
        return JSONResponse({"confirmed": True, "topic": parsed.topic})

    def _settle(self, events: list[ObjectEvent]) -> list[ObjectEvent]:
        """Each delete as what S3 holds for its key now (a HEAD). A delete of a key S3 still holds is dropped: the
        key was written again since (that write's own event brings it), or the delete is forged (whoever holds the
        webhook token could otherwise hide any object). A deleted version (``version_removed``) becomes the key's
        current version, to embed (a non-current version deleted, or a delete marker removed: the object is there),
        with that version's time, or a delete; either is ordered at the version's deletion, after the events that
        came before it (a delete marker's tombstone included) and before any that come after."""
        settled = []
        for event in events:
            if event.kind not in DELETES:
                settled.append(event)
                continue
            ref = event.ref
            head = self._head(ref)
            if head is None:
                settled.append(dataclasses.replace(event, kind="removed"))
            elif event.kind == "version_removed":  # (with the version's own time: the deletion's made a search
                # by date miss it, and a reconcile never mended it: review 78)
                current = dataclasses.replace(ref, etag=normalise_etag(head["ETag"]),
                                              size=int(head["ContentLength"]),
                                              version_id=str(head.get("VersionId") or ""),
                                              event_time=event_time(head["LastModified"]))
                settled.append(ObjectEvent("created", current, event.timed))
            else:
                # INFO: a delete and an upload again soon after (the usual case) logged a WARNING each, 16-29 a minute
                # in an independent check; they are counted (``stale_deletes``)
                log.info("not removing %r: S3 still holds it (etag %s), written again since its delete (or the "
                         "delete is forged)", ref.object_id, normalise_etag(head["ETag"]))
        return settled

    def _head(self, ref: ObjectRef) -> dict[str, Any] | None:
        """S3's HEAD of the key's current version; None when it holds none, or when S3 refuses to say (the delete is
        then applied, as without the check: a reconcile restores an object removed by mistake). S3 failing or
        throttling (5xx, 429) is S3 unreachable: the delete waits (it was applied unchecked, so a forged delete hid
        a stored object whenever S3 was busy: an independent review)."""
        try:
            return self.s3.head_object(Bucket=ref.bucket, Key=ref.key)  # type: ignore[no-any-return]
        except ClientError as exc:
            status = http_status(exc)
            if status is not None and (status >= 500 or status == 429):
                raise S3Unavailable(f"S3 answered HTTP {status} to a check of a delete: {exc}") from exc
            if status not in (404, 405) and not self._head_refused_logged:  # (405: a delete marker is current)
                log.warning("cannot ask S3 whether %r is still stored (%s): deletes are applied unchecked; a "
                            "reconcile restores what a forged one removes", ref.object_id, exc)
                self._head_refused_logged = True
            return None
        except BotoCoreError as exc:
            raise S3Unavailable(f"S3 is unreachable to check a delete: {exc}") from exc

    def _record(self, ignored: int, duplicates: int, accepted: int, future: int, stale: int,
                reserved: list[ObjectEvent], in_flight: int) -> None:
        """Count the records by outcome; ``reserved``, under the reserved prefix (canaries, snapshot copies, and
        whatever else is put there), are answered ``ignored`` and counted apart: they were counted nowhere (review
        67), and in ``ignored`` every canary would be. ``in_flight``: those another delivery was queueing, sent
        back (503) to come again (counted nowhere: review 85)."""
        pipe = self.redis.pipeline(transaction=False)
        for name, value in (("received", accepted + duplicates + ignored + future + stale + len(reserved) + in_flight),
                            ("ignored", ignored), ("duplicated", duplicates), ("accepted", accepted),
                            ("future", future), ("stale_deletes", stale), ("reserved", len(reserved)),
                            ("in_flight", in_flight)):
            if value:
                pipe.hincrby(self.keys.counters, name, value)
        with contextlib.suppress(redis.RedisError):  # (counters: what was queued stays queued, and counted or not)
            pipe.execute()
        if reserved:
            self._note_canaries(reserved)


def _digest(event: ObjectEvent) -> str:
    """What makes a delivery the same event: a redelivery repeats all of it. The event time too: from a notifier
    that sends no sequencer, a put, delete, put of the same bytes within the dedup TTL dropped the second put,
    and the delete's tombstone hid the object (an independent review)."""
    ref = event.ref
    raw = "\0".join((event.kind, ref.bucket, ref.key, ref.etag, ref.sequencer, ref.version_id, ref.event_time))
    return hashlib.sha1(raw.encode()).hexdigest()


def _tag(ref: ObjectRef, generation: int) -> ObjectRef:
    return ref if ref.generation == generation else dataclasses.replace(ref, generation=generation)


def create_app(settings: Settings) -> Starlette:
    """The ingest service's Starlette app."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = connect(settings.redis_url)
        app.state.receiver = Receiver(settings, client)
        yield
        app.state.receiver.publisher.close()
        client.close()

    async def events(request: Request) -> JSONResponse:
        receiver: Receiver = request.app.state.receiver
        return await receiver.handle(request)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(  # (redirect_slashes stays: a notifier set up with ``/events/`` is redirected, as it was)
        routes=[Route("/events", events, methods=["POST"]), Route("/healthz", healthz), openapi_route(OPENAPI)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
