"""Errors of the embedding pipeline: transient ones are retried, permanent ones become failure records."""

from vision.errors import PermanentError

__all__ = ["ObjectChanged", "PermanentError", "TransientError"]


class TransientError(RuntimeError):
    """S3 or Redis unreachable, a 5xx: retry with backoff."""


class ObjectChanged(LookupError):
    """The object is gone or has another etag: a newer event brings the newer version."""
