"""Step 08 — lower precision: bfloat16, int8 and int4 weight-only, as model transforms, with measured quality.

Central rule: decoding one token reads every weight once, so at batch 1 the bytes of the weights
ARE the time per token. ``quantize(model, scheme)`` (``quantize.py``) replaces every linear layer,
the tied LM head included, by one that stores fewer bytes per weight and multiplies through one
fused torch kernel (``linears.py``); the model code never knows. What that costs in quality is
measured against float32, never assumed (``python -m step08_quant.quality``).

What changed from step 07: only the model runner (``model_runner.py``): the model is quantized
when the engine is built, activations and the KV cache are bfloat16 for every scheme but
``none`` (``--kv-cache-dtype`` to choose), and the KV pool's default is 0.75 GiB instead of 4
(bf16: 18 KiB per token, so 43k tokens: Gemma 3's whole 32k context, or 16 clients at 128/128
170 times over) so that ``make serve`` stays under 2 GB resident. ``/health`` and ``/v1/models``
say which scheme, kernels and CPU flags are in use. Since this step (and for steps 04 on), the
API answers ``echo`` with ``logprobs``: the prompt tokens' log-probabilities, computed in the
prefill (``step04_kvcache/prompt_logprobs.py``), so perplexity can be measured through the server.

Left out on purpose: activation quantization (W8A8, FP8), GPTQ / AWQ calibration (round to
nearest here), a quantized KV cache (int8 / fp8 KV), caching quantized weights on disk (every
scheme quantizes in well under the load time: README), mixed schemes per layer.
"""

DEFAULT_KV_CACHE_GIB = 0.75
