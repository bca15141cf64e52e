"""Typed errors that anything a request or a user can reach raises.

Every error carries a message written for the person who caused it. Front doors map
the classes to HTTP status codes and gRPC codes, so new failure kinds get a class here
rather than a string match somewhere else.
"""


class MixserveError(Exception):
    """Base class of every error mixserve raises on purpose."""


class InvalidRequestError(MixserveError, ValueError):
    """A request's prompt or parameters are invalid (HTTP 400, gRPC INVALID_ARGUMENT)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # crosses process boundaries with its param (Ray pickles errors)
        return type(self), (self.message, self.param)


class ContextLengthError(InvalidRequestError):
    """The prompt plus max_tokens does not fit in the model's context."""


class CheckpointError(MixserveError):
    """A checkpoint folder is missing, malformed, truncated or in a refused format."""


class RequestAbortedError(MixserveError):
    """The request was aborted before it finished (client gone, or an explicit abort)."""
