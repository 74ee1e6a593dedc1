"""The one way every part opens an S3 client (boto3, path-style addressing, bounded retries), and finds the
credentials it signs with: the settings' keys, or, when they are empty, boto3's own chain (``AWS_*`` variables,
``~/.aws``, an instance or task role, with its session token, renewed before it expires)."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from .settings import S3_ATTEMPTS, S3_CONNECT_TIMEOUT_S, Settings

READ_TIMEOUT_S = 60.0  # a request's wait for S3's answer; the workers' downloads have FETCH_TIMEOUT_S


def make_client(settings: Settings, read_timeout: float = READ_TIMEOUT_S, attempts: int = S3_ATTEMPTS) -> Any:
    """An S3 client for ``settings.s3_endpoint``; thread-safe, share it. (``FETCH_TIMEOUT_S`` was
    every client's read timeout: a small one broke ``up``, ``upload`` and the services with tracebacks.)"""
    config = Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=read_timeout,
        # (total: botocore's "max_attempts" counts the retries, and a stalled download was read 3 times where
        # every timing planned 2: review 86)
        retries={"total_max_attempts": attempts, "mode": "standard"},
        max_pool_connections=max(10, settings.fetch_concurrency * 2),
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key or None,
        aws_secret_access_key=settings.s3_secret_key or None,
        region_name=settings.s3_region,
        config=config,
    )


def error_code(exc: ClientError) -> str:
    """S3's error code in the answer that raised ``exc`` (``NoSuchKey``, ``AccessDenied``; a HEAD's answer has no
    body, and botocore names it by its status: ``404``), or ""."""
    return str(exc.response.get("Error", {}).get("Code") or "")


def http_status(exc: ClientError) -> int | None:
    """The HTTP status of the answer that raised ``exc``; None when none was said."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def answered(exc: ClientError) -> bool:
    """Whether S3 answered the request that raised ``exc`` (a status below 500: refused, not found), rather than
    being away (a 5xx, or no status said)."""
    return (http_status(exc) or 500) < 500


def credentials(settings: Settings) -> Credentials:
    """What requests are signed with (``Presigner`` signs URLs itself); raises ``ValueError`` when the keys are
    empty and boto3's chain finds none."""
    if settings.s3_access_key or settings.s3_secret_key:
        return Credentials(settings.s3_access_key, settings.s3_secret_key)
    found = boto3.Session().get_credentials()
    if found is None:
        raise ValueError("BUCKETLENS_S3_ACCESS_KEY is empty and boto3 finds no credentials (AWS_ACCESS_KEY_ID, "
                         "~/.aws/credentials, an instance role)")
    return found
