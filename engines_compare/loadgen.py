"""The load generator: a lean asyncio HTTP/1.1 client for streamed completions, closed and open loop.

Central rule: the client must never be the bottleneck. Request bodies are serialized before the
clock starts; each connection is an asyncio protocol kept alive between requests; a chunk's time
is taken the moment its bytes arrive (in ``data_received``), before any parsing, and plain text
chunks are counted by a regex without a JSON parse. (httpx was measured several times slower;
see README.md.) Only chunks that carry text count as tokens arriving; the usage chunk and
``[DONE]`` do not.

Closed loop: ``concurrency`` workers, each sending its next request as soon as its last one ends.
Open loop: requests start at seeded Poisson arrival times, whatever is still running.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import time
import urllib.parse
from typing import Callable, Sequence

from engines_compare.metrics import RequestRecord

# The first character of each completion chunk's text, or chat chunk's content: `"` means empty.
# A literal start lets re scan fast; escaped quotes inside strings cannot match. Used only on
# blocks of events without usage or error objects.
_TEXT_START = re.compile(rb'"text":\s*"(.)', re.DOTALL)
_CONTENT_START = re.compile(rb'"content":\s*"(.)', re.DOTALL)
_json_decode = json.JSONDecoder().decode


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    path: str
    tls: bool

    @classmethod
    def parse(cls, url: str, path: str = "/v1/completions") -> Endpoint:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--target: expected an http(s)://host:port URL, got {url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        return cls(u.hostname, port, u.path.rstrip("/") + path, u.scheme == "https")


class HTTPError(Exception):
    pass


class StaleConnection(HTTPError):
    """The server closed a kept-alive connection before sending a byte of the response."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that posts JSON and reads an SSE stream back.

    A protocol, not a stream reader: bytes are timed and parsed in ``data_received``, straight
    from the event loop's socket callback, with no task to wake per chunk."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self._transport: asyncio.Transport | None = None
        self._response: _Response | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()  # taken before any parsing
        response = self._response
        if response is None or response.future.done():
            return  # nothing was asked: ignore
        try:
            if response.feed(data, now):
                response.future.set_result(None)
        except Exception as e:  # a malformed response fails its request, not the run
            response.future.set_exception(HTTPError(f"bad response: {type(e).__name__}: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        response = self._response
        if response is not None and not response.future.done():
            if response.until_close:
                response.future.set_result(None)
            elif not response.head and response.status == 0:
                response.future.set_exception(StaleConnection(f"connection closed before any response ({exc or 'EOF'})"))
            else:
                response.future.set_exception(HTTPError(f"connection closed mid-response ({exc or 'EOF'})"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def post_stream(self, body: bytes, rec: RequestRecord, origin: float) -> None:
        """Send ``body``, then fill ``rec`` from the stream; any failure closes the connection.

        A kept-alive connection that the server closed while it was idle (llama-server does after
        a stream) fails before any byte comes back; like any HTTP client, send once more on a
        fresh connection. ``rec.start`` keeps the first attempt's time: the client waited for it."""
        rec.start = time.perf_counter() - origin  # a new connection's set-up counts, as for any client
        reused = self._transport is not None and not self._transport.is_closing()
        try:
            await self._exchange(body, rec, origin)
        except StaleConnection:
            if not reused:
                raise
            await self._exchange(body, rec, origin)

    async def _exchange(self, body: bytes, rec: RequestRecord, origin: float) -> None:
        head = (f"POST {self.ep.path} HTTP/1.1\r\nHost: {self.ep.host}:{self.ep.port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        response = self._response = _Response(_SSEParser(rec, origin), loop.create_future())
        try:
            if self._transport is None or self._transport.is_closing():
                await loop.create_connection(lambda: self, self.ep.host, self.ep.port, ssl=self.ep.tls or None)
            self._transport.write(head + body)
            await response.future
        except StaleConnection:
            self.close()
            self._response = None
            raise  # nothing was received: the record is untouched
        except BaseException:
            self.close()
            raise
        finally:
            if self._response is response:
                self._response = None
                response.parser.finish(response.status)
        if not response.keep_alive:
            self.close()


class _Response:
    """The status line, headers and body framing of one response, fed as bytes arrive."""

    def __init__(self, parser: _SSEParser, future: asyncio.Future) -> None:
        self.parser, self.future = parser, future
        self.status = 0
        self.head = b""
        self.keep_alive = True
        self.until_close = False
        self.body: _Dechunker | int | None = None  # chunked, bytes left of a Content-Length, or to EOF

    def feed(self, data: bytes, now: float) -> bool:
        """Consume ``data``; True once the response is complete."""
        if self.body is None and not self.until_close:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return False
            data = self.head[end + 4:]
            self._headers(self.head[:end])
        if isinstance(self.body, _Dechunker):
            self.parser.feed(self.body.feed(data), now)
            return self.body.done
        self.parser.feed(data, now)
        if self.until_close:
            return False
        self.body -= len(data)
        return self.body <= 0

    def _headers(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HTTPError(f"not an HTTP response: {lines[0][:80]!r}")
        self.status = self.parser.status = int(parts[1])
        headers = {k.strip().lower(): v.strip().lower() for k, _, v in (h.partition(b":") for h in lines[1:])}
        self.keep_alive = headers.get(b"connection") != b"close" and parts[0] == b"HTTP/1.1"
        if (retry := headers.get(b"retry-after", b"")).replace(b".", b"", 1).isdigit():  # seconds (not a date)
            self.parser.rec.retry_after = float(retry)
        if headers.get(b"transfer-encoding") == b"chunked":
            self.body = _Dechunker()
        elif b"content-length" in headers:
            self.body = int(headers[b"content-length"])
        else:
            self.until_close, self.keep_alive = True, False


class _Dechunker:
    """HTTP/1.1 chunked transfer decoding over a stream of reads."""

    def __init__(self) -> None:
        self.buf = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf, pos, out = self.buf + data, 0, []
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl].split(b";")[0], 16)
            if size == 0:  # last chunk, then optional trailers and an empty line
                self.done = buf.find(b"\r\n\r\n", nl) >= 0
                break
            if len(buf) < nl + 2 + size + 2:
                break
            out.append(buf[nl + 2:nl + 2 + size])
            pos = nl + 2 + size + 2
        self.buf = buf[pos:]
        return b"".join(out)


class _SSEParser:
    """Turns the body of a streamed completion into chunk times and token counts on ``rec``."""

    def __init__(self, rec: RequestRecord, origin: float) -> None:
        self.rec, self.origin = rec, origin
        self.status = 0  # set from the status line
        self.buf = b""

    def feed(self, data: bytes, now: float) -> None:
        now -= self.origin
        if self.status != 200:
            self.buf += data
            return
        buf = self.buf + (data.replace(b"\r\n", b"\n") if b"\r" in data else data)
        end = buf.rfind(b"\n\n") + 2
        block, self.buf = buf[:end], buf[end:]
        if not block:
            return
        # The hot path: plain text events, counted by one regex pass without JSON parsing, up to
        # the first event that carries usage or an error; those (and all after) are parsed.
        hits = [i for i in (block.find(b'"usage"'), block.find(b'"error"')) if i >= 0]
        cut = len(block)
        if hits:
            p = block.rfind(b"\n\n", 0, min(hits))
            cut = p + 2 if p >= 0 else 0
        firsts = _TEXT_START.findall(block, 0, cut) or _CONTENT_START.findall(block, 0, cut)
        self.rec.chunk_times.extend([now] * (len(firsts) - firsts.count(b'"')))
        for event in block[cut:].split(b"\n\n"):
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._on_data(line[5:].strip(), now)

    def _on_data(self, payload: bytes, now: float) -> None:
        rec = self.rec
        if payload == b"[DONE]" or not payload:
            return
        obj = _json_decode(payload.decode())
        if "error" in obj:
            err = obj["error"]
            rec.error = f"in-stream error: {err.get('message', err) if isinstance(err, dict) else err}"[:500]
            return
        for choice in obj.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                rec.chunk_times.append(now)
        usage = obj.get("usage")
        if usage:
            rec.usage_reported = True
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.output_tokens = usage.get("completion_tokens", 0)

    def finish(self, status: int) -> None:
        """Close the record: its end time, any error, and its token count."""
        rec = self.rec
        rec.end = time.perf_counter() - self.origin
        rec.status = status or None
        if rec.error is None and status != 200:
            rec.error = f"HTTP {status}: {self.buf[:300].decode(errors='replace')}" if status else "no HTTP response"
        elif rec.error is None and not rec.chunk_times:
            rec.error = "no content chunk in the stream"
        if not rec.usage_reported:
            rec.output_tokens = len(rec.chunk_times)


@dataclasses.dataclass(frozen=True, slots=True)
class LoadSpec:
    """One sweep point: closed loop at ``concurrency``, or open loop at ``request_rate`` req/s."""

    concurrency: int | None = None
    request_rate: float | None = None
    max_concurrency: int | None = None  # open loop only: cap on requests in flight
    seed: int = 0
    timeout_s: float = 600.0

    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency else f"rate={self.request_rate:g}/s"


async def _one(conn: Connection, body: bytes, rec: RequestRecord, origin: float, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await conn.post_stream(body, rec, origin)
    except (OSError, HTTPError, ValueError, TimeoutError) as e:  # the record already has its end time
        rec.error = f"{type(e).__name__}: {e}"[:500]


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of ``n`` requests at ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {rate}")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_load(ep: Endpoint, bodies: Sequence[bytes], expected_out: Sequence[int], spec: LoadSpec,
                   on_done: Callable[[], None] | None = None) -> list[RequestRecord]:
    """Send every body once, per ``spec``; return one record per body, in body order."""
    origin = time.perf_counter()
    records = [RequestRecord(i, 0.0, expected_output_tokens=expected_out[i]) for i in range(len(bodies))]
    pool: list[Connection] = []

    async def send(i: int, conn: Connection) -> None:
        await _one(conn, bodies[i], records[i], origin, spec.timeout_s)
        if on_done is not None:
            on_done()

    try:
        if spec.concurrency:
            await _closed_loop(ep, len(bodies), spec.concurrency, send, pool)
        elif spec.request_rate:
            await _open_loop(ep, poisson_offsets(len(bodies), spec.request_rate, spec.seed), spec, send, pool)
        else:
            raise ValueError("LoadSpec needs concurrency or request_rate")
    finally:
        for conn in pool:
            conn.close()
    return records


async def _closed_loop(ep: Endpoint, n: int, concurrency: int, send: Callable, pool: list[Connection]) -> None:
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    indices = iter(range(n))

    async def worker() -> None:
        conn = Connection(ep)
        pool.append(conn)
        for i in indices:  # a shared iterator: each index is taken by exactly one worker
            await send(i, conn)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))


async def _open_loop(ep: Endpoint, offsets: list[float], spec: LoadSpec, send: Callable,
                     pool: list[Connection]) -> None:
    idle: list[Connection] = []
    cap = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    t0 = time.perf_counter()

    async def fire(i: int) -> None:
        if idle:
            conn = idle.pop()
        else:
            conn = Connection(ep)
            pool.append(conn)
        try:
            await send(i, conn)
        finally:
            idle.append(conn)
            if cap is not None:
                cap.release()

    tasks = []
    for i, at in enumerate(offsets):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if cap is not None:
            await cap.acquire()
        tasks.append(asyncio.create_task(fire(i)))
    await asyncio.gather(*tasks)
