"""Step 06 — backpressure: refuse what cannot be served, fast, and never lose a request.

Central rule: a request is admitted only if its predicted wait for a first token, behind the work
already admitted and at the engine's measured step cost, is within ``--max-queue-delay`` (and its
own ``timeout``); otherwise the answer is an immediate 429 with ``Retry-After`` (the predicted time
until it would fit) and OpenAI's error object, so the requests already admitted keep their latency.

What it adds to step 05 (files in this package; ``__main__.py`` assembles step 05's engine with
an observer and two policies: ``AsyncEngine(..., request_policies=[backlog])`` around
``EngineCore(..., observers=[..., cost], policies=[deadlines])``):

* ``step_cost.py``: ``StepCostModel``, an observer fitting a step's time to its decode rows and
  prompt tokens; ``calibrate`` measures it at start-up on a throwaway core over the same runner;
* ``predicted_wait.py``: ``predict``, the admitted requests replayed over the rows at that cost;
* ``admission.py``: ``AdmissionConfig`` (``--max-queue-delay``; hard bounds for memory:
  ``--max-waiting-requests``, ``--max-waiting-prompt-tokens``; ``--retry-after``,
  ``--request-timeout``) and the ``Backlog`` the API admits into; it is also the engine's request
  policy (claimed when the engine starts a request, tokens counted, freed when it ends);
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
already admitted work, a prediction that knows about end-of-sequence or prefix-cache hits (it
assumes every request runs to ``max_tokens`` with an uncached prompt: it errs towards refusing),
and HTTP/2 flow control.
"""
