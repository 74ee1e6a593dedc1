"""Broker outages logged once: Celery's consumer logs an error on every reconnection attempt (every 2, 4, 6 ... s
for as long as Redis is away); bucketlens keeps the first of each outage and Celery's "Connected to" at its end."""

from __future__ import annotations

import logging
import warnings

from celery.exceptions import CPendingDeprecationWarning

CONSUMER = "celery.worker.consumer.consumer"  # logs "consumer: Cannot connect to ..." per attempt
CONNECTION = "celery.worker.consumer.connection"  # logs "Connected to ..." once connected again


class OncePerOutage(logging.Filter):
    """Pass the first "Cannot connect" of an outage, drop the repeats until the next "Connected to"."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == CONNECTION and str(record.msg).startswith("Connected to"):
            self.down = False
        elif record.name == CONSUMER and "Cannot connect to" in str(record.msg):
            if self.down:
                return False
            self.down = True
        return True


def log_outages_once() -> None:
    """Install the filter on Celery's consumer loggers (in the worker's main process, where the consumer runs)."""
    once = OncePerOutage()
    for name in (CONSUMER, CONNECTION):
        logging.getLogger(name).addFilter(once)
    # Celery warns on every reconnection that it will cancel running late-ack tasks by default in 6.0; bucketlens
    # lets them finish (their results are written once Redis is back, and the unacked task is redelivered).
    warnings.filterwarnings("ignore", category=CPendingDeprecationWarning, module="celery.worker.consumer")
