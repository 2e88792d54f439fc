"""What the CPU offers to the kernels that decide speed: AVX-512, avx512_bf16, avx512_vnni, AMX.

Read once from ``/proc/cpuinfo`` (empty elsewhere). Steps choose kernels by it and log it at
start-up; ``engines_compare machine`` records it with every figure, because these machines vary.
"""
from __future__ import annotations

from pathlib import Path

KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> tuple[str, ...]:
    """Which of ``KERNEL_FLAGS`` /proc/cpuinfo lists: what bf16 / int8 kernels can use here."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return ()
    have = set(line.split(":", 1)[1].split())
    return tuple(f for f in KERNEL_FLAGS if f in have)
