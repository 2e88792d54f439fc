"""The batched sampler honours each row's parameters, and seeded rows ignore their neighbours."""
from __future__ import annotations

import pytest
import torch

from shared.errors import RequestError
from shared.sampling import SamplingParams, finish_reason, make_generator, sample

V = 50
EOS = (1,)


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _one(logits: torch.Tensor, p: SamplingParams, out: list[int] | None = None) -> int:
    return sample(logits[None], [p], [out or []], [make_generator(p, logits.device)], EOS).token_ids[0]


def test_greedy_rows_take_the_argmax() -> None:
    x = _logits(4)
    s = sample(x, [SamplingParams(temperature=0)] * 4, [[]] * 4, [None] * 4, EOS)
    assert s.token_ids == x.argmax(-1).tolist()


def test_seeded_row_is_independent_of_batch_composition() -> None:
    x = _logits(3)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [_one(x[1], p) for _ in range(3)]
    params = [SamplingParams(temperature=0.7), p, SamplingParams(temperature=0)]
    batched = sample(x, params, [[]] * 3, [None, make_generator(p, x.device), None], EOS,
                     shared_generator=torch.Generator().manual_seed(9)).token_ids[1]
    assert alone == [batched] * 3


def test_different_seeds_draw_differently() -> None:
    x = torch.zeros(V)  # uniform: any fixed choice would be a bug
    draws = {_one(x, SamplingParams(temperature=1.0, seed=s)) for s in range(20)}
    assert len(draws) > 5


def test_top_k_keeps_only_the_k_best() -> None:
    x = _logits(1)[0]
    best = set(x.topk(3).indices.tolist())
    draws = {_one(x, SamplingParams(temperature=5.0, top_k=3, seed=s)) for s in range(200)}
    assert draws <= best and len(draws) == 3


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)))
    draws = {_one(x, SamplingParams(temperature=1.0, top_p=0.7, seed=s)) for s in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; the third is not needed


def test_min_p_drops_tokens_below_the_fraction_of_the_best() -> None:
    x = torch.log(torch.tensor([0.4, 0.3, 0.25, 0.05] + [1e-9] * (V - 4)))
    draws = {_one(x, SamplingParams(temperature=1.0, min_p=0.5, seed=s)) for s in range(300)}
    assert draws == {0, 1, 2}  # 0.05 < 0.5 * 0.4


def test_penalties_subtract_presence_and_frequency() -> None:
    x = torch.zeros(V)
    x[7], x[8] = 1.0, 0.9
    p = SamplingParams(temperature=0, frequency_penalty=0.2, presence_penalty=0.0)
    assert _one(x, p, out=[7]) == 8  # 1.0 - 0.2 < 0.9
    assert _one(x, SamplingParams(temperature=0, presence_penalty=0.2), out=[7]) == 8
    assert _one(x, SamplingParams(temperature=0), out=[7]) == 7


def test_min_tokens_masks_eos_until_reached() -> None:
    x = torch.zeros(V)
    x[EOS[0]] = 10.0
    p = SamplingParams(temperature=0, min_tokens=2, max_tokens=5)
    assert _one(x, p, out=[3]) != EOS[0]
    assert _one(x, p, out=[3, 4]) == EOS[0]


def test_logprobs_are_raw_log_softmax_with_top_k() -> None:
    x = _logits(1)
    s = sample(x, [SamplingParams(temperature=0, logprobs=3)], [[]], [None], EOS)
    ref = torch.log_softmax(x[0], -1)
    assert s.logprobs[0] == pytest.approx(float(ref.max()))
    assert [t for t, _ in s.top_logprobs[0]] == ref.topk(3).indices.tolist()


def test_finish_reasons() -> None:
    p = SamplingParams(max_tokens=3, stop_token_ids=(9,))
    assert finish_reason(1, 1, p, EOS) == "stop"
    assert finish_reason(9, 1, p, EOS) == "stop"
    assert finish_reason(5, 3, p, EOS) == "length"
    assert finish_reason(5, 2, p, EOS) is None
    assert finish_reason(1, 1, SamplingParams(ignore_eos=True), EOS) is None


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -0.5), ("temperature", float("nan")),
                                         ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("min_p", 1.5),
                                         ("presence_penalty", 3.0), ("logprobs", 21)])
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(RequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and field in e.value.message


def test_a_seed_outside_what_torch_takes_is_a_400_naming_seed() -> None:
    for seed in (-2**63, 0, 2**64 - 1):
        make_generator(SamplingParams(seed=seed), torch.device("cpu"))  # all accepted by torch
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(RequestError) as e:
            SamplingParams(seed=seed)
        assert e.value.param == "seed" and e.value.status == 400
