"""The one exception a client mistake raises; the API turns it into OpenAI's error object."""
from __future__ import annotations


class RequestError(ValueError):
    """A request the server refuses. ``param`` names the offending field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 429


def engine_failed(reason: str) -> RequestError:
    """The 503 of a server whose engine failed to load or died: the reason, never a hang."""
    return RequestError(f"the engine cannot serve: {reason}", status=503, type="service_unavailable",
                        code="engine_failed")
