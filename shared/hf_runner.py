"""The transformers decode loop of steps 00-03's single-sequence path, and a thread bridge.

Steps 00-03 teach serving, not model code, so the forward pass, weights and KV cache
(``DynamicCache``) are transformers'. We drive ``model.forward`` ourselves rather than calling
``model.generate`` because a server needs, per token: a streamed event, raw log-probabilities,
per-request seeds and penalties the way the API defines them, and a cancellation check. The
calls match what ``generate`` makes (prefill of the whole prompt, then one token at a time with
the cache), and the tests compare greedy output with ``generate`` token for token.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator

import torch

from shared.engine import GenerationRequest, TokenEvent
from shared.models import LoadedModel
from shared.sampling import finish_reason, make_generator, sample


def generate_tokens(lm: LoadedModel, request: GenerationRequest, cancelled: threading.Event) -> Iterator[TokenEvent]:
    """Yield one :class:`TokenEvent` per generated token; stop early when ``cancelled`` is set."""
    from transformers import DynamicCache

    params = request.params
    gen = make_generator(params, lm.device)
    out: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor([request.prompt_token_ids], device=lm.device)  # [1, S]
        cache = DynamicCache(config=lm.model.config)
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]  # [1, V]
        while not cancelled.is_set():
            s = sample(logits, [params], [out], [gen], lm.eos_token_ids)
            token = s.token_ids[0]
            out.append(token)
            reason = finish_reason(token, len(out), params, lm.eos_token_ids)
            yield TokenEvent(token, s.logprobs[0], s.top_logprobs[0], reason)
            if reason is not None:
                return
            ids = torch.tensor([[token]], device=lm.device)  # [1, 1]
            mask = torch.ones(1, len(request.prompt_token_ids) + len(out), dtype=torch.long, device=lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                              use_cache=True).logits[:, -1]


async def iterate_in_thread(make: Callable[[threading.Event], Iterator[TokenEvent]],
                            cancelled: threading.Event) -> AsyncIterator[TokenEvent]:
    """Run a blocking token iterator on its own thread and stream its items to the event loop.

    Closing this async iterator (client gone, abort) sets ``cancelled``, which the blocking loop
    checks before every token: the thread stops within one token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work() -> None:
        try:
            for item in make(cancelled):
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as e:  # hand the failure to the awaiting side
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    thread = threading.Thread(target=work, name="generate", daemon=True)
    thread.start()
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
