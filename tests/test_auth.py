"""Locked write paths on the real stack: the webhook token on ``POST /events``, the admin token on every endpoint
that changes state, 401 for a missing or wrong token, and no token ever in a log file or a public response."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from bucketlens.http import LOOPBACK_NAMES, allowed_hosts
from infra.stack import Stack

pytestmark = pytest.mark.slow

NO_OP_EVENT = json.dumps({"Records": []}).encode()

# Each admin request is one that, once past the token check, answers 4xx or changes nothing.
ADMIN_REQUESTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/rebuild", {"json": {"mode": "sideways"}}, 400),
    ("DELETE", "/rebuild/no-such-job", {}, 404),
    ("DELETE", "/rebuild/no-such-job?x=1", {}, 400),  # the token is checked before the parameters
    ("POST", "/reconcile", {"json": {"bucket": 5}}, 400),
    ("POST", "/failures/retry", {"json": {"bucket": "test-images", "keys": ["never/failed.jpg"]}}, 202),
    ("DELETE", "/failures", {"json": {"bucket": "test-images", "keys": ["never/failed.jpg"]}}, 200),
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_events_need_the_webhook_token(stack: Stack) -> None:
    url = f"{stack.ingest_url}/events"
    token = stack.settings.webhook_token
    refused = [
        httpx.post(url, content=NO_OP_EVENT),
        httpx.post(url, content=NO_OP_EVENT, headers=bearer("wrong")),
        httpx.post(url, content=NO_OP_EVENT, headers=bearer(token[:-1])),
        httpx.post(url, content=NO_OP_EVENT, params={"token": "wrong"}),
        httpx.post(url, content=NO_OP_EVENT, headers={"X-Token": token}),
        httpx.post(url, content=NO_OP_EVENT, headers=bearer(stack.settings.admin_token)),  # the other token
        httpx.post(url, content=NO_OP_EVENT, headers={"Authorization": f"Basic {token}"}),
    ]
    for response in refused:
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized", response.text
    assert httpx.post(url, content=NO_OP_EVENT, headers=bearer(token)).status_code == 200
    assert httpx.post(url, content=NO_OP_EVENT, params={"token": token}).status_code == 200  # Ceph's way


@pytest.mark.parametrize("method,path,kwargs,status", ADMIN_REQUESTS, ids=[f"{m} {p}" for m, p, _, _ in ADMIN_REQUESTS])
def test_admin_endpoints_need_the_admin_token(
    stack: Stack, api: httpx.Client, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    admin = stack.settings.admin_token
    for headers in ({}, bearer("wrong"), bearer(stack.settings.webhook_token), bearer(admin + "x"), bearer(admin[:8])):
        response = api.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized", response.text
    assert api.request(method, path, params={"token": "wrong"}, **kwargs).status_code == 401
    allowed = api.request(method, path, headers=bearer(admin), **kwargs)
    assert allowed.status_code == status, allowed.text


def assert_no_token_in_logs(stack: Stack) -> None:
    # (radosgw's own log too: it pushes to ingest's address, which carries the webhook token: review 70)
    logs = sorted(p for folder in ("logs", "ceph/log") for p in (stack.home / folder).rglob("*") if p.is_file())
    assert logs and any(p.parent.name == "log" for p in logs)
    for name, token in (("webhook", stack.settings.webhook_token), ("admin", stack.settings.admin_token)):
        assert len(token) >= 16
        for path in logs:
            assert token.encode() not in path.read_bytes(), f"the {name} token is in {path}"


@pytest.fixture(scope="session")
def logs_checked_again_at_the_end(stack: Stack) -> Iterator[None]:
    """Checks the logs once more after the whole session's traffic (fault tests included): a failure shows up as an
    error in the teardown of the session's last test."""
    yield
    assert_no_token_in_logs(stack)


