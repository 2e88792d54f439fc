"""Sampling parameters, a batched sampler, and the token-level stop rules.

Order of operations per row, as in vLLM: log-probabilities are taken from the raw logits (what
``logprobs`` reports); then presence/frequency penalties on the tokens generated so far; min_tokens
masks EOS; temperature 0 is greedy (argmax); otherwise temperature, top-k, top-p, min-p, and a
draw. The draw is ``argmax(probs / q)`` with ``q ~ Exponential(1)`` (an exact categorical
sample), and ``q`` comes from the row's own ``torch.Generator`` when it has a seed: a seeded row's
tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from shared.errors import RequestError

MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: the chosen token's plus the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's plus the top k (vLLM's)

    def __post_init__(self) -> None:
        def bad(field: str, rule: str, value: object) -> RequestError:
            return RequestError(f"{field} must be {rule}, got {value!r}", param=field)

        if self.max_tokens < 1:
            raise bad("max_tokens", ">= 1", self.max_tokens)
        if not self.temperature >= 0.0:  # also refuses NaN
            raise bad("temperature", ">= 0", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if self.top_k < -1:
            raise bad("top_k", "-1, 0 (no limit) or a positive number", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]", getattr(self, name))
        for name in ("logprobs", "prompt_logprobs"):
            if (k := getattr(self, name)) is not None and not 0 <= k <= MAX_LOGPROBS:
                raise bad(name, f"in [0, {MAX_LOGPROBS}]", k)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", "in [0, max_tokens]", self.min_tokens)
        if any(not s for s in self.stop):
            raise bad("stop", "non-empty strings", self.stop)
        if self.seed is not None and not -2**63 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise bad("seed", "in [-2**63, 2**64) (choice i of n uses seed + i)", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[tuple[tuple[int, float], ...] | None]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A row's own random stream when it has a seed; unseeded rows share the engine's."""
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def finish_reason(token_id: int, num_output: int, params: SamplingParams,
                  eos_token_ids: Sequence[int]) -> str | None:
    """Token-level stop rules, checked after each token: EOS, stop_token_ids, max_tokens."""
    if num_output >= params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            return "stop"
        if token_id in params.stop_token_ids:
            return "stop"
    if num_output >= params.max_tokens:
        return "length"
    return None


def apply_penalties(logits: torch.Tensor, params: SamplingParams, output_ids: Sequence[int]) -> None:
    if not output_ids or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return
    counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)
    logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on one row [V]; returns probabilities."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p  # keep the first
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs [V]``: ``argmax(probs / q)``, ``q ~ Exponential(1)`` from ``generator``."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / q).argmax())


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]],
           generators: Sequence[torch.Generator | None], eos_token_ids: Sequence[int],
           shared_generator: torch.Generator | None = None) -> SampleOutput:
    """Choose one token per row of ``logits`` [B, V], each row by its own parameters."""
    logits = logits.float()
    want_lp = [p.logprobs is not None for p in params]
    raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
    greedy_rows = [i for i, p in enumerate(params) if p.greedy and is_plain(p, output_ids[i])]
    tokens = [0] * len(params)
    if greedy_rows:  # the common benchmark case: one argmax over the batch
        rows = logits if len(greedy_rows) == len(params) else logits[greedy_rows]  # all greedy: no copy
        picked = rows.argmax(dim=-1).tolist()
        for i, tok in zip(greedy_rows, picked):
            tokens[i] = tok
    for i, p in enumerate(params):
        if i in greedy_rows:
            continue
        row = logits[i].clone()
        apply_penalties(row, p, output_ids[i])
        if len(output_ids[i]) < p.min_tokens:
            row[list(eos_token_ids)] = float("-inf")
        if p.greedy:
            tokens[i] = int(row.argmax())
            continue
        tokens[i] = draw(filtered_probs(row, p), generators[i] or shared_generator)
    lps: list[float | None] = [None] * len(params)
    tops: list[tuple[tuple[int, float], ...] | None] = [None] * len(params)
    if raw_lp is not None:
        for i, p in enumerate(params):
            if not want_lp[i]:
                continue
            lps[i] = float(raw_lp[i, tokens[i]])
            if p.logprobs:
                vals, ids = torch.topk(raw_lp[i], p.logprobs)
                tops[i] = tuple(zip(ids.tolist(), vals.tolist()))
            else:
                tops[i] = ()
    return SampleOutput(token_ids=tokens, logprobs=lps, top_logprobs=tops)


def is_plain(p: SamplingParams, output_ids: Sequence[int]) -> bool:
    """Greedy with nothing that changes the logits first."""
    return (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
            and len(output_ids) >= p.min_tokens)
