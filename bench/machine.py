"""What every benchmark shares: the CPU and its measured memory bandwidth next to its figures, and its console."""

import os
import platform
import subprocess
import sys
import time

import numpy as np


def cpu_name() -> str:
    """lscpu's model name with the vector ISA and core count ("AMD EPYC 9R14, AVX-512 VNNI, 2 cores")."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):  # macOS has no lscpu
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    flags = out.split("Flags:", 1)[1] if "Flags:" in out else ""
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return f"{name}, {isa}{' VNNI' if 'vnni' in flags else ''}, {os.cpu_count()} cores"


def read_bandwidth(size_mb: int = 512, repeats: int = 5) -> float:
    """Single-core read bandwidth in bytes/s: numpy summing a large float64 array, best of `repeats` (the first
    pass faults the pages in)."""
    a = np.ones(size_mb * 2**20 // 8)
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.nbytes / best


def make_console():
    """A rich Console that keeps whole tables when the output goes to a file (rich uses 80 columns there)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)
