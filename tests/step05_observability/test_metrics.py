"""Step 05's observers in-process: what each callback records, the JSON log line, one registry per engine."""
from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from step04_kvcache.engine import EngineStats
from step04_kvcache.observer import RequestStats, StepStats
from step04_kvcache.scheduler import SchedulerStats
from step05_observability.metrics import EngineMetrics, new_registry
from step05_observability.request_log import JsonFormatter, RequestLog, request_record


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def step(t: float, decodes: int, prefills: int = 0, prefill_tokens: int = 0, sampled: int | None = None) -> StepStats:
    return StepStats(time=t, num_decode_seqs=decodes, num_prefill_seqs=prefills, num_prefill_tokens=prefill_tokens,
                     num_sampled=decodes + prefills if sampled is None else sampled, num_running=decodes + prefills,
                     num_waiting=0, kv_slots_used=decodes + prefills, kv_slots_total=4, schedule_s=0.001,
                     prepare_s=0.001, model_s=0.05, sample_s=0.001, step_s=0.06)


def test_step_callbacks_count_tokens_and_observe_itl_once_per_decoding_sequence() -> None:
    m = EngineMetrics(CollectorRegistry())
    m.on_step(step(10.0, decodes=0, prefills=2, prefill_tokens=12))  # two prompts end: 2 first tokens
    m.on_step(step(10.2, decodes=2))
    m.on_step(step(10.5, decodes=2, prefills=1, prefill_tokens=5, sampled=2))  # a chunk that samples nothing
    s = samples(m.registry)
    assert s[("stepserve:prompt_tokens_total", ())] == 17
    assert s[("stepserve:generation_tokens_total", ())] == 6
    assert s[("stepserve:inter_token_latency_seconds_count", ())] == 4  # 2 decodes x 2 steps after the first
    assert abs(s[("stepserve:inter_token_latency_seconds_sum", ())] - (2 * 0.2 + 2 * 0.3)) < 1e-9
    assert s[("stepserve:engine_step_time_seconds_count", (("phase", "prefill"),))] == 2
    assert s[("stepserve:engine_step_time_seconds_count", (("phase", "decode"),))] == 1
    assert s[("stepserve:step_batch_size_sum", ())] == 2 + 2 + 3
    assert s[("stepserve:iteration_tokens_total_sum", ())] == 12 + 2 + 7


def test_request_callback_observes_latencies_and_finish_reasons() -> None:
    m = EngineMetrics(CollectorRegistry())
    m.on_request_finished(RequestStats("a-0", 1.0, 3.0, 7.0, 10, 5, "length", first_scheduled_time=1.5))
    m.on_request_finished(RequestStats("b-0", 2.0, None, 2.5, 4, 0, "abort"))  # aborted while waiting
    s = samples(m.registry)
    reasons = {dict(k[1])["finished_reason"]: v for k, v in s.items() if k[0] == "stepserve:request_success_total"}
    assert reasons == {"stop": 0, "length": 1, "abort": 1, "error": 0}
    assert s[("stepserve:time_to_first_token_seconds_count", ())] == 1
    assert s[("stepserve:time_to_first_token_seconds_sum", ())] == 2.0
    assert s[("stepserve:e2e_request_latency_seconds_sum", ())] == 6.0 + 0.5
    assert s[("stepserve:request_queue_time_seconds_sum", ())] == 0.5
    assert s[("stepserve:request_prefill_time_seconds_sum", ())] == 1.5
    assert s[("stepserve:request_decode_time_seconds_sum", ())] == 4.0
    assert s[("stepserve:request_time_per_output_token_seconds_sum", ())] == 1.0  # 4 s over 4 gaps
    assert s[("stepserve:request_generation_tokens_sum", ())] == 5


def test_request_log_writes_one_json_line_with_the_timings() -> None:
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test_step05_request_log")
    logger.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        RequestLog(logger).on_request_finished(RequestStats("my-id-0", 1.0, 3.0, 7.0, 10, 5, "stop", 1.25))
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["ts"].endswith("Z") and "\n" not in JsonFormatter().format(records[0])
    assert {k: line[k] for k in ("request_id", "finish_reason", "prompt_tokens", "output_tokens")} == \
        {"request_id": "my-id-0", "finish_reason": "stop", "prompt_tokens": 10, "output_tokens": 5}
    assert (line["queue_time_s"], line["ttft_s"], line["prefill_time_s"], line["decode_time_s"], line["e2e_s"],
            line["tpot_s"]) == (0.25, 2.0, 1.75, 4.0, 6.0, 1.0)
    never_ran = request_record(RequestStats("x-0", 1.0, None, 2.0, 3, 0, "abort"))
    assert never_ran["ttft_s"] is None and never_ran["queue_time_s"] is None and never_ran["e2e_s"] == 1.0


def test_each_engine_has_its_own_registry_and_gauges_read_its_stats_at_scrape_time() -> None:
    a, b = EngineMetrics(new_registry()), EngineMetrics(new_registry())  # a second engine: no duplicate-name clash
    assert a.registry is not b.registry
    now = {"stats": EngineStats(0, 0, None, {})}  # loading: no scheduler yet
    a.bind_gauges(lambda: now["stats"])
    a.on_step(step(1.0, decodes=0, prefills=1, prefill_tokens=3))
    sa, sb = samples(a.registry), samples(b.registry)
    assert sa[("stepserve:generation_tokens_total", ())] == 1 and sb[("stepserve:generation_tokens_total", ())] == 0
    assert sa[("stepserve:num_requests_running", ())] == 0 and "process_resident_memory_bytes" in {k[0] for k in sa}
    now["stats"] = EngineStats(5, 2, SchedulerStats(3, 4, 60, 100, 0.6), {})
    sa = samples(a.registry)
    assert (sa[("stepserve:num_requests_running", ())], sa[("stepserve:num_requests_waiting", ())],
            sa[("stepserve:kv_cache_usage_perc", ())]) == (3, 4 + 2, 0.6)
