"""Launch recipes for the engines that cannot run on these machines: TGI (Docker + GPU),
TensorRT-LLM's ``trtllm-serve`` and SGLang (both CUDA GPUs).

Each recipe is the exact command for the same model (the converted Hugging Face directory) and
the same limits as our runs, to paste on a machine that has what it needs; ``engines_compare``
then measures it through its URL. Nothing here installs or starts anything.

Leaves out: multi-GPU flags (tp/pp), quantization, image tags other than the pinned one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.2"
DEFAULT_PORTS = {"tgi": 8080, "trtllm": 8000, "sglang": 30000}  # each engine's own default
NEEDS = {
    "tgi": "Docker with the NVIDIA container toolkit and a CUDA GPU",
    "trtllm": "a CUDA GPU and TensorRT-LLM (pip install tensorrt-llm, or NVIDIA's release container)",
    "sglang": "a CUDA GPU and SGLang (pip install sglang)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class RecipeOptions:
    ctx: int = 4096
    parallel: int = 16
    dtype: str = "bfloat16"  # what a GPU run uses; the cached directory itself is float32


@dataclasses.dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    argv: tuple[str, ...]
    port: int
    needs: str
    notes: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def message(self) -> str:
        """Plain words: why it does not run here, and what to do instead."""
        return (f"{self.name} cannot run on this machine: it needs {self.needs}. On a machine that "
                f"has it, run the recipe below, then point engines_compare at --url {self.url}")


def tgi(hf_dir: Path, port: int, served_name: str, opts: RecipeOptions) -> Recipe:
    mount = f"/data/{served_name}"
    argv = ("docker", "run", "--rm", "--gpus", "all", "--shm-size", "1g",
            "-p", f"127.0.0.1:{port}:80", "-v", f"{hf_dir}:{mount}:ro", "-e", "HF_HUB_OFFLINE=1",
            TGI_IMAGE, "--model-id", mount, "--dtype", opts.dtype,
            "--max-input-tokens", str(opts.ctx - 1), "--max-total-tokens", str(opts.ctx),
            "--max-concurrent-requests", str(max(opts.parallel, 128)))
    return Recipe("tgi", argv, port, NEEDS["tgi"],
                  f"TGI reports the model as {mount} and accepts any model name in requests; "
                  "it batches continuously with no fixed slot count")


def trtllm(hf_dir: Path, port: int, served_name: str, opts: RecipeOptions) -> Recipe:
    argv = ("trtllm-serve", str(hf_dir), "--served_model_name", served_name,
            "--host", "127.0.0.1", "--port", str(port), "--backend", "pytorch",
            "--max_batch_size", str(opts.parallel), "--max_seq_len", str(opts.ctx))
    return Recipe("trtllm", argv, port, NEEDS["trtllm"],
                  "trtllm-serve has no --dtype flag: it runs the checkpoint's dtype, so save the "
                  f"directory as {opts.dtype} first for a like-for-like run")


def sglang(hf_dir: Path, port: int, served_name: str, opts: RecipeOptions) -> Recipe:
    argv = ("python", "-m", "sglang.launch_server", "--model-path", str(hf_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", opts.dtype, "--context-length", str(opts.ctx),
            "--max-running-requests", str(opts.parallel))
    return Recipe("sglang", argv, port, NEEDS["sglang"], "")


BUILDERS = {"tgi": tgi, "trtllm": trtllm, "sglang": sglang}