def test_no_token_in_logs_or_public_responses(stack: Stack, api: httpx.Client, logs_checked_again_at_the_end: None
                                             ) -> None:
    tokens = {"webhook": stack.settings.webhook_token, "admin": stack.settings.admin_token}
    # Traffic that carries the tokens the ways clients send them: headers, query strings, wrong guesses.
    httpx.post(f"{stack.ingest_url}/events", content=NO_OP_EVENT, params={"token": tokens["webhook"]})
    httpx.post(f"{stack.ingest_url}/events", content=b"{broken", params={"token": tokens["webhook"]})
    httpx.post(f"{stack.ingest_url}/events", content=NO_OP_EVENT, params={"token": tokens["admin"]})
    api.post("/reconcile", json={"bucket": 5}, params={"token": tokens["admin"]})
    api.post("/rebuild", json={"mode": "sideways"}, headers=bearer(tokens["admin"]))
    api.post("/rebuild", json={"mode": "sideways"}, headers=bearer(tokens["webhook"]))

    public = {path: api.get(path).text for path in ("/stats", "/queues", "/metrics", "/healthz", "/readyz", "/")}
    for name, token in tokens.items():
        for path, body in public.items():
            assert token not in body, f"the {name} token is in GET {path}"
    assert_no_token_in_logs(stack)


def test_a_loopback_api_answers_only_loopback_host_names(stack: Stack, api: httpx.Client) -> None:
    """DNS rebinding: a web page on evil.example whose name is rebound to 127.0.0.1 makes the user's browser ask
    the local API with ``Host: evil.example``; an API bound to loopback without a read token answered it (a
    security check). Loopback names are answered, any other is 400 ``bad_host`` naming the setting."""
    port = stack.settings.api_port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert api.get("/stats", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "[::2]"):
        refused = api.post("/search", json={"key": "any.jpg"}, headers={"Host": host})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_host", (host, refused.text)
        assert "BUCKETLENS_ALLOWED_HOSTS" in refused.json()["error"]["message"]


@pytest.mark.parametrize(("setting", "bind", "allowed"), [
    ("", "127.0.0.1", LOOPBACK_NAMES), ("", "::1", LOOPBACK_NAMES), ("", "localhost", LOOPBACK_NAMES),
    ("", "0.0.0.0", None), ("", "10.0.0.5", None),  # reached from elsewhere: names are the operator's to say
    ("*", "127.0.0.1", None), ("Images.Example.com, [::1]", "0.0.0.0", {"images.example.com", *LOOPBACK_NAMES}),
    # A proxy's name beside the loopback names, never in their place: the stack's own probes and the CLI ask for
    # 127.0.0.1 (review 61: `up` waited 300 s, and every command was 400 bad_host).
    ("photos.example", "127.0.0.1", {"photos.example", *LOOPBACK_NAMES}),
    # An entry with a port was taken and never matched (review 86): a Host's port is not compared
    ("proxy.example:8080, [::2]:443", "0.0.0.0", {"proxy.example", "::2", *LOOPBACK_NAMES}),
])
def test_the_hosts_answered_follow_the_setting_and_the_bind_address(setting: str, bind: str,
                                                                    allowed: frozenset[str] | None) -> None:
    assert allowed_hosts(setting, bind) == allowed


def test_with_a_read_token_every_read_route_needs_it() -> None:
    """The read token guards every route that shows the index's contents, the image previews included (checked
    before the route touches the service: no Redis or S3 is needed to see the refusal)."""
    from starlette.testclient import TestClient

    from bucketlens.settings import Settings
    from index_service.app import create_app

    client = TestClient(create_app(Settings(read_token="rt", admin_token="at")),  # (no lifespan: no service)
                        base_url="http://127.0.0.1")
    for method, path in (("GET", "/"), ("POST", "/search"), ("GET", "/objects/b/k.jpg"), ("GET", "/preview/b/k.jpg"),
                         ("GET", "/duplicates"), ("GET", "/labels"), ("GET", "/failures")):
        for params in ({}, {"token": "wrong"}, {"token": "r"}, {"token": "atx"}):
            if path == "/" and not params:  # the page itself holds nothing of the index (below)
                continue
            refused = client.request(method, path, params=params)
            assert refused.status_code == 401, (method, path, refused.text)
    assert client.get("/", params={"token": "rt"}).status_code == 200
    # Opened without a token, the page is served: it takes the read token out of the address it was opened with and
    # keeps it for its tab, so that a reload of /?text=cat, which carries none, still opens (review 52's leftover:
    # shared links and the history carried the token). Its calls to the API need the token, as before.
    assert client.get("/", params={"text": "cat"}).status_code == 200
    # The admin token reads too (review 28: an operator holding it was refused a search), but opens no web page,
    # which puts its token into preview addresses (review 30).
    assert client.get("/", params={"token": "at"}).status_code == 401
    # A browser is told how to open the page, not shown the API's JSON (review 31); the token is never echoed.
    refused = client.get("/", params={"token": "r<b>"})
    assert refused.headers["content-type"].startswith("text/html") and "/?token=READ_TOKEN" in refused.text
    assert "is not the read token" in refused.text and "r<b>" not in refused.text
    served = TestClient(client.app, base_url="http://127.0.0.1", raise_server_exceptions=False)  # past the check:
    assert served.get("/labels", headers={"Authorization": "Bearer at"}).status_code == 500  # no service here
    assert TestClient(create_app(Settings(read_token="rt")), base_url="http://127.0.0.1").get(
        "/", params={"token": ""}).status_code == 401  # no admin token set: an empty one opens nothing


