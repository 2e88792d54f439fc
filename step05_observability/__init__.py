"""Step 05 — observability: Prometheus metrics at ``/metrics``, a JSON log line per request, X-Request-Id.

Central rule: observation never sits on the engine's path. Step 04's engine core already reports
each step and each finished request to its observers (``step04_kvcache/observer.py``); step 05
only adds two observers, with callbacks that add to counters and histograms (microseconds, on the
engine thread), and reads its gauges (running, waiting, KV-cache usage) from the engine's typed
stats at scrape time, on the event loop.

What it adds: two parts, assembled into step 04's engine in ``__main__.py``
(``EngineCore(..., observers=[metrics, request_log])``): ``EngineMetrics`` (``metrics.py``: vLLM's
metric meanings under the ``stepserve:`` prefix, in a per-engine ``CollectorRegistry``) and
``RequestLog`` (``request_log.py``: one JSON line per finished request, ``--request-log``).
``make_app`` (``app.py``) adds ``GET /metrics`` to the shared API, which uses a client's
``X-Request-Id`` as the base of its engine request ids and echoes it (or the generated id).
Ops files for Prometheus, Grafana and docker-compose are in ``ops/``.

Left out on purpose: tracing (OpenTelemetry spans), per-token timestamps in the engine (the
inter-token latency is the engine's step-to-step interval, observed once per decoding sequence),
multi-process metric aggregation, and alerting rules.
"""
