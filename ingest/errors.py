"""Errors of the ingest service."""


class BadEvent(ValueError):
    """The request body is not an S3 ``Records[]`` notification."""


class NoGeneration(RuntimeError):
    """No index generation is registered in Redis (the index service has not started, or Redis lost its data):
    an event cannot be tagged with the generation that will merge it, so the S3 server must deliver it again."""


class S3Unavailable(RuntimeError):
    """S3 did not answer a question an event raised (what a key holds after one of its versions was deleted): the S3
    server must deliver the event again."""
