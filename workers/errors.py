"""Errors of the embedding pipeline: transient ones are retried, permanent ones become failure records."""


class TransientError(RuntimeError):
    """S3 or Redis unreachable, a 5xx: retry with backoff."""


class PermanentError(ValueError):
    """The object itself is bad; ``reason`` is the failure record's reason class."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ObjectChanged(LookupError):
    """The object is gone or has another etag: a newer event brings the newer version."""
