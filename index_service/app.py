"""``create_app(settings)``: the HTTP API of the index service (DESIGN.md, "HTTP API")."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping

from botocore.exceptions import BotoCoreError, ClientError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from bucketlens.auth import token_ok
from bucketlens.http import (
    EXCEPTION_HANDLERS,
    HostGuard,
    HTTPError,
    JSONResponse,
    json_object,
    only,
    read_limited,
    unavailable_response,
)
from bucketlens.openapi import route as openapi_route
from bucketlens.records import record
from bucketlens.schemas import ObjectRef, object_id
from bucketlens.settings import Settings
from vision import labels, local_features, words
from vision.decode import decode_for, preview_jpeg
from vision.embedders import Embedder
from vision.errors import PermanentError
from vision.models import recipe
from vision.words import VocabularyMissing
from workers.errors import ObjectChanged, TransientError
from workers.fetch import fetch

from .backend import Index
from .duplicates import GROUP_MATCHES as DUPLICATE_MATCHES
from .duplicates import groups as find_groups
from .failures import Selection, clear_failures, list_failures, retry_failures
from .filters import bucket_field, iso
from .filters import parse as parse_filter
from .metrics import CONTENT_TYPE, Metrics
from .openapi import OPENAPI
from .queries import JSON_LIMIT, SearchQuery, decimal, parse_search
from .queues import queue_report
from .rebuild import NotWriter, RebuildConflict
from .rebuild import public as rebuild_public
from .reconcile import reconcile
from .service import Service
from .text import SUGGESTIONS, suggest
from .text import search as text_search
from .verify import CANDIDATES, Content, Hit, QueryBytes, rerank, same_bytes

STATIC = Path(__file__).parent / "static"
MAX_OFFSET = 10**9  # of a listing (/failures, /duplicates): far beyond any page there is
MAX_LIMIT = 1000  # items of a listing's page
BUCKET_CHECK_S = 3.0  # the most a search with no result waits on S3 to say whether its bucket filter exists


class KeyConvertor(PathConvertor):
    """An object key in a path (``{key:key}``): any characters, '/' and newlines included (Starlette's ``path``
    stops at a newline, so such a key could not be asked about)."""

    regex = "(?s:.*)"


register_url_convertor("key", KeyConvertor())


def _page_policy(page: str) -> str:
    """The web page's Content-Security-Policy: its own inline script (by hash) and style, the API of its own
    origin, and images from anywhere (results are presigned URLs of the S3 server) or made in the page; nothing
    else. The page puts every server string into the DOM as text; the policy is there should that ever slip."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
                      for script in re.findall(r"<script>(.*?)</script>", page, re.DOTALL))
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' http: https: data: blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


