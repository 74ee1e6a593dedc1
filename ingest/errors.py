"""Errors of the ingest service."""


class BadEvent(ValueError):
    """The request body is not an S3 ``Records[]`` notification."""


class BrokerUnavailable(RuntimeError):
    """Redis did not take the task or entry; the S3 server must deliver the event again."""
