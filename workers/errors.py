"""Errors of the embedding pipeline: transient ones are retried, permanent ones become failure records."""

from vision.errors import PermanentError

__all__ = ["ObjectChanged", "PermanentError", "TransientError"]


class TransientError(RuntimeError):
    """S3 or Redis unreachable, a 5xx, a download past its deadline: retry with backoff. ``reason`` is the failure
    recorded once the retries are spent."""

    def __init__(self, message: str, reason: str = "unreachable") -> None:
        super().__init__(message)
        self.reason = reason


class ObjectChanged(LookupError):
    """The object is gone or has another etag: a newer event brings the newer version."""
