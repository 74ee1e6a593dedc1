"""A step that fails again and again while a server is away (Redis, S3, the index server), said once: when it starts
failing and when it works again, not at each retry (a retry every few seconds filled the log). ``FailureRun``
counts and times such a run where it must show beyond the log (``/stats``, metrics, ``/readyz``)."""

from __future__ import annotations

import logging
import time


class Outage:
    """One step's outage: ``failed`` logs the first failure of a run of them, ``worked`` ends the run (said at INFO:
    ``works_again % args``)."""

    def __init__(self, logger: logging.Logger, works_again: str) -> None:
        self.logger, self.works_again = logger, works_again
        self.failing = False

    def failed(self, message: str, *args: object, level: int = logging.ERROR, exc_info: bool = True) -> None:
        """Log ``message % args`` (with the exception being handled, unless ``exc_info`` is false) unless the step
        is failing already."""
        if not self.failing:
            self.logger.log(level, message, *args, exc_info=exc_info)
            self.failing = True

    def worked(self, *args: object) -> None:
        if self.failing:
            self.logger.info(self.works_again, *args)
            self.failing = False


class FailureRun:
    """A step that keeps failing (a disk full): failures since start, since when the current run has lasted (None:
    the step works), and its last error."""

    def __init__(self) -> None:
        self.failures = 0
        self.since: float | None = None  # monotonic
        self.error = ""

    def failed(self, exc: BaseException) -> bool:
        """Count ``exc``; whether it begins a run."""
        self.failures += 1
        self.error = f"{type(exc).__name__}: {exc}"
        begins = self.since is None
        if begins:
            self.since = time.monotonic()
        return begins

    def worked(self) -> float | None:
        """End the run; how long it lasted (None: there was none)."""
        if self.since is None:
            return None
        lasted, self.since, self.error = time.monotonic() - self.since, None, ""
        return lasted

    def failing_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def lasted(self, grace_s: float) -> bool:
        return self.since is not None and self.failing_s() >= grace_s

    def public(self) -> dict[str, object]:
        return {"failures": self.failures, "failing_s": round(self.failing_s(), 1), "error": self.error}
