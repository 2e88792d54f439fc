"""``apply_tp`` (quantized: its halves around ``quantize``) on ranks in real processes over gloo:
rank 0's logits equal the unsharded model's, through a prefill and a decode that reads the sharded
KV cache back; each rank's cache holds only its KV heads; invalid splits are refused."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.attention import build_batch
from shared.config import ModelConfig
from shared.model import ModelArgs, Transformer
from shared.models import load_config, load_model
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant.quantize import quantize
from step11_multigpu.model_runner import assign_cores
from shared.tiny import tiny_config
from step11_multigpu.tp import apply_tp, check_tp, parallel_vocab, shard_model

BLOCK = 4
PROMPTS = ([5, 70, 71, 72, 73, 74, 75], [9, 200, 201, 202])  # two prefills, then one decode each
# tiny-llama-bias: tiny-llama with random attention and MLP biases (row-parallel layers add theirs once)
CASES = [("tiny-llama", "none"), ("tiny-gemma3", "none"), ("tiny-llama-bias", "none"), ("tiny-llama", "int8"),
         ("tiny-gemma3", "int8"), ("tiny-llama", "int4")]


def run_model(model: Transformer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Prefill both prompts, then decode one token each (reading the cache back): both steps' logits."""
    a = model.args
    cache = PagedKVCache.allocate(a.num_layers, 8, BLOCK, a.num_kv_heads, a.head_dim, dtype, "cpu")
    cache.k[0].fill_(float("nan"))  # unused slots must never be read
    tables = [[0, 1], [2, 3]]
    with torch.inference_mode():
        b = build_batch(PROMPTS, [0, 0], tables, BLOCK)
        first = model(b.input_ids, b.positions, cache, b.attn_metadata, b.logits_indices).float()
        # the same tokens on every rank (the server's rank 0 sends them; only its logits are whole)
        b = build_batch([[11], [12]], [len(p) for p in PROMPTS], tables, BLOCK)
        second = model(b.input_ids, b.positions, cache, b.attn_metadata, b.logits_indices).float()
    return first, second, tuple(cache.k[0].shape)


def hf_model(name: str) -> torch.nn.Module:
    if name != "tiny-llama-bias":
        return load_model(ModelConfig(model=name)).model
    from transformers import AutoModelForCausalLM

    config = tiny_config("tiny-llama")
    config.attention_bias = config.mlp_bias = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # the same weights in every process
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.data.normal_(std=0.5)  # transformers starts biases at zero
    return model.eval()


def build(name: str, scheme: str, rank: int, world: int) -> tuple[Transformer, torch.dtype]:
    model = Transformer.from_hf_model(hf_model(name))
    # int4 groups run along the input features: groups of 32 fit whole in every rank's slice of
    # o_proj (64 inputs) and down_proj (128), so sharding keeps one rank's groups exactly
    group = 32 if scheme == "int4" else None
    if world > 1 and scheme == "none":
        apply_tp(model, rank, world)
    elif world > 1:  # the engine's order: shard, then quantize, then the vocabulary
        parallel_vocab(quantize(shard_model(model, rank, world), scheme, group), rank, world)
    else:
        quantize(model, scheme, group)
    return model, torch.float32 if scheme == "none" else torch.bfloat16


