"""JSON answers, JSON errors and body limits shared by the Starlette apps."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis
from botocore.exceptions import BotoCoreError
from starlette import responses
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class JSONResponse(responses.JSONResponse):
    """Starlette's JSON answer, encoded by orjson: a search's results encode ~5x faster than with ``json``. Never
    sniffed by a browser as anything else (an error's message can quote a request's text)."""

    def __init__(self, content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(content, status_code, {"X-Content-Type-Options": "nosniff", **(headers or {})}, **kwargs)

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_hosts(setting: str, bind: str) -> frozenset[str] | None:
    """The ``Host`` names a server answers (lower case, without port); None: any. ``setting`` lists them
    (comma-separated, ``*``: any), beside the loopback names, which no rebound page can send (a proxy's name alone
    locked out the stack's own probes and the CLI: `up` waited 300 s, review 61); when it is empty, a server bound
    to a loopback address answers only the loopback names: a web page elsewhere whose DNS name is rebound to
    127.0.0.1 would otherwise read it through the user's browser (DNS rebinding), and no other name reaches a
    loopback address legitimately."""
    names = host_names(setting)
    if "*" in names:
        return None
    if names:
        return frozenset(names) | LOOPBACK_NAMES
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return LOOPBACK_NAMES if loopback else None


def host_names(setting: str) -> frozenset[str]:
    """The host names ``BUCKETLENS_ALLOWED_HOSTS`` lists as requests name them: lower case, without a port or an
    IPv6 address's brackets (an entry with a port was taken and never matched: review 86)."""
    return frozenset(host_name(name) for name in setting.split(",") if name.strip())


class HostGuard:
    """ASGI middleware for a server that browsers reach: 400 ``bad_host`` for a request whose ``Host`` is not among
    ``allowed`` (a request without one, which no browser sends, passes), and 403 ``cross_origin`` for one that a
    page of another origin sent (browsers name it in ``Origin``; the CLI and other clients send none). A page
    elsewhere could make the user's browser post searches to a local API without a read token: it cannot read the
    answers, but it spent the service's CPU and memory (review 70)."""

    def __init__(self, app: ASGIApp, setting: str, bind: str) -> None:
        self.app = app
        self.allowed = allowed_hosts(setting, bind)
        self.named = host_names(setting)  # (beside "*" too: a page of a proxy's name is this server's own)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            if self.allowed is not None and host and host_name(host) not in self.allowed:
                names = ", ".join(sorted(self.allowed))
                await error_response(400, "bad_host", f"this server answers requests for {names}, not {host!r} "
                                     "(a guard against DNS rebinding); BUCKETLENS_ALLOWED_HOSTS names the hosts "
                                     "clients use")(scope, receive, send)
                return
            origin = headers.get("origin")
            if origin is not None and not self._same_origin(origin, host):
                await error_response(403, "cross_origin", f"this server answers its own pages, not a page of "
                                     f"{origin[:200]!r} (a guard against cross-site requests); behind a proxy that "
                                     "changes Host, name the address clients use in BUCKETLENS_ALLOWED_HOSTS"
                                     )(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _same_origin(self, origin: str, host: str) -> bool:
        """Whether a page of ``origin`` is this server's own: the address it was asked by (``Host``); else, for a
        name that is not a loopback one (any local server's page has those, on its own port), the name it was asked
        by (a proxy that passes its own name without its port) or one ``BUCKETLENS_ALLOWED_HOSTS`` lists (a proxy
        that sends its upstream's address as ``Host``)."""
        netloc = urlsplit(origin).netloc.lower()  # ("null", a sandboxed page's: none)
        if not netloc or netloc == host.strip().lower():
            return bool(netloc)
        name = host_name(netloc)
        return name not in LOOPBACK_NAMES and (name == host_name(host) or name in self.named)


def host_name(host: str) -> str:
    """A ``Host`` header's name, lower case, without its port or an IPv6 address's brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HTTPError(Exception):
    """Raised by handlers; rendered as ``{"error": {"code", "message"}}`` with its status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def only(names: Iterable[str], accepted: Iterable[str], what: str, taker: str) -> None:
    """400 ``unknown_field`` naming the fields or parameters of no meaning to ``taker`` (a typo would otherwise go
    unnoticed: ``DELETE /failures?reasn=corrupt`` cleared every record)."""
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise HTTPError(400, "unknown_field", f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                                              f"{', '.join(map(repr, unknown))}; {taker} takes {', '.join(accepted)}")


def error_response(status: int, code: str, message: str, **beside: Any) -> JSONResponse:
    """An error answer; ``beside``: fields of the body beside ``error``."""
    return JSONResponse({"error": {"code": code, "message": message}, **beside}, status_code=status)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPError)
    return error_response(exc.status, exc.code, exc.message)


async def disconnect_handler(request: Request, exc: Exception) -> JSONResponse:
    """A client that hung up before its body was whole, or was cut off for sending it too slowly
    (bucketlens/serving.py): said in one line, not as a bug with a traceback; the answer reaches nobody."""
    log.info("%s %s: the client went before its request body was whole (hung up, or cut off as too slow)",
             request.method, request.url.path)
    return error_response(400, "client_disconnected", "the request body was not whole")


async def routing_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 (no such path) and 405 (wrong method) in the same JSON shape as every other error."""
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


def unavailable_response(request: Request, exc: Exception, **beside: Any) -> JSONResponse:
    """Redis, S3 or the index server unreachable while serving a request: 503 (try again), not a 500 with a
    traceback; ``beside``: fields of the body beside ``error``."""
    which, code = (("Redis", "redis") if isinstance(exc, redis.RedisError) else ("S3", "s3")
                   if isinstance(exc, BotoCoreError) else ("the index server", "index"))
    log.debug("%s unreachable during %s %s: %s", which, request.method, request.url.path, exc)
    return error_response(503, f"{code}_unavailable", f"{which} is unreachable; try again shortly", **beside)


async def unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    return unavailable_response(request, exc)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Anything else: a 500 in the same JSON shape (it was text/plain), naming what went wrong; the server logs the
    traceback (Starlette raises the exception on after this answer)."""
    return error_response(500, "internal_error", f"{type(exc).__name__} while serving {request.method} "
                          f"{request.url.path}: a bug; the service's log has the traceback")


# Exceptions of the services' dependencies that a Starlette app answers with 503 (``unavailable_handler``). The
# builtin ConnectionError: an index backend's server unreachable (index_service/milvus_index.py, IndexUnavailable).
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, BotoCoreError, ConnectionError)

