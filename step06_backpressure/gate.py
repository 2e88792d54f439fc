"""``Gate``: the ASGI middleware in front of the API that protects the server from its clients.

Central rule: every POST passes the gate, and the gate never lets one client's behaviour cost the
others: a body too large is refused before it is read (413), a server shutting down turns new work
away (503 + ``Retry-After``), a client that disconnects has its request cancelled at once, and a
client that reads its stream too slowly has its request aborted once ``--max-buffered-chunks``
chunks wait for it.

* **Body size.** ``Content-Length`` beyond ``--max-body-bytes`` is refused unread; a chunked upload
  is counted as it arrives and refused at the limit.
* **Disconnects.** The gate reads the body itself and then watches the connection; when the client
  goes, the request's task is cancelled, so its engine requests are aborted whether or not they
  had produced anything (uvicorn alone only notices at the next write).
* **Slow readers.** The API's writes go to a per-request outbox that a pump task copies to the
  socket, so the API (and through it the engine) never waits for a client. A stream whose outbox
  reaches the bound is aborted: generation stops (its row is freed at the next step), the chunks
  already buffered are dropped and the connection is closed, so the client sees a stream without
  ``[DONE]``. Memory per stream is bounded by the limit, whatever the client does.
* **Graceful shutdown.** On SIGTERM (installed at start-up) the gate starts draining: POSTs get
  503, ``/ready`` says ``draining``, the requests in flight go on; when none is left, or after
  ``--drain-timeout`` seconds (those still running are then cancelled, their connections closed),
  it hands the signal to uvicorn's own handler, which stops the server and exits.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import signal
import threading
from typing import Any, Awaitable, Callable

from fastapi.responses import JSONResponse

from shared.config import flag_field
from shared.responses import error_body

log = logging.getLogger("step06_backpressure")
Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


@dataclasses.dataclass(frozen=True, slots=True)
class GateConfig:
    max_body_bytes: int = flag_field(1 << 20, "largest request body in bytes; beyond: 413")
    max_buffered_chunks: int = flag_field(
        256, "most stream chunks buffered for a client that reads slowly; beyond, its request is aborted "
        "and its connection closed")
    drain_timeout: float = flag_field(30.0, "on SIGTERM: seconds running requests get to finish (new "
                                      "ones get 503) before the rest are cut and the server exits")

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_buffered_chunks < 1 or self.drain_timeout < 0:
            raise ValueError(f"max_body_bytes and max_buffered_chunks must be >= 1 and drain_timeout >= 0: {self}")


@dataclasses.dataclass(frozen=True, slots=True)
class GateStats:
    num_in_flight: int  # requests past the gate, not yet answered
    draining: bool
    num_turned_away: int  # 503 while draining
    num_too_large: int  # 413
    num_disconnects: int  # clients that left before their answer ended
    num_slow_reader_aborts: int
    num_cut_at_drain_timeout: int


class SlowReader(Exception):
    """Raised into the app's ``send`` when its client is ``max_buffered_chunks`` behind."""


class Outbox:
    """A response's messages on their way to the socket: the app never waits, the pump does."""

    def __init__(self, send: Send, limit: int) -> None:
        self._send, self._limit = send, limit
        self._items: collections.deque[Message] = collections.deque()
        self._more = asyncio.Event()
        self._closed = False
        self._stalled = False  # the pump waits for the socket: the client is not reading

    async def put(self, message: Message) -> None:  # the app's ``send``
        # Only while the socket is stalled: a step's burst (n choices) may briefly exceed the limit.
        if self._stalled and message["type"] == "http.response.body" and len(self._items) >= self._limit:
            raise SlowReader(f"the client is {len(self._items)} chunks behind")
        self._items.append(message)
        self._more.set()

    def close(self) -> None:
        self._closed = True
        self._more.set()

    async def pump(self) -> None:
        """Copy messages to the socket until closed and empty; raises if the client is gone."""
        while self._items or not self._closed:
            if not self._items:
                self._more.clear()
                await self._more.wait()
                continue
            self._stalled = True  # seen by put() only if the send below really waits
            await self._send(self._items.popleft())
            self._stalled = False


