"""Step 06 over HTTP, on a real server: refusals, deadlines, disconnect storms, a slow reader, and a
short overload run through the harness. Counts and behaviours only, never timings."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import socket
import time
from typing import Any

import httpx
import pytest

from engines_compare import loadgen

STEP, MODEL = "step06_backpressure", "tiny-llama"
FLAGS = ("--max-seqs", "10", "--max-waiting-requests", "3", "--max-waiting-prompt-tokens", "2000",
         "--max-buffered-chunks", "8", "--threads", "1")
LONG = {"prompt": "Hi", "max_tokens": 480, "ignore_eos": True, "temperature": 0}


def server(servers: Any) -> str:
    return servers(STEP, MODEL, *FLAGS).url


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, Any]:
    """/ready once nothing runs, waits or is buffered: every row and every reservation is back."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(url + "/ready", timeout=10).json()
        s, a = r["scheduler"], r["policies"]["admission"]
        idle = (s["kv_slots_used"], s["num_running"], s["num_waiting"] + r["num_pending"], a["num_in_flight"],
                a["num_waiting_prompt_tokens"], r["gate"]["num_in_flight"]) == (0, 0, 0, 0, 0, 0)
        if idle or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def raw_post(url: str, body: dict[str, Any], path: str = "/v1/completions", rcvbuf: int | None = None) -> socket.socket:
    """Send a request on a plain socket and return it unread (a client that may never read)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def assert_refusal(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and "type" in err and "param" in err, err
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1


def test_burst_beyond_the_backlog_is_refused_with_429_and_nothing_is_lost(servers) -> None:
    url = server(servers)
    wait_idle(url)
    with httpx.Client(timeout=120) as c:  # fill every row, so the burst can only wait or be refused
        blockers = [raw_post(url, {**LONG, "n": 10})]
        while c.get(url + "/ready").json()["scheduler"]["kv_rows_used"] < 10:
            time.sleep(0.02)

        def one(i: int) -> httpx.Response:
            return httpx.post(url + "/v1/completions", json={"prompt": f"{i} hi", "max_tokens": 4, "ignore_eos": True},
                              timeout=120)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
        for s in blockers:
            s.close()
    done = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    for r in refused:
        assert_refusal(r, 429, "server_overloaded")
    for r in done:
        assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 4
    # With the 10 rows busy for ~470 more steps, none may wait (and the hard bound lets only 3 try).
    assert len(refused) >= 9 and len(done) + len(refused) == 12, [r.status_code for r in responses]
    admission = wait_idle(url)["policies"]["admission"]
    assert admission["num_refused"] >= 9
    # rows held for ~470 more steps: the predicted wait refused them, with the wait in the message
    assert admission["num_refused_by_reason"]["queue_delay"] >= 9 and admission["step_cost"]["num_steps"] > 0
    assert admission["predicted_wait_s"] == 0.0  # idle again
    assert any("predicted wait" in r.json()["error"]["message"] for r in refused)
    metrics = httpx.get(url + "/metrics").text  # step 05's registry counts them too

    def value(prefix: str) -> float:
        return float(next(x for x in metrics.splitlines() if x.startswith(prefix)).split()[-1])

    assert value('stepserve:requests_refused_total{reason="overloaded"}') >= 9
    assert value('stepserve:admission_refused_total{reason="queue_delay"}') >= 9
    assert value("stepserve:admission_predicted_wait_seconds") == 0.0
    assert value('stepserve:step_cost_seconds{term="base"}') > 0


@pytest.mark.parametrize("predicted", [True, False], ids=["predicted-wait", "bounds-only"])
def test_a_timeout_shorter_than_the_wait_is_a_429_at_once_or_without_prediction_a_504(servers, predicted) -> None:
    """With every row held for ~470 more steps, a 0.2 s timeout cannot be met: the predicted-wait rule
    refuses it at once (429 naming ``timeout``, Retry-After); with it off (``--max-queue-delay 0``) the
    request is admitted and fails at its deadline (504)."""
    url = server(servers) if predicted else servers(STEP, MODEL, *FLAGS, "--max-queue-delay", "0").url
    wait_idle(url)
    blocker = raw_post(url, {**LONG, "n": 10})
    try:
        while httpx.get(url + "/ready").json()["scheduler"]["kv_rows_used"] < 10:
            time.sleep(0.02)
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "timeout": 0.2}, timeout=60)
        assert_refusal(r, 429 if predicted else 504, "server_overloaded" if predicted else "deadline_exceeded")
        assert r.json()["error"]["param"] == "timeout"
        if predicted:  # refused before any work (no deadline passed: the counter below stays 0)
            assert "timeout" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1, r.text
    finally:
        blocker.close()
    a = wait_idle(url)
    if predicted:
        assert a["policies"]["admission"]["num_refused_by_reason"]["timeout"] >= 1
        assert a["policies"]["deadlines"]["num_deadlines_exceeded"] == 0
    else:
        assert a["policies"]["deadlines"]["num_deadlines_exceeded"] >= 1


def test_storm_of_disconnects_returns_every_row_and_reservation(servers) -> None:
    url = server(servers)
    wait_idle(url)
    before = httpx.get(url + "/ready").json()["num_generated_tokens"]
    socks = [raw_post(url, {**LONG, "stream": bool(i % 2), "prompt": f"{i} storm"}) for i in range(24)]
    time.sleep(0.3)  # some run, some wait, some were refused
    for s in socks[:12]:  # half of them go at once, the rest after reading a little
        s.close()
    for s in socks[12:]:
        s.settimeout(30)
        s.recv(64)
        s.close()
    after = wait_idle(url)
    s, a = after["scheduler"], after["policies"]["admission"]
    assert (s["kv_slots_used"], s["num_running"], a["num_in_flight"]) == (0, 0, 0), after
    assert after["num_generated_tokens"] - before < 24 * 480 // 2, "the disconnected requests ran on"
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_slow_reader_does_not_stall_others_and_is_aborted_at_its_bound(servers) -> None:
    url = server(servers)
    wait_idle(url)
    before = httpx.get(url + "/ready").json()["gate"]["num_slow_reader_aborts"]
    # Chat chunks with 20 top logprobs are ~1.6 KB: 8 choices outgrow the kernel's socket buffers.
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 470, "ignore_eos": True, "n": 8,
            "stream": True, "logprobs": True, "top_logprobs": 20}
    slow = raw_post(url, body, "/v1/chat/completions", rcvbuf=2048)  # and never reads
    try:
        others = [httpx.post(url + "/v1/completions", json={"prompt": f"{i} other", "max_tokens": 40,
                                                            "ignore_eos": True}, timeout=120) for i in range(2)]
        assert [r.json()["usage"]["completion_tokens"] for r in others] == [40, 40]
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready").json()["gate"]["num_slow_reader_aborts"] == before:
            assert time.monotonic() < deadline, "the slow reader was never aborted"
            time.sleep(0.05)
        idle = wait_idle(url)  # while the slow client is still connected, reading nothing
        assert idle["scheduler"]["kv_slots_used"] == 0 and idle["num_generated_tokens"] > 0, idle
    finally:
        slow.close()


def test_short_overload_every_request_completes_or_is_refused_fast(servers) -> None:
    """The benchmark's overload run in small: an open-loop burst far above what the server holds."""
    url = server(servers)
    wait_idle(url)
    n = 60
    bodies = [json.dumps({"prompt": f"{i} overload", "max_tokens": 24, "ignore_eos": True, "stream": True,
                          "stream_options": {"include_usage": True}}).encode() for i in range(n)]
    spec = loadgen.LoadSpec(request_rate=200.0, seed=1, timeout_s=120)
    records = asyncio.run(loadgen.run_load(loadgen.Endpoint.parse(url), bodies, [24] * n, spec))
    complete = [r for r in records if r.ok and r.output_tokens == 24]
    refused = [r for r in records if r.status in (429, 503) and '"error"' in (r.error or "")]
    assert len(complete) + len(refused) == n, [(r.status, r.error) for r in records if r not in complete + refused]
    assert complete and refused, (len(complete), len(refused))
    assert wait_idle(url)["scheduler"]["kv_slots_used"] == 0


def test_sigterm_drains_the_running_stream_to_its_end_then_exits(tmp_path) -> None:
    from tests.conftest import Server

    srv = Server(STEP, MODEL, ("--threads", "1", "--drain-timeout", "60"), tmp_path)
    try:
        srv.wait_ready()
        body = {**LONG, "max_tokens": 200, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-3][6:])["choices"][0]["finish_reason"] == "length"
        assert first and json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 200  # all of it
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert "draining: 1 requests in flight" in srv.log.read_text()
    finally:
        srv.stop()
