"""Both HTTP APIs against their own OpenAPI documents, fuzzed live on the test stack with schemathesis (hypothesis
underneath): a bounded number of generated requests per operation; every answer must be no 500, a documented
status, the documented content type and body (errors: ``{"error": {"code", "message"}}``), in time. The counts of
cases are printed (``-s``) and saved in ``tests/artifacts/openapi-fuzz.json``.

Admin endpoints are fuzzed without the admin token (401): with it, generated requests would start rebuilds and
clear failure records of the shared stack. The receiver is fuzzed with its webhook token, so bodies get parsed.

The fuzz accepts fields a schema does not declare (JSON Schema's objects are open), so a field the server answers
but the document forgets would pass it: real answers of every index service endpoint, with data behind them (an
indexed photo, a failed object, a text query, a finished rebuild), are also checked against the document with every
object schema closed (``closed``), as are the server's own builders of those answers where no stack is needed.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from index_service.filters import Filter
from index_service.openapi import OPENAPI as INDEX_DOCUMENT
from index_service.rebuild import RebuildJob
from index_service.rebuild import public as rebuild_public
from index_service.reconcile import ReconcileReport
from index_service.snapshots import SnapshotHealth
from index_service.text import TextAnswer
from infra.stack import Stack
from ingest.openapi import OPENAPI as INGEST_DOCUMENT
from vision import words

from .helpers import photo, wait_for
from .integrity import record_outcome

CASES = 300  # generated requests per operation (and media type); the whole fuzz stays under two minutes
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ = settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, collections.Counter[str]] = {"index service": collections.Counter(), "ingest": collections.Counter()}


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    started = time.monotonic()
    yield
    outcome = {service: {"cases": sum(counts.values()), "by_status": dict(sorted(counts.items()))}
               for service, counts in COUNTS.items()}
    record_outcome("openapi_fuzz", {**outcome, "cases_per_operation": CASES,
                                    "seconds": round(time.monotonic() - started, 1)}, file="openapi-fuzz.json")


@pytest.fixture(scope="module")
def index_schema(stack: Stack) -> Any:
    return schemathesis.openapi.from_url(stack.api_url + "/openapi.json")


@pytest.fixture(scope="module")
def ingest_schema(stack: Stack) -> Any:
    return schemathesis.openapi.from_url(stack.ingest_url + "/openapi.json")


def test_the_documents_served_are_the_documents_in_the_code(stack: Stack) -> None:
    assert httpx.get(stack.api_url + "/openapi.json").json() == INDEX_DOCUMENT
    assert httpx.get(stack.ingest_url + "/openapi.json").json() == INGEST_DOCUMENT
    served = {(path, method) for path, methods in INDEX_DOCUMENT["paths"].items() for method in methods}
    routes = {(route.path.replace("{key:key}", "{key}"), method.lower())
              for route in _index_routes() for method in (route.methods or ()) if method != "HEAD"}
    assert routes - {("/", "get"), ("/openapi.json", "get")} == served  # every route documented, nothing more


def _index_routes() -> list[Any]:
    from bucketlens.settings import Settings
    from index_service.app import create_app

    return list(create_app(Settings()).routes)


def fuzz(schema: Any, service: str, headers: dict[str, str] | None = None) -> None:
    """``CASES`` generated requests per operation, valid and invalid ones mixed, each answer checked."""
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))

        @FUZZ
        @given(case=cases)
        def check(case: Any) -> None:
            response = case.call(headers=headers, timeout=60)
            COUNTS[service][str(response.status_code)] += 1
            case.validate_response(response, checks=CHECKS)

        check()


def test_index_service_answers_as_documented(index_schema: Any) -> None:
    fuzz(index_schema, "index service")


def test_receiver_answers_as_documented(ingest_schema: Any, stack: Stack) -> None:
    fuzz(ingest_schema, "ingest", {"Authorization": f"Bearer {stack.settings.webhook_token}"})


# -- every field the server answers is documented -------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """``schema`` with every object schema that lists its properties closed to others (``additionalProperties:
    false``, unless it says what others may be): a field the document lacks fails validation."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    shut = {name: closed(value) for name, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        shut["properties"] = {name: closed(value) for name, value in schema["properties"].items()}
        shut["additionalProperties"] = False
    return shut


CLOSED_COMPONENTS = {"components": closed(INDEX_DOCUMENT["components"])}


