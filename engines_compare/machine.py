"""``python -m engines_compare machine``: the machine a figure was measured on.

Every published number names its machine (team guide, section 4): CPU model, cores, the CPU
flags that decide which kernels run (AVX-512, avx512_bf16, avx512_vnni, AMX), memory, GPU (when
torch sees one) and the memory copy bandwidth, the denominator of model bandwidth
utilization (MBU). Bandwidth is measured here, not looked up: the best of several copies of a
large buffer (numpy on the CPU; torch on the GPU when present), counted STREAM-style as bytes
read plus bytes written per second.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.cpu import KERNEL_FLAGS, cpu_flags  # noqa: F401  (KERNEL_FLAGS: part of this module's record)

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True, slots=True)
class MachineInfo:
    cpu_model: str
    cpu_cores: int  # logical CPUs this process may use
    memory_gib: float
    gpu: str | None
    python: str
    platform: str
    copy_bandwidth_gbs: float | None  # CPU memory, read + write bytes per second / 1e9
    gpu_copy_bandwidth_gbs: float | None
    cpu_flags: tuple[str, ...] = ()  # of KERNEL_FLAGS, those the CPU has (empty in results before 2026-11-30)

    def describe(self) -> str:
        gpu = self.gpu or "no GPU"
        bw = f", copy {self.copy_bandwidth_gbs:.1f} GB/s" if self.copy_bandwidth_gbs else ""
        flags = f" ({' '.join(self.cpu_flags)})" if self.cpu_flags else ""
        return f"{self.cpu_model}{flags}, {self.cpu_cores} cores, {self.memory_gib:.0f} GiB, {gpu}{bw}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _torch_cuda() -> Any | None:
    """torch, if it is installed and sees a CUDA device (imported only where a GPU driver shows)."""
    if not (Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def cpu_copy_bandwidth(size_mb: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` GB/s of ``np.copyto`` between two ``size_mb`` buffers (read + write)."""
    import numpy as np

    n = size_mb * 2**20
    src, dst = np.ones(n, dtype=np.uint8), np.empty(n, dtype=np.uint8)
    np.copyto(dst, src)  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best / 1e9


def gpu_copy_bandwidth(torch: Any, size_mb: int = 1024, repeats: int = 10) -> float:
    n = size_mb * 2**20
    src = torch.ones(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n / best / 1e9


def collect(measure: bool = True, size_mb: int = 256) -> MachineInfo:
    torch = _torch_cuda()
    gpu = torch.cuda.get_device_name(0) if torch is not None else None
    return MachineInfo(
        cpu_model=cpu_model(), cpu_cores=cores(), memory_gib=round(memory_gib(), 1), gpu=gpu,
        python=platform.python_version(), platform=platform.platform(terse=True),
        copy_bandwidth_gbs=round(cpu_copy_bandwidth(size_mb), 2) if measure else None,
        gpu_copy_bandwidth_gbs=round(gpu_copy_bandwidth(torch), 1) if measure and torch is not None else None,
        cpu_flags=cpu_flags())


def git_info(repo: Path = REPO) -> dict[str, Any]:
    """The commit a result was measured at, and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines_compare machine", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a summary line")
    ap.add_argument("--size-mb", type=int, default=256, help="copy buffer size in MiB (default: %(default)s)")
    ap.add_argument("--no-measure", action="store_true", help="skip the bandwidth measurement")
    a = ap.parse_args(argv)
    info = collect(measure=not a.no_measure, size_mb=a.size_mb)
    if a.json:
        print(json.dumps({**dataclasses.asdict(info), "git": git_info()}, indent=2))
    else:
        print(info.describe())
        if info.gpu_copy_bandwidth_gbs:
            print(f"GPU copy bandwidth: {info.gpu_copy_bandwidth_gbs:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
