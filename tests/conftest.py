"""Session fixtures: one real local stack (Redis, Ceph RGW with real notifications, ingest, a Celery worker,
the index service) on free ports in a temporary folder, shared by every integration test and stopped at the end.

Tests isolate themselves by key prefix (``unique_prefix``) rather than by flushing Redis (DESIGN.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from bucketlens.s3 import make_client
from bucketlens.settings import Settings
from infra import milvus
from infra.stack import Stack, free_port, running

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The real local stack. Set BUCKETLENS_TEST_HOME to keep and reuse one between runs (faster locally)."""
    keep = os.environ.get("BUCKETLENS_TEST_HOME")
    home = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bucketlens-test-"))
    # The delivery watchdog runs fast here: tests/test_faults.py stalls the topic and waits for the heal.
    settings = Settings(home=home, namespace="t", bucket="test-images", visibility_timeout_s=60, batch_window_ms=30,
                        ingest_port=0, api_port=0, canary_interval_s=5, canary_timeout_s=20)
    with running(settings, keep=bool(keep)) as stack:
        yield stack


@pytest.fixture(scope="session")
def milvus_uri() -> Iterator[str]:
    """One real Milvus standalone server (PyPI's ``milvus`` 2.3.5) for the whole run: it takes 30-40 s to start.
    Set BUCKETLENS_TEST_MILVUS to the URI of a running one to reuse it (faster locally)."""
    reuse = os.environ.get("BUCKETLENS_TEST_MILVUS")
    if reuse:
        yield reuse
        return
    data = Path(tempfile.mkdtemp(prefix="bucketlens-milvus-"))
    port = free_port()  # the other ports (etcd's, the coordinators') go to the first free one from their defaults
    process = milvus.start(data, port)
    try:
        milvus.wait_ready(data, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        milvus.stop(process)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def s3(stack: Stack) -> Any:
    return make_client(stack.settings)


@pytest.fixture(scope="session")
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=60) as client:
        yield client


@pytest.fixture
def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}/"