def conforms(value: Any, schema: dict[str, Any]) -> None:
    """``value`` is valid against ``schema`` (of the index service's document, ``$ref``s into its components) with
    every object schema closed; the assertion lists every difference."""
    validator = jsonschema_rs.validator_for({**closed(schema), **CLOSED_COMPONENTS})
    problems = [f"at /{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(value)]
    assert not problems, "\n".join(problems)


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_the_servers_answer_builders_match_their_schemas() -> None:
    """What the server builds its answers from, without a stack: a rebuild job (running and finished), a reconcile's
    report, a filter, a text query's account of its words, the snapshot health in /stats."""
    running = RebuildJob(id="j1", mode="reembed", generation=2, model="m", index_type="Flat", bucket="b",
                         chosen="auto", total=4, done=1)
    finished = RebuildJob(id="j2", mode="reindex", generation=1, model="m", index_type="IVF", state="done",
                          finished=time.time(), listed=True)
    for job in (running, finished):
        conforms(rebuild_public(job), component("RebuildJob"))
    assert set(INDEX_DOCUMENT["components"]["schemas"]["RebuildJob"]["required"]) == set(rebuild_public(running))
    conforms(dataclasses.asdict(ReconcileReport(listed=3, seconds=0.5)), component("Reconcile"))
    conforms(Filter().public(), component("Filter"))
    conforms(Filter("b", "p/", 1.7e9, 1.8e9).public(), component("Filter"))
    query = words.TextQuery((words.Term("dogs", "dog", (207, 208)),), ("café",), ("a", "🐱"))
    conforms({"model": "m", "took_ms": 1.5, **TextAnswer([], query).public(), "filter": None, "results": []},
             component("SearchResults"))
    stats = INDEX_DOCUMENT["components"]["schemas"]["Stats"]["properties"]["snapshot_failures"]
    conforms(SnapshotHealth(60, 300).public(), stats)


def test_search_bodies_the_readme_shows_are_valid_and_two_queries_are_not() -> None:
    """README: JSON null is the default, for a query member too; the document refused {"text": "dog", "key": null},
    which the service takes (review 87)."""
    for body in ({"text": "dog", "key": None}, {"key": "a.jpg", "vector": None, "k": None}, {"vector": [0.5]}):
        conforms(body, component("SearchJSON"))
    for body in ({"text": "dog", "key": "a.jpg"}, {"text": None}, {}):
        with pytest.raises(AssertionError):
            conforms(body, component("SearchJSON"))


def documented(response: httpx.Response, path: str, method: str) -> Any:
    """The answer conforms to what the document says ``path`` answers to ``method`` with its status (closed); its
    JSON."""
    answers = INDEX_DOCUMENT["paths"][path][method]["responses"]
    assert str(response.status_code) in answers, f"{method.upper()} {path}: {response.status_code} undocumented"
    body = response.json()
    conforms(body, answers[str(response.status_code)]["content"]["application/json"]["schema"])
    return body


def test_real_answers_have_only_documented_fields(stack: Stack, s3: Any, api: httpx.Client) -> None:
    """Every index service endpoint answers with data behind it, each answer checked against the closed schema:
    an indexed photo, a failed object (its record), a text query, a finished rebuild, a reconcile."""
    bucket, prefix = stack.settings.bucket, f"openapi-{uuid.uuid4().hex[:8]}/"
    good, bad = f"{prefix}coffee.jpg", f"{prefix}notes.jpg"
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    objects = "/objects/{bucket}/{key}"
    s3.put_object(Bucket=bucket, Key=good, Body=photo("coffee.png"))
    s3.put_object(Bucket=bucket, Key=bad, Body=b"not an image at all")

    def state(key: str, wanted: str) -> Any:
        response = api.get(f"/objects/{bucket}/{quote(key, safe='/')}")
        if response.status_code == 404:
            return None
        found = documented(response, objects, "get")  # pending too, when caught on the way
        return found if found["state"] == wanted else None

    indexed = wait_for(lambda: state(good, "indexed"), 120, what="the photo indexed")
    assert {"sequencer", "labels", "modified"} <= set(indexed)
    failed = wait_for(lambda: state(bad, "failed"), 120, what="the bad object's failure record")
    assert "failure" in failed

    for path in ("/healthz", "/readyz", "/stats", "/queues", "/labels", "/duplicates"):
        documented(api.get(path), path, "get")
    documented(api.get("/labels", params={"q": "cup", "limit": 3}), "/labels", "get")
    listing = documented(api.get("/failures", params={"bucket": bucket, "key": [bad]}), "/failures", "get")
    assert [r["key"] for r in listing["failures"]] == [bad]

    image = api.post("/search", files={"image": ("q.jpg", photo("coffee.png"), "image/jpeg")},
                     data={"prefix": prefix, "modified_after": "2000-01-01"})
    by_key = api.post("/search", json={"key": good, "k": 3})
    text = api.post("/search", json={"text": "a cup of espresso", "prefix": prefix})
    for response in (image, by_key, text):
        documented(response, "/search", "post")
    assert image.json()["results"] and image.json()["filter"]["prefix"] == prefix
    if text.status_code == 200:  # (503 no_vocabulary where WordNet is not installed)
        assert {"matched", "unmatched", "ignored"} <= set(text.json())

    documented(api.post("/reconcile", json={"bucket": bucket}, headers=admin), "/reconcile", "post")
    started = api.post("/rebuild", json={"mode": "reindex"}, headers=admin)
    job = documented(started, "/rebuild", "post")
    url, rebuild = f"/rebuild/{job['id']}", "/rebuild/{job_id}"
    done = wait_for(lambda: (j := documented(api.get(url), rebuild, "get"))["state"] != "running" and j, 120,
                    what="the reindex")
    assert done["state"] == "done", done
    cancel = api.delete(url, headers=admin)
    assert cancel.status_code == 409
    documented(cancel, rebuild, "delete")
    documented(api.get("/rebuild/nope"), rebuild, "get")
    assert documented(api.get("/stats"), "/stats", "get")["rebuild"]["id"] == job["id"]

    selection = {"bucket": bucket, "key": [bad]}
    retried = documented(api.post("/failures/retry", params=selection, headers=admin), "/failures/retry", "post")
    assert retried["retried"] == 1
    wait_for(lambda: state(bad, "failed"), 120, what="the retried object's failure record")
    cleared = documented(api.delete("/failures", params=selection, headers=admin), "/failures", "delete")
    assert cleared["cleared"] == 1
    for key in (good, bad):
        s3.delete_object(Bucket=bucket, Key=key)