# The web page is not framed by other sites, not sniffed, runs only its own script, and sends no Referer (it is
# opened as /?token=... when a read token is set).
PAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": _page_policy((STATIC / "index.html").read_text())}
TOKEN_PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><title>bucketlens: read token needed</title>
<body style="font-family: system-ui, sans-serif; max-width: 640px; margin: 60px auto; line-height: 1.5">
<h1>This page needs the read token</h1>
<p>The token in this address is not the read token. Open the page as <code>/?token=READ_TOKEN</code>. On the
local stack <code>bucketlens status</code> prints this address with its token; otherwise the token is
<code>BUCKETLENS_READ_TOKEN</code> where the index service runs. The admin token does not open the page.</p>
</body></html>
"""


# Query images decoded and embedded at once; the rest wait their turn. The work is CPU-bound (no gain past the
# cores), and each decode may hold ~1.3 GB (a 64 MP RGBA PNG): three at once took the service to 4.4 GB, and the
# thread pool's 40 would have taken far more than the machine (a security check).
DECODES = max(2, os.cpu_count() or 2)
# Previews fetched and decoded at once (``GET /preview``), beside the searches' places: a page of 50 HEIC results
# would otherwise take them all. Waiting previews hold no thread of the pool that searches run in.
PREVIEWS = max(1, DECODES // 2)


def create_app(settings: Settings, embedder: Embedder | None = None) -> Starlette:
    """The index service; ``embedder`` lets tests share one loaded model across apps."""
    decoding = threading.BoundedSemaphore(DECODES)
    previewing = asyncio.Semaphore(PREVIEWS)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service = Service(settings, embedder)
        service.start()
        app.state.service = service
        app.state.metrics = Metrics(service)
        yield
        await run_in_threadpool(service.close)

    def service_of(request: Request, read: bool = False) -> Service:
        if read:
            may_read(request)
        service: Service = request.app.state.service
        return service

    def reader(request: Request, admin_too: bool = True) -> bool:
        """Whether ``request`` may read the index: the read token, or (``admin_too``) the admin token where one is
        set (an operator holding the stronger token was refused a search: review 28)."""
        admin = admin_too and bool(settings.admin_token) and token_ok(request, settings.admin_token)
        return token_ok(request, settings.read_token) or admin

    def may_read(request: Request, admin_too: bool = True) -> None:
        if not reader(request, admin_too):
            page = "" if admin_too else " (the web page takes the read token)"
            raise HTTPError(401, "unauthorized", f"missing or wrong read token{page}")

    def shown(request: Request, job: dict[str, Any] | None) -> dict[str, Any] | None:
        """A rebuild job as an open endpoint shows it: ``error_detail`` names an object, so only to a reader."""
        return job if job is None or reader(request) else {**job, "error_detail": None}

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        ok, reason = await run_in_threadpool(service_of(request).ready)
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    async def search(request: Request) -> Response:
        service = service_of(request, read=True)
        serving = service.index  # one generation for the whole query, even if a rebuild swaps meanwhile
        started = time.perf_counter()
        query = await parse_search(request, settings.max_upload_bytes, serving.dim)
        parsed = time.perf_counter()
        kind = query.kind
        if query.rerank and kind in ("vector", "text"):
            raise HTTPError(400, "bad_parameter", f"a {kind} query has nothing to verify: rerank needs an image or key")
        answer: dict[str, Any] = {}
        if kind == "text":
            assert query.text is not None
            try:
                vocabulary = await run_in_threadpool(words.vocabulary, settings.wordnet)
            except VocabularyMissing as exc:
                raise HTTPError(503, "no_vocabulary", str(exc)) from exc
            found_text = await run_in_threadpool(text_search, serving, vocabulary, query.text, query.k, query.where)
            hits = [Hit(o, s) for o, s in found_text.hits]
            answer = found_text.public()
        else:
            hits = await _similar(service, serving, query)
            if kind == "key":  # (its bucket: the service's default where the query named none)
                answer = {"query_object": {"bucket": query.bucket, "key": query.key}}
        scanned = time.perf_counter()
        # A cosine of float32 sums can pass 1 by ~1e-4 (an identical image): it is said as 1. min_score keeps what
        # shows at least it (a raw 0.8999999999999999 shown as 0.9 was dropped by min_score 0.9), before the cut at k
        # (after it, a low-scoring copy that verification moved up took a place, then was dropped: k-1 results).
        shown = ((h, round(min(h.score, 1.0), 6)) for h in hits)
        kept = [(h, score) for h, score in shown if query.min_score is None or score >= query.min_score][: query.k]
        if not kept and query.where is not None:
            await _say_unknown_bucket(service, query.where.bucket)
        results = [
            {"bucket": h.obj.bucket, "key": h.obj.key, "etag": h.obj.etag, "score": score,
             "verified": h.verified, "matches": h.matches, "identical": h.identical,
             "labels": labels.public(h.obj.labels),
             "modified": iso(h.obj.modified), "url": service.presigner.url(h.obj.bucket, h.obj.key)}
            for h, score in kept
        ]
        listed = time.perf_counter()
        took_ms = (listed - started) * 1000
        request.app.state.metrics.search_seconds.labels(kind).observe(took_ms / 1000)
        response = JSONResponse({"model": serving.model, "took_ms": round(took_ms, 3), **answer,
                                 "filter": query.where.public() if query.where else None, "results": results})
        # Where the time went, for clients and the bench (Server-Timing, milliseconds); costs ~2 us.
        response.headers["server-timing"] = (
            f"parse;dur={(parsed - started) * 1000:.3f}, scan;dur={(scanned - parsed) * 1000:.3f}, "
            f"presign;dur={(listed - scanned) * 1000:.3f}, encode;dur={(time.perf_counter() - listed) * 1000:.3f}")
        return response

    async def _similar(service: Service, serving: Index, query: SearchQuery) -> list[Hit]:
        """An image, key or vector query: the nearest objects the filter keeps, verified where the model can."""
        verify = recipe(serving.model).local_features if query.rerank is None else query.rerank
        exclude: str | None = None
        etag: Content = ""  # the query's content, whose byte-identical copies are the same photo
        views: list[local_features.Features] = []
        if query.image is not None:
            if not service.embedders.loaded(serving.model):
                raise HTTPError(503, "not_ready", "the model is still loading")
            embedder = service.embedders.get(serving.model)
            query.vector, views = await run_in_threadpool(_describe_bounded, decoding, embedder, query.image,
                                                          settings.max_pixels, verify)
            etag = QueryBytes(query.image)
        elif query.key is not None:
            bucket = query.bucket = query.bucket or settings.bucket
            query.vector = await run_in_threadpool(serving.vector, bucket, query.key)
            if query.vector is None:
                raise HTTPError(404, "not_indexed", await run_in_threadpool(_not_indexed, service, bucket, query.key))
            exclude = object_id(bucket, query.key)
            views, etag = await run_in_threadpool(_stored_views, serving, bucket, query.key, verify)
        assert query.vector is not None
        want = max(query.k, CANDIDATES) if views else query.k
        found = await run_in_threadpool(serving.search, query.vector, want, exclude, query.where or None)
        if not views:  # (unverified, in the model's order: the query's own bytes are still said, off the event
            # loop: an image's etags in parts read it once for each part size tried)
            return await run_in_threadpool(lambda: [Hit(o, s, identical=same_bytes(etag, o.etag)) for o, s in found])
        return await run_in_threadpool(rerank, serving, found, views, recipe(serving.model).promote_matches, etag)

    async def label_list(request: Request) -> Response:
        service = service_of(request, read=True)
        params = _params(request, ("q", "limit"), "/labels")
        limit = _count(params, "limit", SUGGESTIONS, 1, MAX_LIMIT)
        serving = service.index
        found = await run_in_threadpool(suggest, serving, params.get("q", ""), limit)
        return JSONResponse({"model": serving.model, "labels_kept": recipe(serving.model).labels, "labels": found})

    async def duplicates(request: Request) -> Response:
        service = service_of(request, read=True)
        params = _params(request, ("bucket", "prefix", "min_matches", "offset", "limit"), "/duplicates")
        offset, limit = _page(params, 50)
        # Pairs with fewer matches are never kept, so a lower floor would answer as this one while saying otherwise.
        # Clamped like offset: SQLite refuses integers beyond 64 bits (a fuzzed 1.3e20 answered 500).
        min_matches = _count(params, "min_matches", DUPLICATE_MATCHES, local_features.MIN_INLIERS, MAX_OFFSET,
                             "pairs with fewer consistent matches are not kept")
        where = parse_filter({name: params.get(name) for name in ("bucket", "prefix")})  # (an empty bucket: 400)
        serving = service.index
        found = await run_in_threadpool(find_groups, serving, min_matches, where.bucket, where.prefix)
        if not found:
            await _say_unknown_bucket(service, where.bucket)
        page = [
            {"size": len(g.members), "pairs": g.pairs, "min_matches": g.matches,
             "members": [{"bucket": o.bucket, "key": o.key, "etag": o.etag, "pixels": o.pixels,
                          "url": service.presigner.url(o.bucket, o.key)} for o in g.members]}
            for g in found[offset : offset + limit]
        ]
        return JSONResponse({"model": serving.model, "total": len(found), "offset": offset, "limit": limit,
                             "pending": service.duplicates.pending, "groups": page})

    async def objects(request: Request) -> Response:
        service = service_of(request, read=True)
        _params(request, (), "GET /objects")  # (``?etag=``, which /preview takes, was ignored here without a word)
        bucket, key = request.path_params["bucket"], request.path_params["key"]
        return JSONResponse(await run_in_threadpool(_object_state, service, bucket, key))

    async def preview(request: Request) -> Response:
        """A JPEG of an indexed object for the web page, where the browser cannot show the file (HEIC, TIFF): every
        result of an iPhone's library showed "no preview" (an independent check). Only indexed objects: the service
        is no way to read any key of any bucket."""
        service = service_of(request, read=True)
        bucket, key = request.path_params["bucket"], request.path_params["key"]
        wanted = _params(request, ("etag",), "GET /preview").get("etag")
        if wanted == "":  # (was 404 object_changed: the object had not changed)
            raise HTTPError(400, "bad_parameter", "etag is empty: give the indexed version's etag, or leave it out")
        async with previewing:
            etag, body = await run_in_threadpool(_preview, service, bucket, key, wanted)
        cache = "private, max-age=86400" if wanted else "private, no-cache"  # (an address that names the version)
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": cache, "ETag": f'"{etag}-preview"'})

    async def stats(request: Request) -> Response:
        service = service_of(request)
        try:
            # (in a thread: a Milvus replica counts its rows, up to its read timeout while Milvus is slow, and the web
            # page polls this; on the event loop every request waited: review 66)
            stats = await run_in_threadpool(service.stats)
            return JSONResponse({**stats, "rebuild": shown(request, stats["rebuild"])})
        except ConnectionError as exc:  # the index server away: its 503 says still which replica writes (the CLI
            # looks for the writer by it, and waited out the lease for one that said so: ~15 s, then a 409)
            return unavailable_response(request, exc, replica=service.replica, writer=service.writing.is_set())

    async def queues(request: Request) -> Response:
        service = service_of(request)
        report = await run_in_threadpool(queue_report, service.probe, service.keys)
        writer = await run_in_threadpool(service.lease.current)  # which replica merges the stream now
        report["index"] = {"replica": service.replica, "writer": service.writing.is_set(),
                           "writer_lease": writer.rsplit("/", 1)[0] if writer else None}
        return JSONResponse(report)

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(request.app.state.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    async def failures(request: Request) -> Response:
        if request.method == "DELETE":
            service = admin_service(request)
            selection = await _selection(request)
            cleared = await run_in_threadpool(clear_failures, service.redis, service.keys, selection)
            return JSONResponse({"cleared": cleared})
        service = service_of(request, read=True)
        selection = await _selection(request, with_body=False)
        offset, limit = _page(request.query_params, 100)
        records = await run_in_threadpool(list_failures, service.redis, service.keys, selection)
        return JSONResponse({"total": len(records), "offset": offset, "limit": limit,
                             "failures": records[offset : offset + limit]})

    async def retry(request: Request) -> Response:
        service = admin_service(request)
        selection = await _selection(request)
        objects, tasks = await run_in_threadpool(retry_failures, service.redis, service.keys, service.publisher,
                                                 selection)
        return JSONResponse({"retried": objects, "tasks": tasks}, status_code=202)

    def admin_service(request: Request) -> Service:
        if not settings.admin_token:
            raise HTTPError(403, "forbidden", "no admin token is configured; admin endpoints are disabled")
        if not token_ok(request, settings.admin_token):
            raise HTTPError(401, "unauthorized", "missing or wrong admin token")
        return service_of(request)

    async def start_rebuild(request: Request) -> Response:
        service = admin_service(request)
        _params(request, (), "/rebuild")
        body = await _json_object(request, ("mode", "bucket", "index_type", "model"), "/rebuild")
        bucket = bucket_field(body.get("bucket"))
        if body.get("mode", "reembed") == "reembed":  # now, not in the job's thread as a failed job that took a
            # generation number (a reembed of every bucket whose default one was gone started: review 60)
            # (off the event loop: a Milvus index reads every row for them; the index server away is a 503
            # ``index_unavailable``, as everywhere else: it said not_ready, review 87)
            held = set() if bucket else await run_in_threadpool(service.index.buckets)
            for listed in [bucket] if bucket else sorted({settings.bucket} | held):
                with _known_bucket(listed):
                    await run_in_threadpool(service.s3.head_bucket, Bucket=listed)
        try:  # (in a thread: it waits for the rebuilds' lock, which a promote holds while it swaps, and on Milvus
            # it makes a collection: on the event loop every other request waited with it, review 66)
            job = await run_in_threadpool(service.rebuilds.start, str(body.get("mode", "reembed")), bucket,
                                          body.get("index_type"), body.get("model"))
        except RebuildConflict as exc:
            raise HTTPError(409, exc.code, str(exc)) from exc
        except ValueError as exc:
            raise HTTPError(400, "bad_parameter", str(exc)) from exc
        return JSONResponse(rebuild_public(job), status_code=202)

    async def rebuild_state(request: Request) -> Response:
        cancelling = request.method == "DELETE"  # the token first: a request without it learns nothing more
        service = admin_service(request) if cancelling else service_of(request)
        _params(request, (), "/rebuild/{id}")  # (``?x=1`` was taken, where /objects refuses it: review 26)
        job_id = request.path_params["job_id"]
        elsewhere = None  # (a replica that does not write: the job, if any, runs on the writer)
        try:
            # (in a thread: the rebuilds' lock is held by a swap, and on the event loop every other request waited
            # with it: review 30, when the swap wrote its snapshot under the lock)
            cancelled = cancelling and await run_in_threadpool(service.rebuilds.cancel, job_id) is not None
        except NotWriter as exc:
            cancelled, elsewhere = False, exc
        except RebuildConflict as exc:
            raise HTTPError(409, "not_cancellable", str(exc)) from exc
        state = await run_in_threadpool(service.rebuilds.get, job_id)
        if state is None:
            raise HTTPError(404, "unknown_rebuild", f"no rebuild {job_id}")
        if elsewhere is not None:
            raise HTTPError(409, elsewhere.code, str(elsewhere))
        if cancelling and not cancelled:
            raise HTTPError(409, "not_running", f"rebuild {job_id} is {state['state']}, not running")
        return JSONResponse(shown(request, state))

    async def start_reconcile(request: Request) -> Response:
        service = admin_service(request)
        _params(request, (), "/reconcile")
        body = await _json_object(request, ("bucket", "dry_run"), "/reconcile")
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise HTTPError(400, "bad_parameter", f"dry_run must be true or false, got {json.dumps(dry_run)[:100]}")
        bucket = bucket_field(body.get("bucket"))
        with _known_bucket(bucket):  # the listing, its first step, finds out
            report = await run_in_threadpool(reconcile, service, bucket, dry_run)
        return JSONResponse(dataclasses.asdict(report))

    async def page(request: Request) -> Response:
        # The page holds nothing of the index: opened without a token it is served, and uses the one it keeps for
        # its tab, taken out of the address when it was opened with one (a reload of /?text=cat carries none). A
        # token in the address must be the read token, not the admin token: the page carries it in preview addresses,
        # and query strings end up in browser history and proxy logs (review 30).
        if "token" in request.query_params:
            try:
                may_read(request, admin_too=False)
            except HTTPError:  # a browser showed the API's JSON error, and no way on (review 31)
                return HTMLResponse(TOKEN_PAGE, status_code=401, headers=PAGE_HEADERS)
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/search", search, methods=["POST"]),
            Route("/objects/{bucket}/{key:key}", objects),
            Route("/preview/{bucket}/{key:key}", preview),
            Route("/duplicates", duplicates),
            Route("/labels", label_list),
            Route("/stats", stats),
            Route("/queues", queues),
            Route("/metrics", metrics),
            Route("/failures", failures, methods=["GET", "DELETE"]),
            Route("/failures/retry", retry, methods=["POST"]),
            Route("/rebuild", start_rebuild, methods=["POST"]),
            Route("/rebuild/{job_id}", rebuild_state, methods=["GET", "DELETE"]),
            Route("/reconcile", start_reconcile, methods=["POST"]),
            openapi_route(OPENAPI),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(HostGuard, setting=settings.allowed_hosts, bind=settings.api_host)],
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # ``/stats/`` was an empty 307, not the JSON 404 every path gets
    return app


def _params(request: Request, accepted: tuple[str, ...], taker: str) -> Mapping[str, str]:
    """The query parameters, or 400 ``unknown_field`` for one of no meaning to ``taker`` (``token``: the read or
    admin token, for clients that cannot send a header, is taken everywhere), and 400 ``bad_parameter`` for one
    given twice (``?limit=5&limit=6`` took the last; only ``key`` may repeat)."""
    params = request.query_params
    only(params.keys(), (*accepted, "token"), "query parameter", taker)
    for name in set(params.keys()) - {"key"}:
        if len(values := params.getlist(name)) > 1:
            raise HTTPError(400, "bad_parameter", f"{name} is given {len(values)} times: give it once")
    return params


async def _json_object(request: Request, accepted: tuple[str, ...], taker: str) -> dict[str, Any]:
    """The JSON object body (empty: ``{}``), or 400: not JSON, not an object, or a field of no meaning to ``taker``."""
    return json_object(await read_limited(request, JSON_LIMIT), accepted, taker)


def _page(params: Mapping[str, str], default_limit: int) -> tuple[int, int]:
    """A listing's ``offset`` (at least 0) and ``limit`` (at least 1), or 400 (``_count``)."""
    return _count(params, "offset", 0, 0, MAX_OFFSET), _count(params, "limit", default_limit, 1, MAX_LIMIT)


