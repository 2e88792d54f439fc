"""Step 06 — backpressure: refuse what cannot be served, fast, and never lose a request.

Central rule: work is admitted only while it stays within bounds (requests in flight: the rows
plus ``--max-waiting-requests``; prompt tokens waiting for their first token); beyond them the
answer is an immediate 429 with ``Retry-After`` and OpenAI's error object, so the requests already
admitted keep their latency.

What it adds to step 05 (files in this package; ``__main__.py`` assembles step 05's engine with
the two policies: ``AsyncEngine(..., request_policies=[backlog])`` around
``EngineCore(..., policies=[deadlines])``):

* ``admission.py``: ``AdmissionConfig`` (``--max-waiting-requests``, ``--max-waiting-prompt-tokens``,
  ``--retry-after``, ``--request-timeout``) and the ``Backlog`` the API admits into; it is also the
  engine's request policy (claimed when the engine starts a request, freed when it ends);
* ``deadlines.py``: ``Deadlines``, a step policy of the engine core: an error before the first
  token, ``finish_reason`` "length" after it;
* ``gate.py``: ``Gate``, an ASGI middleware: body size (413), disconnects cancel at once, slow
  readers (a bounded per-stream outbox; overflow aborts that stream), graceful shutdown on SIGTERM
  (503 while draining, ``--drain-timeout``);
* ``app.py``: ``BackpressureServer`` (limits: ``--max-prompt-tokens``, ``--max-output-tokens``,
  400; the ``timeout`` field; admission before the response starts) and ``make_app`` with
  ``GET /ready`` (200 ready; 503 loading / overloaded / draining).

Left out on purpose: priorities and fairness between clients (one FIFO backlog; no per-client
quotas or rate limits), preemption of running requests to make room (step 07), load shedding of
already admitted work, adaptive bounds (the bounds are flags, sized from a measured capacity),
and HTTP/2 flow control.
"""
