"""Every GPU figure step 10's README asks for, in one run (``python -m step10_kernels.gpu_bench``).

1. The device's copy bandwidth (read + write bytes of a 2 GiB ``copy_`` / time): the denominator.
2. The decode attention kernel's achieved bandwidth: K/V and block-table bytes read / time, for
   16-64 sequences x 1k-8k tokens, Gemma 3 270M's heads (1 KV head x 4 queries x 256) and a Llama
   8B-like layer's (8 x 4 x 128), bf16, blocks of 16 in a shuffled pool; checked against the torch
   backend first.
3. End to end in-process (no HTTP: the device image has no web stack): output tok/s of the engine
   (paged scheduler, no speculation) at 1 and 64 concurrent requests of 128 prompt + 128 output
   tokens, for the torch path, Triton without CUDA graphs and Triton with them, in bf16. The
   weights are random (no checkpoint reaches the device machine) in the default model's shape,
   which is all that speed depends on; ``ignore_eos`` keeps every output at 128 tokens.

``--smoke`` runs all three on tiny shapes (on a CPU under ``TRITON_INTERPRET=1``): the test suite
does, so the script is known to run before a GPU is ever lent. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch

from shared.attention import TorchAttentionBackend, build_batch
from shared.engine import GenerationRequest, TokenEvent
from shared.models import LoadedModel
from shared.sampling import SamplingParams
from step04_kvcache.engine_core import EngineCore, Entry
from step04_kvcache.model_runner import ModelRunner, RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.model_runner import PagedCacheConfig, build_paged_runner
from step07_paged_kv.paged_cache import PagedKVCache
from step07_paged_kv.scheduler import PagedScheduler
from step10_kernels.model_runner import KernelsConfig, cuda_graph_wrapper, kernels_runner
from step10_kernels.triton_layers import TritonAttentionBackend

GEMMA_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                  sliding_window=512, max_position_embeddings=32768,
                  layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)


def sig(x: float) -> float:
    """Four significant digits (the smoke run's figures are tiny)."""
    return float(f"{x:.4g}")


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls (after two warm-ups), synchronized."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 10) / 1e9


def attention_point(device: torch.device, seqs: int, ctx: int, hkv: int, group: int, dim: int,
                    dtype: torch.dtype, check: bool) -> dict:
    bs = 16
    per_seq = -(-(ctx + 1) // bs)
    cache = PagedKVCache.allocate(1, seqs * per_seq + 1, bs, hkv, dim, dtype, device)
    cache.k[0].normal_()
    cache.v[0].normal_()
    order = torch.randperm(cache.num_blocks - 1).tolist()
    tables = [order[i * per_seq:(i + 1) * per_seq] for i in range(seqs)]
    b = build_batch([[0]] * seqs, [ctx] * seqs, tables, bs, device)
    q = torch.randn(seqs, hkv * group, dim, dtype=dtype, device=device)
    k = torch.randn(seqs, hkv, dim, dtype=dtype, device=device)
    tri = TritonAttentionBackend.for_device(device)
    plan = tri.plan(b.attn_metadata, cache, seqs, None, group)
    cache.write(0, k, k, b.attn_metadata.slot_mapping)
    if check:
        ref = TorchAttentionBackend()
        want = ref.forward(q, k, k, cache, 0, ref.plan(b.attn_metadata, cache, seqs, None, group), dim ** -0.5, None)
        got = tri.attend(q, cache, 0, plan, dim ** -0.5, None)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    s = timed(lambda: tri.attend(q, cache, 0, plan, dim ** -0.5, None), device, 20)
    read = seqs * (ctx + 1) * hkv * dim * 2 * dtype.itemsize + seqs * per_seq * 4  # K, V, block table
    return {"seqs": seqs, "ctx": ctx, "kv_heads": hkv, "group": group, "head_dim": dim, "splits": plan.num_splits,
            "us": sig(s * 1e6), "gb_s": sig(read / s / 1e9)}


def random_model(device: torch.device, dtype: torch.dtype, smoke: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from shared.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("tiny-gemma3") if smoke else Gemma3TextConfig(**GEMMA_270M)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name="gemma-3-270m-shape", max_model_len=4096,
                       eos_token_ids=(1,), device=device, dtype=dtype)


def engine_runner(lm: LoadedModel, kernels: str, graphs: bool, max_clients: int, in_len: int,
                  out_len: int) -> ModelRunner[PagedKVCache]:
    """The runner ``--kernels kernels`` builds (with CUDA graphs or not), its pool sized for the load."""
    cache = PagedCacheConfig(num_kv_blocks=max_clients * (-(-(in_len + out_len) // 16) + 1) + 8)
    cfg = KernelsConfig(kernels=kernels, enforce_eager=not graphs)
    runner = kernels_runner(lm, RunnerConfig(1.0), cfg, lambda c: build_paged_runner(lm, c, cache, explicit_len=False))
    return cuda_graph_wrapper(cfg, max_clients)(runner)


def engine_tok_s(lm: LoadedModel, runner: ModelRunner[PagedKVCache], clients: int, in_len: int, out_len: int) -> float:
    """Output tokens/s of ``clients`` greedy requests sent at once to an engine core over ``runner``
    (the paged scheduler, no speculation), driven on this thread as the server's engine thread
    drives it (under ``inference_mode``, as the warm-up compiled), with no HTTP in between."""
    sched = SchedulerConfig(max_seqs=max(clients, 1), max_num_batched_tokens=2048)
    blocks = BlockManager(runner.cache.num_blocks, runner.cache.block_size, enable_prefix_caching=False)
    core = EngineCore(PagedScheduler(sched, runner.max_len, lm.eos_token_ids, blocks), runner)
    rng = random.Random(clients)
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    for i in range(clients):
        prompt = tuple(rng.randrange(3, lm.model.config.vocab_size) for _ in range(in_len))
        core.add(Entry(GenerationRequest(f"r{i}", prompt, params, time.monotonic()), asyncio.Queue()))
    t0, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        while core.has_work():
            tokens += sum(isinstance(item, TokenEvent) for _, item in core.step())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device (the test suite's run)")
    ns = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    out["copy_gb_s"] = round(copy_bandwidth(device, 2 ** 20 if ns.smoke else 2 ** 31), 1)
    points = [(2, 40)] if ns.smoke else [(s, c) for s in (16, 32, 64) for c in (1024, 4096, 8192)]
    shapes = [(1, 4, 16)] if ns.smoke else [(1, 4, 256), (8, 4, 128)]
    out["attention"] = [attention_point(device, s, c, h, g, d, dtype, check=i == 0)
                        for h, g, d in shapes for i, (s, c) in enumerate(points)]
    for p in out["attention"]:
        p["of_copy"] = sig(p["gb_s"] / out["copy_gb_s"])
    lm = random_model(device, dtype, ns.smoke)
    in_len, out_len = (8, 4) if ns.smoke else (128, 128)
    runs = [("torch", False), ("triton", False), ("triton", True)] if device.type == "cuda" or ns.smoke else []
    loads = (1, 2) if ns.smoke else (1, 64)
    out["engine_tok_s"] = {}
    for kernels, graphs in runs:
        runner = engine_runner(lm, kernels, graphs, max(loads), in_len, out_len)
        for c in loads:
            out["engine_tok_s"][f"{kernels}{'+graphs' if graphs else ''}@{c}"] = sig(engine_tok_s(lm, runner, c, in_len, out_len))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