def _count(params: Mapping[str, str], name: str, default: int, least: int, most: int, why: str = "") -> int:
    """The integer query parameter ``name`` (``default`` when absent): 400 when it is not a decimal integer or is
    below ``least`` (``why`` says why that is the floor); above ``most`` it is ``most`` (the answer echoes it, and
    JSON encoders and SQLite refuse integers beyond 64 bits)."""
    if name not in params:
        return default
    number = decimal(params[name], name)
    if number < least:
        raise HTTPError(400, "bad_parameter", f"{name} must be at least {least}{': ' + why if why else ''}; "
                                              f"got {number}")
    return min(most, number)


@contextlib.contextmanager
def _known_bucket(bucket: str | None, job: bool = True) -> Iterator[None]:
    """S3 saying that a bucket does not exist, within the request, as 404 ``unknown_bucket`` (``bucket`` None: the
    service's buckets, one of which S3 names). For a ``job`` (rebuild, reconcile) also S3 refusing, as 502
    ``s3_refused`` with S3's code (credentials that stopped working answered 500, "a bug", every 30 s: review 60),
    and S3 away, as 503 ``s3_unavailable``; and the 404 says what keeps a removed bucket's objects."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        name = error.get("BucketName") or bucket
        if error.get("Code") in ("NoSuchBucket", "404"):  # 404: a HEAD's answer, which has no body to say more
            raise HTTPError(404, "unknown_bucket", f"no bucket {name!r}" + (
                " at S3; if it was removed (its objects with it, no notifications), the index keeps them until it "
                "is created again and reconciled (the local stack's `bucketlens up` creates it)" if job else "")
            ) from exc
        if not job:
            raise
        raise HTTPError(502, "s3_refused", f"S3 refused {error.get('Code')}: {error.get('Message') or exc} (check "
                        "BUCKETLENS_S3_ACCESS_KEY, BUCKETLENS_S3_SECRET_KEY and the bucket's policy)") from exc
    except BotoCoreError as exc:
        if not job:
            raise
        raise HTTPError(503, "s3_unavailable", f"S3 does not answer: {exc}") from exc


async def _say_unknown_bucket(service: Service, bucket: str | None) -> None:
    """404 ``unknown_bucket`` for a filter's ``bucket`` that S3 does not have: a typo answered 0 results, as an empty
    bucket does. Asked of an empty answer only; an S3 that is away, refuses or takes over 3 s leaves it empty."""
    if bucket is None:
        return
    with contextlib.suppress(ClientError, BotoCoreError, asyncio.TimeoutError), _known_bucket(bucket, job=False):
        await asyncio.wait_for(run_in_threadpool(service.s3_probe.head_bucket, Bucket=bucket), BUCKET_CHECK_S)


async def _selection(request: Request, with_body: bool = True) -> Selection:
    """Which failure records a request means (query parameters, JSON body: see ``Selection.parse``)."""
    taker = f"{request.method} {request.url.path}"
    _params(request, (*Selection.PARAMETERS, *(() if with_body else ("offset", "limit"))), taker)
    body = await _json_object(request, Selection.FIELDS, taker) if with_body else {}
    try:
        return Selection.parse(request.query_params, body, request.query_params.getlist("key"))
    except ValueError as exc:
        raise HTTPError(400, "bad_parameter", str(exc)) from exc


def _preview(service: Service, bucket: str, key: str, wanted: str | None) -> tuple[str, bytes]:
    """The indexed version of ``bucket/key`` (``wanted``: only if it has that etag; a page's results name theirs)
    read from S3 with the workers' limits and made a small JPEG; its etag."""
    obj = service.index.get(bucket, key)
    if obj is None:
        raise HTTPError(404, "unknown_object", f"{bucket}/{key} is not in the index")
    changed = HTTPError(404, "object_changed", f"{bucket}/{key} changed or went since it was indexed")
    if wanted is not None and wanted != obj.etag:
        raise changed
    settings = service.settings
    try:
        data = fetch(service.s3, ObjectRef(bucket, key, obj.etag), settings.max_object_bytes,
                     settings.fetch_timeout_s).data
        return obj.etag, preview_jpeg(data, settings.max_pixels)
    except ObjectChanged as exc:
        raise changed from exc
    except TransientError as exc:
        raise HTTPError(503, "s3_unavailable", str(exc)) from exc
    except PermanentError as exc:
        raise refused(exc) from exc


def refused(exc: PermanentError) -> HTTPError:
    """What an object or image that cannot be read answers: 502 where S3 refused the index service's keys, 413 over a
    limit, 415 for what is no image or a broken one."""
    if exc.reason == "access_denied":
        return HTTPError(502, "s3_refused", str(exc))
    return HTTPError(413 if exc.reason in ("too_large", "too_many_pixels") else 415, exc.reason, str(exc))


def _describe_bounded(decoding: threading.BoundedSemaphore, *args: Any) -> tuple[Any, list[local_features.Features]]:
    """``_describe_image`` once one of the ``DECODES`` places is free (the pool's thread waits for it)."""
    with decoding:
        return _describe_image(*args)


def _describe_image(embedder: Embedder, data: bytes, max_pixels: int, verify: bool
                    ) -> tuple[Any, list[local_features.Features]]:
    """A query image's vector and, to verify candidates with, the local features of it and of its mirror."""
    try:
        image = decode_for(embedder.recipe, data, max_pixels, local=verify)
    except PermanentError as exc:
        raise refused(exc) from exc
    vector = embedder.embed(image.pixels[None])[0]
    if image.gray is None:
        return vector, []
    return vector, local_features.views(image.gray, embedder.recipe.local_count)


def _stored_views(index: Index, bucket: str, key: str, verify: bool) -> tuple[list[local_features.Features], str]:
    """The stored object's local features (of its image and of its mirror; none unless ``verify``), and its etag."""
    obj, oid = index.get(bucket, key), object_id(bucket, key)
    if obj is None:
        return [], ""
    return index.features.views([(oid, obj.etag)]).get(oid, []) if verify else [], obj.etag


def _not_indexed(service: Service, bucket: str, key: str) -> str:
    """Why an object cannot be searched by: it failed (its reason said: a search by it only said "not in the
    index"), it is queued, or bucketlens does not know it."""
    said = f"{bucket}/{key} is not in the index"
    try:
        state = _object_state(service, bucket, key)
    except HTTPError:
        return said
    if state["state"] == "failed":
        return f"{said}: it failed ({state['failure']['reason']}: {state['failure']['message']})"
    return f"{said} yet: it is queued for embedding" if state["state"] == "pending" else said


def _older(record: dict[str, Any], order: int) -> bool:
    """Whether a failure record names a version older than ``order`` (an older version's task that failed after the
    newer one was indexed: the record is stale, review 22)."""
    named = str(record.get("order", ""))
    return named.isdigit() and int(named) < order


def _object_state(service: Service, bucket: str, key: str) -> dict[str, Any]:
    oid = object_id(bucket, key)
    # The mark, then the failure record, then the index: a mark is taken away only once its version is indexed, or
    # failed (with the record, in one transaction), so an object settled meanwhile is seen so; read the other way,
    # it was in neither read, a 404 "knows nothing of it" (reviews 66, 69).
    pending_raw, failure_raw = service.redis.hmget(service.keys.pending, [oid]) + service.redis.hmget(
        service.keys.failures, [oid])
    indexed = service.index.get(bucket, key)
    failure, pending = record(failure_raw), record(pending_raw)
    state = {"bucket": bucket, "key": key, "indexed": indexed is not None}
    if failure and (indexed is None or failure["etag"] != indexed.etag and not _older(failure, indexed.order)):
        return {**state, "state": "failed", "etag": failure["etag"], "order": failure.get("order"),
                "generation": failure.get("generation"),
                "failure": {k: failure.get(k) for k in ("reason", "message", "attempts", "time")}}
    if pending and (indexed is None or pending["etag"] != indexed.etag):
        return {**state, "state": "pending", "etag": pending["etag"], "order": pending.get("order"),
                "generation": service.index.generation}
    if indexed is None:
        raise HTTPError(404, "unknown_object", f"bucketlens knows nothing of {oid}")
    return {**state, "state": "indexed", "etag": indexed.etag, "order": str(indexed.order),
            "sequencer": indexed.sequencer, "generation": indexed.generation, "labels": labels.public(indexed.labels),
            "modified": iso(indexed.modified)}
