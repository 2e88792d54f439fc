"""Step 10's engine in-process on the tiny models: greedy output token for token transformers'
through the compiled runner and through the Triton kernels (interpreted on a CPU), under random
arrivals, forced preemption, prefix hits and speculative verification; no recompile as the batch
changes after the warm-up."""
from __future__ import annotations

import random

import pytest

from shared.config import ModelConfig
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step07_paged_kv.model_runner import PagedCacheConfig, build_paged_runner
from step09_speculative.__main__ import spec_core
from step09_speculative.config import SpeculativeConfig
from step10_kernels.compiled import compiled_graphs
from step10_kernels.cuda_graphs import CudaGraphRunner
from step10_kernels.model_runner import KernelsConfig, kernels_runner
from tests.step07_paged_kv.test_engine import Steps, assert_exact, run_jobs
from tests.step09_speculative.test_engine import looping_jobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(model: str, kernels: str, num_blocks: int = 20, wrap=lambda runner: runner,
         method: str = "ngram") -> tuple[AsyncEngine, Steps, dict]:
    """Step 09's core (n-gram speculation, k = 3, at every batch size) over the kernels' runner."""
    sched = SchedulerConfig(max_seqs=4, max_num_batched_tokens=16)
    cache = PagedCacheConfig(block_size=4, num_kv_blocks=num_blocks)
    spec = SpeculativeConfig(speculative_method=method, num_speculative_tokens=3, prompt_lookup_min=1,
                             speculative_max_verify_tokens=0)
    rec, build, details = Steps(), spec_core(spec, wrap), {}

    def build_core(lm) -> EngineCore:
        runner = kernels_runner(lm, RunnerConfig(1.0), KernelsConfig(kernels),
                                lambda cfg: build_paged_runner(lm, cfg, cache, explicit_len=False))
        details.update(runner.details, graphs_after_warm_up=compiled_graphs())
        return build(lm, runner, sched, cache, [rec], [])

    return AsyncEngine(ModelConfig(model=model), build_core), rec, details


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_compiled_greedy_is_exact_and_compiles_nothing_after_warm_up(model: str) -> None:
    jobs = looping_jobs(random.Random(f"compile-{model}"), 10)
    eng, rec, details = make(model, "compile")
    results, _, stats = run_jobs(eng, jobs)
    assert_exact(model, jobs, results)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert details["kernel_backend"] == "compile" and float(details["compile_s"]) > 0
    assert len({(s.num_decode_seqs, s.num_prefill_tokens) for s in rec.steps}) > 4  # batches of many shapes ...
    assert compiled_graphs() == details["graphs_after_warm_up"]  # ... and nothing recompiled


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_triton_greedy_is_exact(model: str) -> None:
    """Fewer, shorter jobs than the compiled test: the interpreter runs each kernel in numpy."""
    jobs = [(rid, ids, min(n, 12), eos, d) for rid, ids, n, eos, d in looping_jobs(random.Random(f"triton-{model}"), 5)]
    eng, rec, details = make(model, "triton", num_blocks=16)
    results, _, stats = run_jobs(eng, jobs)
    assert_exact(model, jobs, results)
    assert details["kernel_backend"] == "triton"
    assert any(s.num_prefill_seqs and s.num_decode_seqs for s in rec.steps)  # mixed batches went through the kernel
    if model == "tiny-gemma3":
        assert stats.spec_decode_num_accepted_tokens > 0  # verification rows (several queries a decode) too


def test_the_cuda_graph_path_pads_decode_batches_and_stays_exact() -> None:
    """CudaGraphRunner without capture (no GPU here): decode steps go through its static buffers,
    padded to the buckets 1, 2, 4 (padding rows write nowhere), and the output is still exact."""
    graphed = []

    def wrap(runner):
        graphed.append(CudaGraphRunner(runner, max_batch=4, capture=False))
        return graphed[0]

    lengths = (10, 6, 10, 3, 8)  # the decode batch shrinks through 3 as requests finish
    jobs = [(rid, ids, n, False, 0.0) for (rid, ids, _, _, _), n in zip(looping_jobs(random.Random("graphs"), 5), lengths)]
    eng, rec, _ = make("tiny-gemma3", "triton", num_blocks=24, wrap=wrap, method="none")
    results, _, _ = run_jobs(eng, jobs)
    assert_exact("tiny-gemma3", jobs, results)
    assert graphed[0].buckets == (1, 2, 4)
    assert graphed[0].num_graph_steps > 0 and graphed[0].num_padding_rows > 0  # 3 decodes ran as 4
