"""Both HTTP APIs against their own OpenAPI documents, fuzzed live on the test stack with schemathesis (hypothesis
underneath): a bounded number of generated requests per operation; every answer must be no 500, a documented
status, the documented content type and body (errors: ``{"error": {"code", "message"}}``), in time. The counts of
cases are printed (``-s``) and saved in ``tests/artifacts/openapi-fuzz.json``.

Admin endpoints are fuzzed without the admin token (401): with it, generated requests would start rebuilds and
clear failure records of the shared stack. The receiver is fuzzed with its webhook token, so bodies get parsed.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterator

import httpx
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

from index_service.openapi import OPENAPI as INDEX_DOCUMENT
from infra.stack import Stack
from ingest.openapi import OPENAPI as INGEST_DOCUMENT

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
