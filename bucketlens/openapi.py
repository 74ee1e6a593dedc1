"""OpenAPI 3.1 documents: the pieces both services' documents are made of, so that each service keeps its own
document in one module (``index_service/openapi.py``, ``ingest/openapi.py``) and serves it at ``GET /openapi.json``.

Every error answer of every endpoint has the same body, ``{"error": {"code", "message"}}`` (``bucketlens/http.py``);
``errors(...)`` documents it under each status an endpoint can answer with.
"""

from __future__ import annotations

import copy
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from .http import JSONResponse

Schema = dict[str, Any]

ERROR: Schema = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["code", "message"], "additionalProperties": False,
        "properties": {"code": {"type": "string", "description": "stable, machine-readable"},
                       "message": {"type": "string", "description": "for people"}},
    }},
}

STATUS_TEXT = {
    400: "bad input", 401: "missing or wrong token", 403: "refused: no admin token is configured",
    404: "unknown", 409: "conflict", 413: "too large", 415: "unsupported media type or not an image",
    502: "the S3 server refused the service's request", 503: "not ready, or Redis or S3 unreachable: try again",
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def answer(description: str, schema: Schema, status: int = 200) -> dict[str, Any]:
    """One successful JSON answer, keyed by status (merge with ``errors``)."""
    return {str(status): {"description": description, "content": json_content(schema)}}


def errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": STATUS_TEXT[s], "content": json_content(ref("Error"))} for s in statuses}


def parameter(name: str, schema: Schema, description: str, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema, "description": description}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), closed: bool = False) -> Schema:
    """A JSON object schema; ``closed``: no other properties (request bodies that refuse unknown fields)."""
    schema: Schema = {"type": "object", "properties": properties, "required": list(required)}
    if closed:
        schema["additionalProperties"] = False
    return schema


# What every endpoint of a server behind ``HostGuard`` may answer (bucketlens/http.py), and every one taking a body
# (bucketlens/serving.py): the probes listed none of them, and no endpoint 403 ``cross_origin`` or 408 (review 87)
GUARDED = {400: "bad_host: a Host header not allowed (BUCKETLENS_ALLOWED_HOSTS)",
           403: "cross_origin: a browser request from another site"}
WITH_A_BODY = {408: "body_too_slow: the request body arrived too slowly"}


def document(title: str, description: str, paths: dict[str, Any], schemas: dict[str, Schema],
             security: dict[str, Any], guarded: bool) -> dict[str, Any]:
    """The document, each operation's answers completed with ``GUARDED``'s (``guarded``: the server runs
    ``HostGuard``) and ``WITH_A_BODY``'s where it takes a body; where it documents the status already, its
    description names the code too (on a copy: ``paths`` stays as given)."""
    paths = copy.deepcopy(paths)
    for operations in paths.values():
        for operation in operations.values():
            answers = operation["responses"]
            for status, said in {**(GUARDED if guarded else {}),
                                 **(WITH_A_BODY if "requestBody" in operation else {})}.items():
                if str(status) in answers:
                    answers[str(status)] = {**answers[str(status)],
                                            "description": f"{answers[str(status)]['description']}; {said}"}
                else:
                    answers[str(status)] = {"description": said, "content": json_content(ref("Error"))}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1", "description": description},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR, **schemas}, "securitySchemes": security},
    }


def bearer(description: str) -> dict[str, Any]:
    return {"type": "http", "scheme": "bearer", "description": description}


def route(doc: dict[str, Any]) -> Route:
    """``GET /openapi.json``, answering ``doc`` (built once)."""

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(doc)

    return Route("/openapi.json", openapi)
