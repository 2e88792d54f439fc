"""What each scheme costs in quality, measured against float32 (llama.cpp's ``--kl-divergence`` way).

    python -m step08_quant.quality [--model gemma-3-270m] [--windows 16] [--window-len 256]
    python -m step08_quant.quality --url http://127.0.0.1:8000 [--url ...]   # any server, by its API

In-process (the table in the README): the same held text, the last ``--windows`` windows of
``--window-len`` tokens of the project's corpus (``engines_compare/data/corpus_v1.jsonl``; every
window starts with BOS), goes through float32 and every scheme. Per scheme: perplexity over every
predicted token and its ratio to float32's; the mean KL divergence KL(float32 || scheme) of the
next-token distributions; top-1 agreement (the two argmaxes equal); and greedy agreement: from
each of ``--prompts`` corpus prompts of 128 tokens (the benchmark's ``fixed`` workload), 64
greedy tokens, scored by the length of the prefix identical to float32's (mean, of 64).

Through the API (``--url``): the perplexity of the same windows from any OpenAI-compatible
server that answers ``echo`` with ``logprobs`` (vLLM, or a step from 04 on), as lm-eval's
``local-completions`` model measures it: ``max_tokens 1, echo, logprobs 1``, summing the prompt
tokens' log-probabilities. KL needs whole distributions, so it is in-process only.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Sequence

import torch

from shared.attention import build_batch
from shared.config import ModelConfig
from shared.cpu import cpu_flags
from shared.model import Transformer
from shared.models import LoadedModel, load_model, prepare
from step04_kvcache.model_runner import RunnerConfig, build_model
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant.quantize import DEFAULT_INT4_GROUP_SIZE, SCHEMES, quantize, weight_bytes

BLOCK = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Quality:
    scheme: str
    weight_mb: float
    perplexity: float
    ppl_ratio: float
    mean_kl: float
    top1_agreement: float
    greedy_prefix: float  # mean identical greedy tokens, of ``greedy_len``


def held_windows(tok: object, windows: int, length: int) -> list[list[int]]:
    """The last ``windows`` windows of ``length`` tokens (BOS first) of the corpus text."""
    from engines_compare.corpus import load_corpus

    ids = tok("\n\n".join(load_corpus()), add_special_tokens=False).input_ids
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    body = length - len(bos)
    if len(ids) < windows * body:
        raise ValueError(f"windows: the corpus has {len(ids)} tokens, fewer than {windows} x {body}")
    start = len(ids) - windows * body
    return [bos + ids[start + i * body: start + (i + 1) * body] for i in range(windows)]


def corpus_prompts(tok: object, n: int, length: int = 128) -> list[list[int]]:
    from engines_compare.corpus import Workload, build_prompts

    prompts = build_prompts(Workload(kind="fixed", input_len=(length, length), output_len=(64, 64)), tok, n, tag="quality")
    return [tok(p.text).input_ids for p in prompts]


class Runner:
    """One sequence at a time through a model and a small paged cache of its own."""

    def __init__(self, model: Transformer, dtype: torch.dtype, max_len: int) -> None:
        a = model.args
        self.model, self.max_len = model, max_len
        blocks = -(-max_len // BLOCK)
        self.cache = PagedKVCache.allocate(a.num_layers, blocks, BLOCK, a.num_kv_heads, a.head_dim, dtype)
        self.table = list(range(blocks))

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], context: int = 0) -> torch.Tensor:
        """Float32 logits ``[len(ids), vocab]`` of ``ids`` fed after ``context`` cached tokens."""
        b = build_batch([list(ids)], [context], [self.table], BLOCK)
        return self.model(b.input_ids, b.positions, self.cache, b.attn_metadata, None).float()

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        out = [int(self.logits(prompt)[-1].argmax())]
        while len(out) < n:
            out.append(int(self.logits([out[-1]], len(prompt) + len(out) - 1)[-1].argmax()))
        return out


def variants(schemes: Sequence[str], group_sizes: Sequence[int]) -> list[tuple[str, str, int | None]]:
    """``(label, scheme, group size)``: float32 first, then one int4 per group size."""
    out: list[tuple[str, str, int | None]] = [("none", "none", None)]
    for s in schemes:
        if s == "int4":
            out += [(f"int4 g{gs}", "int4", gs) for gs in group_sizes]
        elif s != "none":
            out.append((s, s, None))
    return out


def build_schemes(lm: LoadedModel, todo: list[tuple[str, str, int | None]]) -> dict[str, Transformer]:
    """Each variant's model over the loaded float32 weights (``none`` is step 07's)."""
    return {label: build_model(lm, RunnerConfig()) if s == "none" else
            quantize(Transformer.from_hf_model(lm.model), s, gs) for label, s, gs in todo}


def same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(lm: LoadedModel, todo: list[tuple[str, str, int | None]], windows: list[list[int]],
            prompts: list[list[int]], greedy_len: int) -> list[Quality]:
    models = build_schemes(lm, todo)
    max_len = max(max(map(len, windows)), max(map(len, prompts), default=0) + greedy_len)
    runners = {s: Runner(m, torch.float32 if s == "none" else torch.bfloat16, max_len) for s, m in models.items()}
    nll = {s: 0.0 for s in runners}
    kl = {s: 0.0 for s in runners}
    top1 = {s: 0 for s in runners}
    count = 0
    for w in windows:
        targets = torch.tensor(w[1:])
        ref = torch.log_softmax(runners["none"].logits(w)[:-1], dim=-1)  # [T - 1, vocab]
        count += len(targets)
        for s, r in runners.items():
            lp = ref if s == "none" else torch.log_softmax(r.logits(w)[:-1], dim=-1)
            nll[s] -= float(lp.gather(1, targets[:, None]).sum())
            kl[s] += float((ref.exp() * (ref - lp)).sum())
            top1[s] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
    greedy = {s: [r.greedy(p, greedy_len) for p in prompts] for s, r in runners.items()}
    ppl_ref = math.exp(nll["none"] / count)
    out = []
    for s in runners:
        ppl = math.exp(nll[s] / count)
        prefix = sum(same_prefix(a, b) for a, b in zip(greedy[s], greedy["none"])) / max(len(prompts), 1)
        out.append(Quality(s, weight_bytes(models[s]) / 1e6, ppl, ppl / ppl_ref, kl[s] / count, top1[s] / count,
                           prefix))
    return out


def api_perplexity(url: str, windows: list[list[int]]) -> float:
    """Perplexity of ``windows`` from a server's ``echo`` + ``logprobs`` (lm-eval's request)."""
    import httpx

    nll, count = 0.0, 0
    for w in windows:
        body = {"prompt": w, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
        r = httpx.post(url.rstrip("/") + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        lps = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(w)]  # the prompt's, bar the first
        nll -= sum(lps)
        count += len(lps)
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m step08_quant.quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated, of " + ", ".join(SCHEMES))
    p.add_argument("--group-sizes", default=str(DEFAULT_INT4_GROUP_SIZE), help="int4's, comma-separated")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8, help="corpus prompts for greedy agreement")
    p.add_argument("--greedy-len", type=int, default=64)
    p.add_argument("--url", action="append", default=[], help="measure these servers' perplexity by their API")
    ns = p.parse_args(argv)
    cfg = ModelConfig(model=ns.model, dtype="float32")
    prepare(cfg)
    lm = load_model(cfg)
    windows = held_windows(lm.tokenizer, ns.windows, ns.window_len)
    print(f"{ns.model}, {len(windows)} windows x {ns.window_len} tokens of held corpus text; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {' '.join(cpu_flags()) or 'none'}")
    if ns.url:
        for url in ns.url:
            print(f"{url}: perplexity {api_perplexity(url, windows):.4f} (echo + logprobs)")
        return
    schemes = [s for s in ns.schemes.split(",") if s]
    todo = variants(schemes, [int(g) for g in ns.group_sizes.split(",") if g])
    rows = measure(lm, todo, windows, corpus_prompts(lm.tokenizer, ns.prompts), ns.greedy_len)
    print("| scheme | weights MB | perplexity | vs float32 | mean KL | top-1 agreement | greedy prefix (of "
          f"{ns.greedy_len}) |\n|---|---:|---:|---:|---:|---:|---:|")
    for q in rows:
        print(f"| {q.scheme} | {q.weight_mb:.0f} | {q.perplexity:.4f} | {100 * (q.ppl_ratio - 1):+.2f} % | "
              f"{q.mean_kl:.5f} | {100 * q.top1_agreement:.2f} % | {q.greedy_prefix:.1f} |")


if __name__ == "__main__":
    main()
