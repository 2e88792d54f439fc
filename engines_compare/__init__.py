"""engines_compare: measure and compare OpenAI-compatible servers (our steps and other engines).

* ``python -m engines_compare bench``   load generator and latency / throughput report
* ``python -m engines_compare machine`` the machine a figure was measured on (CPU, GPU, copy bandwidth)
* ``python -m engines_compare conform`` the shared conformance suite, as a feature matrix
* ``python -m engines_compare launch``  start another engine (llama.cpp, vLLM) on a free port

Numbers follow the team guide's definitions (client-side, over streamed SSE, vLLM's meanings);
see ``engines_compare/README.md`` and :mod:`engines_compare.metrics`.
"""
