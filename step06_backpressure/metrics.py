"""Step 06's numbers in step 05's registry (``/metrics``), read when Prometheus scrapes.

A collector rather than counters fed at each event: the backlog, the deadline policy and the gate
already count (their typed stats), so the exposed numbers cannot drift from ``/ready``'s. Names
follow step 05's ``stepserve:`` prefix:

* ``stepserve:requests_refused_total{reason}``: turned away before any work: ``overloaded`` (429),
  ``shutting_down`` (503 while draining), ``too_large`` (413);
* ``stepserve:requests_cut_total{reason}``: admitted, then ended by the server or the client:
  ``deadline`` (the request's timeout), ``slow_reader``, ``drain_timeout``, ``client_disconnect``;
* ``stepserve:admission_refused_total{reason}``: the 429s by the rule that refused them:
  ``queue_delay`` (predicted wait beyond ``--max-queue-delay``), ``timeout`` (predicted first token
  after the request's own deadline), ``in_flight`` and ``prompt_tokens`` (the hard bounds);
* ``stepserve:admission_predicted_wait_seconds``: a one-token request's predicted wait now;
  ``stepserve:step_cost_seconds{term}``: the measured step cost it comes from (``base``,
  ``per_decode_row``, ``per_prompt_token``);
* ``stepserve:admission_in_flight_requests`` / ``stepserve:admission_waiting_prompt_tokens``: what
  the hard bounds bound.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from step05_observability.metrics import PREFIX
from step06_backpressure.admission import Backlog
from step06_backpressure.deadlines import Deadlines
from step06_backpressure.gate import Gate


class BackpressureCollector:
    def __init__(self, backlog: Backlog, deadlines: Deadlines | None, gate: Gate) -> None:
        self.backlog, self.deadlines, self.gate = backlog, deadlines, gate

    def collect(self) -> Iterator[Metric]:
        g, a = self.gate.stats(), self.backlog.stats()
        deadline = self.deadlines.stats().num_deadlines_exceeded if self.deadlines is not None else 0
        yield _labelled(CounterMetricFamily, "requests_refused", "Requests turned away before any work, by reason "
                        "(overloaded: 429, shutting_down: 503, too_large: 413)", "reason",
                        (("overloaded", a.num_refused), ("shutting_down", g.num_turned_away),
                         ("too_large", g.num_too_large)))
        yield _labelled(CounterMetricFamily, "requests_cut", "Admitted requests ended early, by reason (deadline, "
                        "slow_reader, drain_timeout, client_disconnect)", "reason",
                        (("deadline", deadline), ("slow_reader", g.num_slow_reader_aborts),
                         ("drain_timeout", g.num_cut_at_drain_timeout), ("client_disconnect", g.num_disconnects)))
        yield _labelled(CounterMetricFamily, "admission_refused", "Requests answered 429, by the admission rule that "
                        "refused them (queue_delay, timeout, in_flight, prompt_tokens)", "reason",
                        a.num_refused_by_reason.items())
        if a.predicted_wait_s is not None:
            yield GaugeMetricFamily(PREFIX + "admission_predicted_wait_seconds", "Predicted wait of a one-token "
                                    "request before its prefill starts, now", value=a.predicted_wait_s)
        if (c := a.step_cost) is not None:
            yield _labelled(GaugeMetricFamily, "step_cost_seconds", "The engine's measured step cost: base + "
                            "per_decode_row x rows + per_prompt_token x tokens", "term",
                            (("base", c.base_s), ("per_decode_row", c.per_decode_s),
                             ("per_prompt_token", c.per_prefill_token_s)))
        yield GaugeMetricFamily(PREFIX + "admission_in_flight_requests", "Admitted requests not yet ended: at most "
                                "--max-seqs + --max-waiting-requests", value=a.num_in_flight)
        yield GaugeMetricFamily(PREFIX + "admission_waiting_prompt_tokens", "Prompt tokens of the admitted requests "
                                "without a first token: at most --max-waiting-prompt-tokens",
                                value=a.num_waiting_prompt_tokens)


def _labelled(family: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, help: str, label: str,
              values: Iterable[tuple[str, float]]) -> Metric:
    """One metric family with a sample per label value."""
    metric = family(PREFIX + name, help, labels=[label])
    for value, n in values:
        metric.add_metric([value], n)
    return metric
