"""The one way every part opens an S3 client (boto3, path-style addressing, bounded retries)."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from .settings import Settings


def make_client(settings: Settings, endpoint: str | None = None, read_timeout: float | None = None) -> Any:
    """An S3 client for ``endpoint`` (default: the internal one); thread-safe, share it."""
    config = Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        connect_timeout=3,
        read_timeout=read_timeout or settings.fetch_timeout_s,
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=max(10, settings.fetch_concurrency * 2),
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint or settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
        config=config,
    )
