"""Step 10 on a CUDA GPU (skipped without one): the Triton path with and without CUDA graphs,
greedy token for token transformers' on the tiny models in float32 (the exactness dtype), decode
batches padded into graph buckets included; the attention kernel against torch in bf16.

Built from the parts directly (not ``__main__``, whose imports need the HTTP server), so that it
runs on a machine with torch, transformers and triton only.
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from shared.engine import GenerationRequest, TokenEvent
from shared.models import load_model
from shared.config import ModelConfig
from shared.sampling import SamplingParams
from step04_kvcache.engine_core import EngineCore, Entry
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.model_runner import PagedCacheConfig, build_paged_runner
from step07_paged_kv.scheduler import PagedScheduler
from step10_kernels.gpu_bench import attention_point
from step10_kernels.model_runner import KernelsConfig, cuda_graph_wrapper, kernels_runner
from tests.helpers import reference_greedy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_triton_on_cuda_is_exact_with_and_without_graphs(model: str, graphs: bool) -> None:
    lm = load_model(ModelConfig(model=model, device="cuda", dtype="float32"))
    sched, cache = SchedulerConfig(max_seqs=5, max_num_batched_tokens=24), PagedCacheConfig(block_size=4, num_kv_blocks=128)
    cfg = KernelsConfig(kernels="triton", enforce_eager=not graphs)
    runner = kernels_runner(lm, RunnerConfig(1.0), cfg, lambda c: build_paged_runner(lm, c, cache, explicit_len=False))
    runner = cuda_graph_wrapper(cfg, sched.max_seqs)(runner)
    core = EngineCore(PagedScheduler(sched, runner.max_len, lm.eos_token_ids, BlockManager(128, 4)), runner)
    rng = random.Random(model)
    jobs = {f"r{i}": [2, *(rng.randrange(6, 262) for _ in range(rng.randint(3, 30)))] for i in range(5)}
    entries = {rid: Entry(GenerationRequest(rid, tuple(ids), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                                            time.monotonic()), asyncio.Queue()) for rid, ids in jobs.items()}
    for e in entries.values():
        core.add(e)
    got: dict[str, list[int]] = {rid: [] for rid in jobs}
    while core.has_work():
        for entry, item in core.step():
            if isinstance(item, TokenEvent):
                got[entry.request.request_id].append(item.token_id)
    for rid, ids in jobs.items():
        assert got[rid] == reference_greedy(model, ids, 30, stop_at_eos=False)[0], rid
    if graphs:
        assert runner.num_graph_steps > 0 and runner.num_padding_rows > 0  # e.g. 3 decodes ran as 4


@pytest.mark.parametrize("hkv,group,dim", [(1, 4, 256), (8, 4, 128)])
def test_decode_attention_kernel_matches_torch_in_bf16(hkv: int, group: int, dim: int) -> None:
    point = attention_point(torch.device("cuda"), 16, 1000, hkv, group, dim, torch.bfloat16, check=True)
    assert point["splits"] > 1  # 16 sequences cannot fill an H200's SMs without flash-decoding splits
