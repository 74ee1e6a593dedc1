"""Session fixtures: one real local stack (Redis, Ceph RGW with real notifications, ingest, a Celery worker,
the index service) on free ports in a temporary folder, shared by every integration test and stopped at the end.

Tests isolate themselves by key prefix (``unique_prefix``) rather than by flushing Redis (DESIGN.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from bucketlens.s3 import make_client
from bucketlens.settings import Settings
from infra import milvus
from infra.stack import Stack, free_port, running

log = logging.getLogger(__name__)

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failure pytest cannot format is still reported as that test's failure. (CI, 2026-11-30: a traceback entry
    without a line number made pytest's own formatting raise TypeError, which pluggy re-raised as a warning, an
    error under ``filterwarnings = error``: an INTERNALERROR that ended the whole run at test 278 of 320.)"""
    try:
        return (yield)  # type: ignore[no-any-return]
    except Exception as exc:
        failure = "".join(traceback.format_exception(call.excinfo.value)) if call.excinfo else ""
        return pytest.TestReport(  # type: ignore[return-value]
            item.nodeid, item.location, dict.fromkeys(item.keywords, 1), "failed",
            f"{failure}\n(pytest could not format this failure itself: {exc!r})", call.when or "call", [],
            call.duration, call.start, call.stop)


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


class MilvusServer:
    """The session's Milvus standalone server (PyPI's ``milvus`` 2.3.5); fault tests kill and restart it."""

    def __init__(self, data: Path, port: int) -> None:
        self.data, self.port = data, port
        self.uri = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for attempt in (1, 2):  # once more if it dies while starting (it aborted once in a run of three test files,
            # its embedded etcd's goroutines all the log kept; the next run's start was fine)
            self.process = milvus.start(self.data, self.port)
            try:
                milvus.wait_ready(self.data, self.process)
                return
            except RuntimeError as exc:
                if attempt == 2:
                    raise
                log.warning("Milvus died while starting, starting it again: %s", exc)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            milvus.stop(self.process)


@pytest.fixture(scope="session")
def milvus_server() -> Iterator[MilvusServer | None]:
    """One real Milvus server for the whole run (it takes 30-40 s to start). With BUCKETLENS_TEST_MILVUS set to the
    URI of a running one, that one is used instead (faster locally) and this fixture gives None."""
    if os.environ.get("BUCKETLENS_TEST_MILVUS"):
        yield None
        return
    server = MilvusServer(Path(tempfile.mkdtemp(prefix="bucketlens-milvus-")), free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.data, ignore_errors=True)


@pytest.fixture(scope="session")
def milvus_uri(milvus_server: MilvusServer | None) -> str:
    return milvus_server.uri if milvus_server is not None else os.environ["BUCKETLENS_TEST_MILVUS"]


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