def test_a_page_of_another_origin_is_refused_and_the_pages_own_is_served() -> None:
    """A page elsewhere could make the user's browser post searches to a local API without a read token (it cannot
    read the answers, but they cost the service; review 70). Browsers name a page's origin; other clients send
    none."""
    from starlette.testclient import TestClient

    from bucketlens.settings import Settings
    from index_service.app import create_app

    client = TestClient(create_app(Settings()), base_url="http://127.0.0.1:8000", raise_server_exceptions=False)
    for origin in ("https://evil.example", "http://localhost:3000", "http://127.0.0.1:9999", "null"):
        refused = client.post("/search", json={"key": "a.jpg"}, headers={"Origin": origin})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_origin", (origin, refused.text)
        assert "BUCKETLENS_ALLOWED_HOSTS" in refused.json()["error"]["message"]
        assert refused.headers["x-content-type-options"] == "nosniff"
    for headers in ({"Origin": "http://127.0.0.1:8000"}, {}):  # past the guard: no service here
        assert client.post("/search", json={"key": "a.jpg"}, headers=headers).status_code == 500, headers
    # Behind a proxy that sends its own Host, the address clients use is the one BUCKETLENS_ALLOWED_HOSTS names.
    proxied = TestClient(create_app(Settings(allowed_hosts="images.example.com")), base_url="http://127.0.0.1:8000",
                         raise_server_exceptions=False)
    assert proxied.post("/search", json={"key": "a.jpg"},
                        headers={"Origin": "https://images.example.com"}).status_code == 500
    assert proxied.post("/search", json={"key": "a.jpg"},
                        headers={"Origin": "https://other.example.com"}).status_code == 403
    # A proxy that passes its own name without its port (nginx's $host), and "*" beside a name (review 72); a
    # loopback name on another port is another local server's page, whatever the Host.
    for setting, host, origin, status in (
            ("", "images.example.com", "https://images.example.com:8443", 500),
            ("*, images.example.com", "127.0.0.1:8000", "https://images.example.com", 500),
            ("*", "127.0.0.1:8000", "https://images.example.com", 403),
            ("", "localhost:8000", "http://localhost:3000", 403)):
        guarded = TestClient(create_app(Settings(allowed_hosts=setting, api_host="0.0.0.0")),
                             base_url=f"http://{host}", raise_server_exceptions=False)
        answer = guarded.post("/search", json={"key": "a.jpg"}, headers={"Origin": origin})
        assert answer.status_code == status, (setting, host, origin, answer.text)
    policy = client.get("/").headers["content-security-policy"]  # the page runs its own script and nothing else
    assert "script-src 'sha256-" in policy and "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_a_failed_rebuilds_object_is_shown_to_readers_only() -> None:
    """``GET /rebuild/{id}`` and ``/stats`` are open; a rebuild failed by one object's passing failures named its
    key and its failure's message there (review 70). The key is in ``error_detail``, shown with a token only."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from bucketlens.settings import Settings
    from index_service.app import create_app

    job = {"id": "j1", "state": "failed", "error": "an object failed 3 times ...", "error_detail": "photos/x.jpg: no"}
    app = create_app(Settings(read_token="rt", admin_token="at"))
    app.state.service = SimpleNamespace(rebuilds=SimpleNamespace(get=lambda job_id: dict(job)),
                                        stats=lambda: {"model": "m", "rebuild": dict(job)})
    client = TestClient(app, base_url="http://127.0.0.1")
    for token, detail in ((None, None), ("wrong", None), ("rt", "photos/x.jpg: no"), ("at", "photos/x.jpg: no")):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for answer in (client.get("/rebuild/j1", headers=headers).json(),
                       client.get("/stats", headers=headers).json()["rebuild"]):
            assert answer["error"] == job["error"] and answer["error_detail"] == detail, (token, answer)
