"""Token checks shared by the ingest receiver and the index service: constant-time, never logged."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the CLI imports ``bearer`` without a server's packages)
    from starlette.requests import Request


def bearer(token: str) -> dict[str, str]:
    """The headers that present ``token`` as ``presented_token`` reads it (none for an empty one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def presented_token(request: Request) -> str:
    """The bearer token of a request, or its ``token`` query parameter (Ceph topics cannot add headers)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query_params.get("token", "")


def token_ok(request: Request, expected: str) -> bool:
    """True when no token is configured or the request presents it."""
    if not expected:
        return True
    return hmac.compare_digest(presented_token(request).encode(), expected.encode())