def _rank(rank: int, world: int, path: str, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    for name, scheme in CASES:
        model, dtype = build(name, scheme, rank, world)
        first, second, kv_shape = run_model(model, dtype)
        # plain lists: a tensor on a queue is shared through a file descriptor that dies with this process
        results.put((rank, name, scheme, first.tolist() if rank == 0 else None, second.tolist() if rank == 0 else None,
                     kv_shape))
    dist.barrier()  # nobody tears the group down while another rank still uses it
    dist.destroy_process_group()


def run_ranks(world: int) -> dict[tuple[int, str, str], tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    path = os.path.join(tempfile.mkdtemp(), "rendezvous")
    procs = [ctx.Process(target=_rank, args=(r, world, path, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world * len(CASES)):
            rank, name, scheme, *rest = results.get(timeout=240)
            out[rank, name, scheme] = tuple(rest)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def sharded(request: pytest.FixtureRequest) -> tuple[int, dict]:
    return request.param, run_ranks(request.param)


@pytest.mark.parametrize("name,scheme", CASES)
def test_rank_zero_logits_equal_the_unsharded_model(sharded, one_torch_thread, name: str, scheme: str) -> None:
    world, out = sharded
    if scheme == "int4" and world == 4:
        pytest.skip("o_proj's slice at 4 ranks (16 inputs) is smaller than an int4 group: quantized "
                    "differently from one rank by design (README)")
    first, second = (torch.tensor(t) for t in out[0, name, scheme][:2])
    ref_first, ref_second, _ = run_model(*build(name, scheme, 0, 1))
    assert first.shape == ref_first.shape == (2, 262)  # the whole vocabulary, padding cut (262 = 4 x 65.5)
    # float32: sums in another order, ~1e-5 measured. int8 runs bf16 activations, so each rank's
    # partial sum is rounded to bf16 before the all-reduce: measured up to 0.30 on logits of range 13
    # (bf16's step there is 0.0625), less than int8's own change from float32 (up to 1.4).
    tol = 1e-4 if scheme == "none" else 0.05 * float(ref_first.abs().max())  # int4 too: bf16 activations
    torch.testing.assert_close(first, ref_first, atol=tol, rtol=0)
    torch.testing.assert_close(second, ref_second, atol=tol, rtol=0)  # the decode read the sharded cache back
    assert torch.equal(first.argmax(-1), ref_first.argmax(-1)) and torch.equal(second.argmax(-1), ref_second.argmax(-1))


def test_each_rank_caches_only_its_kv_heads(sharded) -> None:
    world, out = sharded
    for name in ("tiny-llama", "tiny-gemma3"):
        kv = ModelArgs.from_hf_config(load_config(ModelConfig(model=name))).num_kv_heads
        for rank in range(world):
            heads = out[rank, name, "none"][2][2]  # [blocks, block_size, KV heads, head_dim]
            assert heads == max(1, kv // world), (name, rank)  # split, or the one its query heads read


@pytest.mark.parametrize("world,named", [(3, "attention heads"), (8, "attention heads")])
def test_splits_that_do_not_divide_the_heads_are_refused(world: int, named: str) -> None:
    args = ModelArgs.from_hf_config(load_config(ModelConfig(model="tiny-llama")))
    with pytest.raises(ValueError, match=f"--tensor-parallel-size {world} .*{named}"):
        check_tp(args, world)


def test_kv_heads_that_can_be_neither_split_nor_replicated_are_refused() -> None:
    import dataclasses

    args = dataclasses.replace(ModelArgs.from_hf_config(load_config(ModelConfig(model="tiny-llama"))),
                               num_heads=12, num_kv_heads=3, intermediate_size=48)
    with pytest.raises(ValueError, match="--tensor-parallel-size 2: the model's 3 KV heads"):
        check_tp(args, 2)
    with pytest.raises(ValueError, match="intermediate size"):
        check_tp(dataclasses.replace(args, intermediate_size=50), 3)


def test_each_rank_gets_cores_of_its_own() -> None:
    assert assign_cores(2, 0, (0, 1, 2, 3)) == ((0, 1), (2, 3))
    assert assign_cores(2, 1, (4, 5, 6)) == ((4,), (5,))
    with pytest.raises(ValueError, match="--tensor-parallel-size 3: more ranks than the 2 CPU cores"):
        assign_cores(3, 0, (0, 1))
    with pytest.raises(ValueError, match="--threads 2 x --tensor-parallel-size 2"):
        assign_cores(2, 2, (0, 1, 2))
