"""The Engine protocol: the seam between HTTP (``shared.api``) and inference (each step).

The API turns a request into one :class:`GenerationRequest` per choice and reads what
``generate`` yields back: one :class:`RequestFacts` at most (facts about the request that the
engine learns once, before its first token: prompt tokens found in a prefix cache), then one
:class:`TokenEvent` per generated token. The API knows nothing of batching. An engine knows
nothing of HTTP or text: it works in token ids, and stops on token-level rules (EOS, stop token
ids, max_tokens). Stop *strings* need text, so the API's output processor finds them and calls
:meth:`Engine.abort`, the same call it makes when a client disconnects: cancellation is a
first-class event.

``stats()`` returns a frozen dataclass (each step's own; from step 04 on it holds one dataclass
per part of the engine): ``/health`` serves it as JSON with :func:`dataclasses.asdict`, and
metrics read its fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Protocol

from shared.sampling import SamplingParams


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float  # time.monotonic()
    timeout: float | None = None  # the client's deadline in seconds from arrival (honoured from step 06 on)


@dataclasses.dataclass(frozen=True, slots=True)
class PromptLogprob:
    """The log-probability of one prompt token given the tokens before it, and the top k there."""

    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the engine learned about a request before its first token; yielded once, first."""

    num_cached_tokens: int | None = None  # prompt tokens taken from a prefix cache (step 07); None: no cache
    # With ``params.prompt_logprobs``: one entry per prompt token, the first None (nothing precedes it).
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token. ``finish_reason`` is set on a request's last event only."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the API needs to know about the served model before any request."""

    name: str
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    max_model_len: int
    vocab_size: int
    prompt_logprobs: bool = False  # the engine computes prompt logprobs (``echo`` with ``logprobs``)
    runtime: tuple[tuple[str, str], ...] = ()  # how the model runs (dtype, quantization, kernels), for
    # /health and /v1/models


class Engine(Protocol):
    async def start(self) -> None:
        """Load what the engine needs; ``/health`` answers 503 until it returns."""

    def info(self) -> ModelInfo | None:
        """The served model, or None while loading."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestFacts | TokenEvent]:
        """Stream the tokens of one sequence; the last event carries ``finish_reason``."""

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, stop string found); its iterator then ends.

        Synchronous and non-blocking on purpose: it is called from ``finally`` blocks of tasks
        that are being cancelled, where nothing may be awaited."""

    def stats(self) -> Any:
        """A frozen dataclass of counters, for ``/health`` and metrics."""

    def error(self) -> str | None:
        """Why the engine can no longer serve (its engine thread died), or None. ``/health`` then
        answers 503 ``failed`` with it, and so does every new request, at once."""

    async def shutdown(self) -> None:
        """Release threads and memory."""