# Every Starlette app's exception handlers: errors are always ``{"error": {"code", "message"}}``.
EXCEPTION_HANDLERS = {HTTPError: http_error_handler, StarletteHTTPException: routing_error_handler,
                      ClientDisconnect: disconnect_handler,
                      **{e: unavailable_handler for e in UNAVAILABLE}, Exception: internal_error_handler}


def json_object(body: bytes, accepted: Iterable[str], taker: str) -> dict[str, Any]:
    """A request's JSON object body (empty: ``{}``), or 400: ``bad_json`` (not UTF-8, not JSON, nested too deeply,
    not an object, a lone surrogate, or a member named twice: it was read last-wins, where a query parameter or form
    field given twice is 400), ``unknown_field`` (a member of no meaning to ``taker``, ``only``). orjson parses a
    vector of 1,280 numbers ~3x faster than ``json``; what it refuses (NaN, numbers beyond a double) goes to
    ``json``, so that the caller answers such a value (``bad_vector``, not ``bad_json``)."""
    if not body.strip():
        return {}
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = _slow_json(body)
    if not isinstance(payload, dict):
        raise HTTPError(400, "bad_json", "body must be a JSON object")
    only(payload, accepted, "field", taker)  # (first: the check below scans the body once per name)
    # A member named twice shows as its name written twice (or a \u escape, which may spell a name): only then is
    # the body parsed again with every member seen (no second parse of a search's vector).
    if b"\\u" in body or any(body.count(b'"%s"' % name.encode()) > 1 for name in payload):
        try:
            json.loads(body, object_pairs_hook=_once)
        except RecursionError:  # (orjson takes 1,024 levels, ``json`` fewer: a 500)
            raise HTTPError(400, "bad_json", "body is not JSON: nested too deeply") from None
    return payload


def _slow_json(body: bytes) -> Any:
    """What orjson refused, parsed by ``json``."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply to parse
        raise HTTPError(400, "bad_json", f"body is not JSON: {exc}") from exc
    try:  # orjson refuses a lone surrogate ("\ud83d"), ``json`` takes it: a 500 where the string was used. (Checked
        # only here: encoding a search's vector again cost 0.33 ms of its ~2 ms.)
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise HTTPError(400, "bad_json", "body holds a string that is not valid UTF-8 (a lone surrogate)") from None
    return payload


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if twice := sorted(name for name, times in Counter(name for name, _ in pairs).items() if times > 1):
        raise HTTPError(400, "bad_json", f"{', '.join(map(repr, twice))} given twice in one JSON object: give "
                                         f"{'each' if len(twice) > 1 else 'it'} once")
    return dict(pairs)


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without reading them all."""
    return await bounded(request, limit, lambda: HTTPError(413, "too_large", f"body exceeds {limit} bytes")).body()


def bounded(request: Request, limit: int, refusal: Callable[[], HTTPError]) -> Request:
    """``request`` whose body is refused (``refusal()``) past ``limit`` bytes: at once where its Content-Length says
    more, otherwise as it arrives, the rest unread (a chunked multipart upload was spooled to disk whole before its
    size was judged: 200 MB of disk for one request, in a security check)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise refusal()
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise refusal()
        return message

    return Request(request.scope, receive)
