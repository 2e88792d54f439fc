"""The client end to end against the scripted null server, and its stream parser byte by byte."""
from __future__ import annotations

import asyncio
import json

import pytest

from engines_compare import null_server
from engines_compare.loadgen import Endpoint, LoadSpec, _Response, _SSEParser, poisson_offsets, run_load
from engines_compare.metrics import RequestRecord, itls, summarize, tpot, ttft


def _body(max_tokens: int) -> bytes:
    return json.dumps({"model": "null", "prompt": "hello", "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


def _run(cfg: null_server.NullConfig, n: int, spec: LoadSpec, tokens: int = 4) -> list[RequestRecord]:
    async def go() -> list[RequestRecord]:
        srv, port = await null_server.start(cfg)
        async with srv:
            return await run_load(Endpoint.parse(f"http://127.0.0.1:{port}"), [_body(tokens)] * n, [tokens] * n, spec)
    return asyncio.run(go())


def _max_overlap(records: list[RequestRecord]) -> int:
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    depth = best = 0
    for _, d in events:
        depth += d
        best = max(best, depth)
    return best


def test_scripted_timings_come_back_as_ttft_itl_and_tpot() -> None:
    # the server sleeps 60 ms before the first token and 25 ms between the later ones
    records = _run(null_server.NullConfig(ttft_ms=60, itl_ms=25), n=4, spec=LoadSpec(concurrency=2))
    assert all(r.ok and r.output_tokens == 4 and r.usage_reported and r.prompt_tokens == 5 for r in records)
    for r in records:
        assert len(r.chunk_times) == 4
        assert 0.058 <= ttft(r) < 0.060 + 0.5  # a sleep never ends early; the upper bound is loose
        assert all(0.015 <= gap < 0.025 + 0.5 for gap in itls(r))
        assert 0.020 <= tpot(r) < 0.025 + 0.5
    s = summarize(records)
    assert s.itl.count == 4 * 3 and s.completed == 4
    assert 23 <= s.itl.mean <= 25 + 100


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight() -> None:
    records = _run(null_server.NullConfig(ttft_ms=80, itl_ms=10), n=8, spec=LoadSpec(concurrency=4))
    assert _max_overlap(records) == 4
    assert sorted(r.index for r in records) == list(range(8))


def test_open_loop_starts_requests_at_poisson_times() -> None:
    spec = LoadSpec(request_rate=50.0, seed=7)
    records = _run(null_server.NullConfig(), n=10, spec=spec)
    offsets = poisson_offsets(10, 50.0, 7)
    assert all(r.ok for r in records)
    for r, at in zip(records, offsets):
        assert r.start - records[0].start >= at - 0.002


def test_poisson_offsets_are_seeded_and_have_the_right_rate() -> None:
    a, b = poisson_offsets(4000, 20.0, 1), poisson_offsets(4000, 20.0, 1)
    assert a == b and a != poisson_offsets(4000, 20.0, 2)
    mean_gap = a[-1] / (len(a) - 1)
    assert 0.045 < mean_gap < 0.055
    with pytest.raises(ValueError, match="--request-rate"):
        poisson_offsets(3, 0.0, 0)


def test_http_errors_and_refused_connections_are_recorded_not_raised() -> None:
    records = _run(null_server.NullConfig(fail_every=2), n=6, spec=LoadSpec(concurrency=1))
    failed = [r for r in records if not r.ok]
    assert len(failed) == 3 and all(r.error.startswith("HTTP 500") for r in failed)
    assert summarize(records).failed == 3

    async def refused() -> list[RequestRecord]:
        srv, port = await null_server.start(null_server.NullConfig())
        srv.close()
        await srv.wait_closed()
        ep = Endpoint.parse(f"http://127.0.0.1:{port}")
        return await run_load(ep, [_body(2)] * 2, [2, 2], LoadSpec(concurrency=2))
    records = asyncio.run(refused())
    assert all(r.error and "Error" in r.error for r in records)


def _stream(events: list[dict | str]) -> bytes:
    body = b""
    for e in events:
        payload = (e if isinstance(e, str) else json.dumps(e)).encode()
        event = b"data: " + payload + b"\n\n"
        body += b"%x\r\n%s\r\n" % (len(event), event)
    return body + b"0\r\n\r\n"


def _parse(raw: bytes, step: int, status: bytes = b"200 OK",
           framing: bytes = b"Transfer-Encoding: chunked") -> tuple[RequestRecord, bool]:
    """Feed a whole HTTP response, ``step`` bytes at a time, as the connection would."""
    rec = RequestRecord(0, 0.0)
    response = _Response(_SSEParser(rec, 0.0), future=None)
    full = b"HTTP/1.1 " + status + b"\r\nContent-Type: text/event-stream\r\n" + framing + b"\r\n\r\n" + raw
    done = False
    for i in range(0, len(full), step):
        done = response.feed(full[i:i + step], now=0.0)
    response.parser.finish(response.status)
    return rec, done


@pytest.mark.parametrize("step", [1, 3, 17, 10_000])
def test_parser_counts_only_content_chunks_however_the_bytes_are_split(step: int) -> None:
    chunk = lambda text, fin=None: {"choices": [{"index": 0, "text": text, "finish_reason": fin}]}  # noqa: E731
    raw = _stream([chunk("a"), chunk(""), chunk('"quoted" text'), chunk("\n"), chunk("", "length"),
                   {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}, "[DONE]"])
    rec, done = _parse(raw, step)
    assert done and rec.error is None
    assert len(rec.chunk_times) == 3  # "" chunks carry no token
    assert (rec.prompt_tokens, rec.output_tokens, rec.usage_reported) == (7, 5, True)


def test_parser_reads_chat_deltas_and_counts_chunks_without_usage() -> None:
    delta = lambda d: {"choices": [{"index": 0, "delta": d, "finish_reason": None}]}  # noqa: E731
    raw = _stream([delta({"role": "assistant", "content": ""}), delta({"content": "Hi"}), delta({"content": "!"}),
                   delta({}), "[DONE]"])
    rec, _ = _parse(raw, 5)
    assert len(rec.chunk_times) == 2 and rec.output_tokens == 2 and not rec.usage_reported


def test_parser_reports_in_stream_errors_and_empty_streams() -> None:
    rec, _ = _parse(_stream([{"choices": [{"text": "x"}]}, {"error": {"message": "engine died"}}]), 7)
    assert rec.error == "in-stream error: engine died"
    rec, _ = _parse(_stream(["[DONE]"]), 4)
    assert rec.error == "no content chunk in the stream"
    body = b'{"error": {"message": "bad prompt"}}'
    rec, done = _parse(body, 6, b"400 Bad Request", b"Content-Length: %d" % len(body))
    assert done and rec.error == 'HTTP 400: {"error": {"message": "bad prompt"}}'


def test_a_content_length_sse_body_is_read_to_its_end() -> None:
    sse = b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": "b"}]}\n\ndata: [DONE]\n\n'
    rec, done = _parse(sse, 9, framing=b"Content-Length: %d" % len(sse))
    assert done and rec.ok and rec.output_tokens == 2


def test_endpoint_parsing() -> None:
    assert Endpoint.parse("http://h:81/base/") == Endpoint("h", 81, "/base/v1/completions", False)
    assert Endpoint.parse("https://h") == Endpoint("h", 443, "/v1/completions", True)
    with pytest.raises(ValueError, match="--target"):
        Endpoint.parse("ftp://h")


def _closing_server_run(n: int, concurrency: int) -> tuple[list[RequestRecord], list[int]]:
    """A server that, like llama-server, closes every connection after one streamed response
    while saying nothing about it (no ``Connection: close``)."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        events = [b'data: {"choices":[{"index":0,"text":"a"}]}\n\n'] * 3 + [b"data: [DONE]\n\n"]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for e in events:
            writer.write(b"%x\r\n%s\r\n" % (len(e), e))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the client has its response and sends its next request...
        writer.close()  # ...on a connection the server now closes unanswered

    async def go() -> list[RequestRecord]:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            return await run_load(Endpoint.parse(f"http://127.0.0.1:{port}"), [_body(3)] * n, [3] * n,
                                  LoadSpec(concurrency=concurrency))
    return asyncio.run(go()), accepted


def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_fresh_one() -> None:
    records, accepted = _closing_server_run(n=6, concurrency=1)
    assert [r.error for r in records] == [None] * 6
    assert all(len(r.chunk_times) == 3 for r in records)
    assert len(accepted) == 6  # each request ended on a connection of its own
