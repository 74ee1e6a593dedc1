"""A step failing while a server is away is said once when it starts failing and once when it works again
(the supervisor, the duplicate finder and ingest's Redis outages all use ``Outage``)."""

from __future__ import annotations

import logging

import pytest

from bucketlens.outage import Outage


def test_a_run_of_failures_is_said_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(logging.getLogger("t"), "Redis has room again (%d of %d bytes)")
    caplog.set_level(logging.INFO, "t")
    outage.worked(1, 2)  # nothing failed: nothing to say
    for used in (10, 11, 12):
        try:
            raise ConnectionError(f"away {used}")
        except ConnectionError:
            outage.failed("holds %d bytes", used)
    outage.worked(3, 100)
    outage.worked(4, 100)
    outage.failed("holds %d bytes", 13, level=logging.WARNING, exc_info=False)
    said = [(r.levelno, r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    assert said == [(logging.ERROR, "holds 10 bytes", True),
                    (logging.INFO, "Redis has room again (3 of 100 bytes)", False),
                    (logging.WARNING, "holds 13 bytes", False)]
    assert outage.failing
