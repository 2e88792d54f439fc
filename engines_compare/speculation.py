"""What a server's speculative decoding did during one load point, from its Prometheus counters.

vLLM, llama.cpp's ``llama-server`` and the steps (09 on) all export vLLM's counters, each under its
own prefix (``vllm:``, ``llamacpp:``, ``stepserve:``): ``spec_decode_num_drafts`` (vLLM and the
steps), ``spec_decode_num_draft_tokens`` and ``spec_decode_num_accepted_tokens``. The bench reads
them before and after a point; the difference gives the point's acceptance rate (accepted / draft
tokens) and, where drafts are counted, the mean acceptance length (1 + accepted / drafts: tokens
per verified sequence step), vLLM's definitions. A server without the counters gives None.
"""
from __future__ import annotations

import re
from typing import Any

import httpx

_COUNTER = re.compile(r"^[A-Za-z_]\w*:spec_decode_(num_drafts|num_draft_tokens|num_accepted_tokens)_total(?:\{\})?\s+(\S+)$")


def counters(url: str) -> dict[str, float] | None:
    """The three counters now, or None if the server has no /metrics or exports none of them."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = {m.group(1): float(m.group(2)) for m in map(_COUNTER.match, text.splitlines()) if m}
    return found or None


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """The point's counts, acceptance rate and mean acceptance length (None where not counted)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens, accepted, drafts = d.get("num_draft_tokens", 0.0), d.get("num_accepted_tokens", 0.0), d.get("num_drafts")
    return {**{k: int(v) for k, v in d.items()},
            "acceptance_rate": accepted / tokens if tokens else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None}
