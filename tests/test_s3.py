"""The S3 client's retries against a server that takes connections and never answers, and the visibility timeout
they call for."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from botocore.exceptions import BotoCoreError

from bucketlens.celery_config import time_limit_s
from bucketlens.s3 import make_client
from bucketlens.settings import S3_ATTEMPTS, Settings


def test_a_request_to_a_silent_server_is_tried_as_many_times_as_planned() -> None:
    """botocore's ``max_attempts`` counts the retries: a stalled download was read 3 times where the time limits
    and the README planned 2, and a batch outlived its time limit (review 86)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # held open, never answered
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        s3 = make_client(Settings(s3_endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}"), read_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(BotoCoreError):
            s3.head_object(Bucket="photos", Key="stalled.jpg")
        assert len(accepted) == S3_ATTEMPTS == 2, (len(accepted), time.monotonic() - started)
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_visibility_timeout_below_a_stalled_batch_is_refused_naming_both_settings() -> None:
    """At VISIBILITY_TIMEOUT_S 60 with FETCH_TIMEOUT_S 30, a batch holding one stalled download ran past it, and the
    broker handed it out again every 90 s, for good (review 86)."""
    with pytest.raises(ValueError, match=r"^BUCKETLENS_VISIBILITY_TIMEOUT_S=60: must be at least 106 with "
                                         r"BUCKETLENS_FETCH_TIMEOUT_S=30 \(a batch holding a stalled download"):
        Settings(visibility_timeout_s=60)
    assert time_limit_s(Settings(visibility_timeout_s=60, fetch_timeout_s=5)) == 46  # (a shorter download deadline)
    assert time_limit_s(Settings(visibility_timeout_s=106)) == 96 < 106