def _refusal(status: int, message: str, type: str, code: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(error_body(message, type, None, code), status_code=status, headers=headers)


class GateMiddleware:
    """The ASGI middleware; the state is the :class:`Gate` it is given (``/ready`` reads it too)."""

    def __init__(self, app: Any, gate: Gate) -> None:
        self.app, self.gate = app, gate

    async def __call__(self, scope: Message, receive: Any, send: Send) -> None:
        await self.gate.handle(self.app, scope, receive, send)


class Gate:
    def __init__(self, config: GateConfig = GateConfig(), retry_after: int = 1) -> None:
        self.config, self.retry_after = config, retry_after
        self.draining = False
        self.counts: collections.Counter[str] = collections.Counter()  # too_large, turned_away, ...
        self._tasks: set[asyncio.Task] = set()  # the requests in flight (their app tasks)
        self._drainer: asyncio.Future | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def stats(self) -> GateStats:
        c = self.counts
        return GateStats(self.in_flight, self.draining, c["turned_away"], c["too_large"], c["disconnects"],
                         c["slow_reader_aborts"], c["cut_at_drain_timeout"])

    async def handle(self, app: Any, scope: Message, receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            self._install_sigterm()
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        if self.draining:
            self.counts["turned_away"] += 1
            return await _refusal(503, "The server is shutting down; retry on another replica.",
                                  "service_unavailable", "shutting_down", self.retry_after)(scope, receive, send)
        body = await self._read_body(scope, receive)
        if body is None:
            self.counts["too_large"] += 1
            limit = self.config.max_body_bytes
            return await _refusal(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                                  "request_too_large")(scope, receive, send)
        if body is not False:
            await self._serve(app, scope, body, receive, send)

    async def _read_body(self, scope: Message, receive: Any) -> bytes | None | bool:
        """The whole body; None if too large; False if the client left while sending it."""
        limit = self.config.max_body_bytes
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > limit:
                return None
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _serve(self, asgi: Any, scope: Message, body: bytes, receive: Any, send: Send) -> None:
        gone = asyncio.Event()
        first = True

        async def app_receive() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        outbox = Outbox(send, self.config.max_buffered_chunks)
        app = asyncio.create_task(asgi(scope, app_receive, outbox.put))
        pump, watcher = asyncio.create_task(outbox.pump()), asyncio.create_task(watch())
        self._tasks.add(app)
        try:
            await asyncio.wait({app, pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done():  # the client left (or its socket failed): cancel its request
                self.counts["disconnects"] += 1
                return
            if app.cancelled() or isinstance(app.exception(), SlowReader):
                self._on_cut(app)
                return  # the response is incomplete: uvicorn closes the connection
            outbox.close()
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)  # flush, or client gone
            app.result()  # an unexpected error: let uvicorn log it
        finally:
            self._tasks.discard(app)
            for t in (app, pump, watcher):
                t.cancel()
            await asyncio.gather(app, pump, watcher, return_exceptions=True)

    def _on_cut(self, app: asyncio.Task) -> None:
        if app.cancelled():
            self.counts["cut_at_drain_timeout"] += 1
            return
        self.counts["slow_reader_aborts"] += 1
        log.warning("aborted a stream whose client read too slowly (%s)", app.exception())

    # ---- graceful shutdown ------------------------------------------------------------------

    def _install_sigterm(self) -> None:
        """Take SIGTERM from uvicorn (its handler is kept, and called once drained)."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def hand_over() -> None:
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signal.SIGTERM, None)  # uvicorn's handle_exit: stop serving, then exit
            else:
                signal.raise_signal(signal.SIGTERM)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, self.begin_drain, hand_over)

    def begin_drain(self, on_drained: Callable[[], None]) -> None:
        """Stop admitting; once nothing is in flight (or at the drain timeout), call ``on_drained``."""
        if self.draining:
            return
        self.draining = True
        log.warning("draining: %d requests in flight, up to %.1f s", self.in_flight, self.config.drain_timeout)
        self._drainer = asyncio.ensure_future(self._drain(on_drained))

    async def _drain(self, on_drained: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while self._tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._tasks:
            log.warning("drain timeout: cutting %d requests still in flight", len(self._tasks))
            for t in list(self._tasks):
                t.cancel()
            while self._tasks:
                await asyncio.sleep(0.01)
        on_drained()
