"""CUDA graphs for decode steps: capture the whole forward once per batch-size bucket, replay it.

Central rule (vLLM's): a decode step of ``n`` sequences (one new token each, no prompt-logprob
rows) is padded to the smallest captured bucket ``b >= n``, its inputs are copied into static
buffers, and the graph captured for ``b`` replays every kernel launch of the forward in one call:
no Python, no per-op launch cost. Padding rows write nowhere (``slot_mapping`` -1, skipped by
:func:`.triton_ops.rope_and_store`) and read one slot of block 0; their logits are dropped.
Everything else (prefills, chunks, verification rows, batches over the largest bucket) runs eagerly.

What makes the forward capturable: the Triton path never reads device memory on the host
(attention plans use the host ints of the metadata; a graph's plan is built for the context of
``--max-model-len``, so its KV split count fits any sequence: splits that get no block weigh
nothing) and allocates nothing outside the graph's memory pool.

Not yet run on a GPU: this session had none. ``capture=False`` runs the same padded static-buffer
path eagerly, which the CPU tests check token for token (under the Triton interpreter).
"""
from __future__ import annotations

import dataclasses

import torch

from shared.attention import AttentionMetadata, BatchInputs
from step04_kvcache.model_runner import ModelRunner
from step04_kvcache.scheduler import SchedulerOutput
from step07_paged_kv.paged_cache import PagedKVCache

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclasses.dataclass(frozen=True, slots=True)
class StaticInputs:
    """The buffers a captured graph reads: the largest bucket's worth; bucket ``b`` uses ``[:b]``."""

    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    query_start_loc: torch.Tensor  # [B + 1]: 0, 1, ..., B (one token each)

    @classmethod
    def allocate(cls, size: int, max_blocks: int, device: torch.device) -> StaticInputs:
        z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=device)  # noqa: E731
        return cls(input_ids=z(size), positions=z(size), slot_mapping=z(size), seq_lens=z(size),
                   block_tables=z(size, max_blocks), query_start_loc=torch.arange(size + 1, device=device))

    def batch(self, b: int, max_seq_len: int) -> BatchInputs:
        """Bucket ``b``'s inputs as views of the buffers (the graph sees these very tensors)."""
        md = AttentionMetadata(slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
                               seq_lens=self.seq_lens[:b], context_lens=self.seq_lens[:b] - 1,
                               block_tables=self.block_tables[:b], num_decodes=b, max_query_len=1,
                               max_decode_seq_len=max_seq_len, max_prefill_seq_len=0)
        return BatchInputs(input_ids=self.input_ids[:b], positions=self.positions[:b], attn_metadata=md,
                           logits_indices=self.query_start_loc[:b])

    def fill(self, inputs: BatchInputs, b: int) -> None:
        """Copy a decode batch of ``n <= b`` rows in; rows ``n..b`` become padding."""
        md, n = inputs.attn_metadata, inputs.input_ids.shape[0]
        width = md.block_tables.shape[1]
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.seq_lens[:n].copy_(md.seq_lens)
        self.block_tables[:n, :width].copy_(md.block_tables)
        self.block_tables[:n, width:].zero_()
        self.pad(n, b)

    def pad(self, n: int, b: int) -> None:
        """Rows ``n..b``: token 0 at position 0 of a one-token sequence in block 0, written nowhere."""
        if b > n:
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].fill_(1)
            self.block_tables[n:b].zero_()


class CudaGraphRunner(ModelRunner[PagedKVCache]):
    """Wraps the engine's runner: its ``prepare``; decode ``forward`` by graph replay."""

    def __init__(self, inner: ModelRunner[PagedKVCache], max_batch: int, capture: bool = True) -> None:
        super().__init__(inner.model, inner.cache, inner.device, inner.max_len, inner.details)
        self.inner, self.capture = inner, capture
        self.buckets = tuple(b for b in BUCKETS if b <= max_batch) or (1,)
        max_blocks = -(-inner.max_len // inner.cache.block_size)
        self.static = StaticInputs.allocate(self.buckets[-1], max_blocks, inner.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_graph_steps = self.num_padding_rows = 0  # decode steps through the static path; rows padded
        self.details["cuda_graphs"] = " ".join(map(str, self.buckets)) if capture else "off (eager replay path)"

    def prepare(self, out: SchedulerOutput) -> BatchInputs:
        return self.inner.prepare(out)

    def bucket(self, inputs: BatchInputs) -> int | None:
        md, n = inputs.attn_metadata, inputs.input_ids.shape[0]
        uniform = md.max_query_len == 1 and md.num_decodes == md.num_seqs == n
        if not uniform or inputs.logits_indices.shape[0] != n or n > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= n)

    def forward(self, inputs: BatchInputs) -> torch.Tensor:
        b = self.bucket(inputs)
        if b is None:
            return self.inner.forward(inputs)
        n = inputs.input_ids.shape[0]
        self.static.fill(inputs, b)
        self.num_graph_steps, self.num_padding_rows = self.num_graph_steps + 1, self.num_padding_rows + b - n
        if not self.capture:
            return self.inner.forward(self.static.batch(b, self.max_len))[:n]
        graph, logits = self.graphs[b] if b in self.graphs else self._capture(b)
        graph.replay()
        return logits[:n]  # a view of the graph's output: read before the next forward

    def capture_all(self) -> None:
        """Capture every bucket, largest first (vLLM's order: smaller ones reuse its memory pool)."""
        for b in reversed(self.buckets):
            self._capture(b)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        batch = self.static.batch(b, self.max_len)
        self.static.pad(0, b)  # any valid contents will do: all padding
        with torch.inference_mode():
            self.inner.forward(batch)  # warm: Triton's JIT and allocator outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
            with torch.cuda.graph(graph, pool=pool):
                logits = self.inner.forward(batch)
        self.graphs[b] = (graph, logits)
        return graph, logits
