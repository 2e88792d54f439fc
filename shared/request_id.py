"""``X-Request-Id``: a client's id for its request, used by the server and echoed back.

A client's id (1 to 128 visible ASCII characters) is put in ``request.state.request_id``; the API
(``shared/api.py``) uses it as the base of the request's engine ids (``<id>-<choice index>``, the
ids engines report and log) or, without one, sets the response's own generated id (``cmpl-…``).
Whatever ``request.state.request_id`` holds when the response starts is echoed in its
``X-Request-Id`` header, errors included. An invalid id is a 400 naming the header.
"""
from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from shared.errors import RequestError
from shared.responses import error_body

HEADER = "X-Request-Id"
MAX_LEN = 128


def valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= MAX_LEN and all(0x21 <= b <= 0x7E for b in value)


class RequestIdMiddleware:
    """A pure ASGI middleware (it does not buffer streams, unlike Starlette's BaseHTTPMiddleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        if given is not None and not valid_request_id(given):
            e = RequestError(f"{HEADER} must be 1 to {MAX_LEN} visible ASCII characters", param=HEADER)
            body = error_body(e.message, e.type, e.param, e.code)
            return await JSONResponse(body, status_code=e.status)(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"] = given.decode() if given else None

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and state.get("request_id"):
                header = (b"x-request-id", state["request_id"].encode())
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
