"""A null OpenAI-compatible server: streams N canned tokens at once, or on a scripted schedule.

Central rule: it does no work per token, so a benchmark against it measures the client alone
(``bench --target null`` reports the load generator's ceiling). With ``--ttft-ms``/``--itl-ms``
it sleeps a known time before the first and between later tokens: the tests use that schedule to
check the client's metrics end to end.

It speaks just enough HTTP/1.1 (keep-alive, chunked streaming) for ``POST /v1/completions``
(``stream`` true or false, ``stream_options.include_usage``, ``max_tokens``), ``GET /v1/models``,
``GET /version`` and ``GET /health``. A request's ``max_tokens`` wins over ``--tokens``; the prompt
is counted one token per UTF-8 byte, as the tiny test models' tokenizer does.

    python -m engines_compare.null_server --port 8123 --tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json

_TOKEN = " tok"


@dataclasses.dataclass(frozen=True, slots=True)
class NullConfig:
    tokens: int = 16
    model: str = "null"
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    fail_every: int = 0  # answer every Nth completion with HTTP 500 (0: never)


def _chunk(payload: bytes) -> bytes:
    """One HTTP chunk carrying one SSE event."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type +
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


class NullServer:
    """Holds the canned chunks (built once per token count) and serves connections."""

    def __init__(self, cfg: NullConfig) -> None:
        self.cfg = cfg
        self.completions = 0
        self._token_chunk = _chunk(json.dumps({
            "id": "cmpl-null", "object": "text_completion", "created": 0, "model": cfg.model,
            "choices": [{"index": 0, "text": _TOKEN, "logprobs": None, "finish_reason": None}]}).encode())
        self._last_chunk = _chunk(json.dumps({
            "id": "cmpl-null", "object": "text_completion", "created": 0, "model": cfg.model,
            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}).encode())
        self._bodies: dict[int, bytes] = {}

    def _usage_chunk(self, prompt_tokens: int, n: int) -> bytes:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        return _chunk(json.dumps({"id": "cmpl-null", "object": "text_completion", "created": 0,
                                  "model": self.cfg.model, "choices": [], "usage": usage}).encode())

    def _all_tokens(self, n: int) -> bytes:
        if n not in self._bodies:
            self._bodies[n] = self._token_chunk * n + self._last_chunk
        return self._bodies[n]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await _read_request(reader):
                method, path, body = request
                await self._route(method, path, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _route(self, method: bytes, path: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == b"POST" and path == b"/v1/completions":
            await self._complete(json.loads(body or b"{}"), writer)
        elif path == b"/health":
            writer.write(_response("200 OK", b'{"status":"ok"}'))
        elif path == b"/v1/models":
            writer.write(_response("200 OK", json.dumps(
                {"object": "list", "data": [{"id": self.cfg.model, "object": "model",
                                             "owned_by": "null_server"}]}).encode()))
        elif path == b"/version":
            writer.write(_response("200 OK", b'{"version":"null-server"}'))
        else:
            writer.write(_response("404 Not Found", b'{"error":{"message":"not found"}}'))
        await writer.drain()

    async def _complete(self, req: dict, writer: asyncio.StreamWriter) -> None:
        self.completions += 1
        if self.cfg.fail_every and self.completions % self.cfg.fail_every == 0:
            writer.write(_response("500 Internal Server Error", b'{"error":{"message":"scripted failure"}}'))
            return
        n = int(req.get("max_tokens") or self.cfg.tokens)
        prompt = req.get("prompt", "")
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).encode())
        if not req.get("stream"):
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            writer.write(_response("200 OK", json.dumps({
                "id": "cmpl-null", "object": "text_completion", "created": 0, "model": self.cfg.model,
                "choices": [{"index": 0, "text": _TOKEN * n, "logprobs": None, "finish_reason": "length"}],
                "usage": usage}).encode()))
            return
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        tail = (self._usage_chunk(prompt_tokens, n) if usage else b"") + _chunk(b"[DONE]") + b"0\r\n\r\n"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        if not (self.cfg.ttft_ms or self.cfg.itl_ms):
            writer.write(head + self._all_tokens(n) + tail)
            return
        writer.write(head)
        await asyncio.sleep(self.cfg.ttft_ms / 1000)
        for i in range(n):
            if i:
                await asyncio.sleep(self.cfg.itl_ms / 1000)
            writer.write(self._token_chunk)
            await writer.drain()
        writer.write(self._last_chunk + tail)


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.split(b" ", 2)
    length = 0
    while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
        k, _, v = h.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    body = await reader.readexactly(length) if length else b""
    return method, path.split(b"?")[0], body


async def start(cfg: NullConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[asyncio.Server, int]:
    """Start serving on the running loop; returns the server and the port it bound (``port=0``: any free)."""
    server = NullServer(cfg)
    srv = await asyncio.start_server(server.handle, host, port, backlog=1024)
    return srv, srv.sockets[0].getsockname()[1]


async def _serve(cfg: NullConfig, host: str, port: int) -> None:
    srv, bound = await start(cfg, host, port)
    print(f"null server listening on http://{host}:{bound}", flush=True)
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engines_compare.null_server", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed at start)")
    ap.add_argument("--tokens", type=int, default=NullConfig().tokens, help="tokens per completion without max_tokens")
    ap.add_argument("--model", default=NullConfig().model, help="model id reported by /v1/models")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="sleep before the first token")
    ap.add_argument("--itl-ms", type=float, default=0.0, help="sleep between later tokens")
    ap.add_argument("--fail-every", type=int, default=0, help="answer every Nth completion with HTTP 500")
    a = ap.parse_args(argv)
    cfg = NullConfig(a.tokens, a.model, a.ttft_ms, a.itl_ms, a.fail_every)
    try:
        asyncio.run(_serve(cfg, a.host, a.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
