"""A step that fails again and again while a server is away (Redis, S3, the index server), said once: when it starts
failing and when it works again, not at each retry (a retry every few seconds filled the log)."""

from __future__ import annotations

import logging


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
