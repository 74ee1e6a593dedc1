"""Session fixtures: one real local stack (Redis, Ceph RGW with real notifications, ingest, a Celery worker,
the index service) on free ports in a temporary folder, shared by every integration test and stopped at the end.

Tests isolate themselves by key prefix (``unique_prefix``) rather than by flushing Redis (DESIGN.md).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from bucketlens.s3 import make_client
from bucketlens.settings import Settings
from infra.stack import Stack, running

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The real local stack. Set BUCKETLENS_TEST_HOME to keep and reuse one between runs (faster locally)."""
    keep = os.environ.get("BUCKETLENS_TEST_HOME")
    home = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bucketlens-test-"))
    # The delivery watchdog runs fast here: tests/test_faults.py stalls the topic and waits for the heal. Worker
    # deaths are healed with the default timings (visibility timeout included): that is what the fault tests prove.
    settings = Settings(home=home, namespace="t", bucket="test-images", batch_window_ms=30,
                        ingest_port=0, api_port=0, canary_interval_s=5, canary_timeout_s=20)
    with running(settings, keep=bool(keep)) as stack:
        yield stack


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
