"""Errors of turning bytes into descriptors."""


class PermanentError(ValueError):
    """The object itself is bad (not an image, corrupt, too many pixels); ``reason`` is the failure record's
    reason class. Never retried."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
