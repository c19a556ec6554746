"""A fast BLAS under MLX on Linux, and only one that runs on this CPU.

The Linux `mlx[cpu]` wheel links netlib's reference BLAS (~3 GFLOP/s on a 2-core box). Loading an
OpenBLAS with RTLD_GLOBAL before `mlx.core` is first imported makes the dynamic linker resolve MLX's
`cblas_*` calls to it (~120-150 GFLOP/s). `mlx_t5/__init__.py` calls `load()` first, so every entry
point goes through here.

An OpenBLAS built for one target dies with SIGILL on CPUs without that target's instructions (pip's
`cmeel-openblas` 0.3.31 is a SKYLAKEX-only build: AVX-512). So each candidate is first opened in a
child process (whose crash costs nothing), asked for `openblas_get_config()` / `openblas_get_corename()`
and run once; it is loaded here only if it is a DYNAMIC_ARCH build (kernels picked at run time, as
Debian/Ubuntu's `libopenblas0-pthread`, which setup.sh installs) or its target's instructions are all
in /proc/cpuinfo. Otherwise one warning names the library and what the CPU lacks, and MLX keeps its
reference BLAS: slow, but correct.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

# The candidates, in order of preference: an explicit path, then the system's OpenBLAS (found by the
# dynamic linker; Debian/Ubuntu's is DYNAMIC_ARCH). This is the one place the choice is made.
SYSTEM_OPENBLAS = "libopenblas.so.0"
INSTALL_HINT = "on Debian/Ubuntu: apt-get install libopenblas0-pthread (setup.sh does)"

# Instructions each fixed OpenBLAS target compiles in, as /proc/cpuinfo names them. A DYNAMIC_ARCH build
# needs none of this: it checks CPUID itself. Targets not listed are refused (we can't vouch for them).
_AVX512 = {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
TARGET_FLAGS: dict[str, set[str]] = {
    # x86-64
    "prescott": {"pni"}, "core2": {"ssse3"}, "penryn": {"sse4_1"}, "dunnington": {"sse4_1"},
    "nehalem": {"sse4_2"}, "opteron": set(), "barcelona": {"sse4a"}, "atom": {"ssse3"},
    "sandybridge": {"avx"}, "bulldozer": {"avx"}, "piledriver": {"avx", "fma"},
    "steamroller": {"avx", "fma"}, "excavator": {"avx2", "fma"},
    "haswell": {"avx2", "fma"}, "zen": {"avx2", "fma"},
    "skylakex": _AVX512, "cooperlake": _AVX512 | {"avx512_bf16"},
    "sapphirerapids": _AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16"},
    # arm64 (/proc/cpuinfo "Features"; NEON is "asimd")
    "armv8": set(), "cortexa53": {"asimd"}, "cortexa57": {"asimd"}, "cortexa72": {"asimd"},
    "cortexa73": {"asimd"}, "neoversen1": {"asimd"}, "thunderx2t99": {"asimd"}, "tsv110": {"asimd"},
    "emag8180": {"asimd"}, "falkor": {"asimd"}, "vortex": {"asimd"},
    "neoversev1": {"asimd", "sve"}, "neoversen2": {"asimd", "sve", "sve2"}, "a64fx": {"asimd", "sve"},
    "armv8sve": {"asimd", "sve"},
}

# Run in a child: open the library, read what it says it is, and run one sgemm through the kernels
# MLX will use (a 64x64 product goes through the target's GEMM and beta kernels).
_PROBE = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
print(lib.openblas_get_config().decode()); print(lib.openblas_get_corename().decode()); sys.stdout.flush()
n = 64; F = ctypes.c_float * (n * n); a, b, c = F(*([1.0] * n * n)), F(*([2.0] * n * n)), F()
lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, F, ctypes.c_int, F, ctypes.c_int,
                                                 ctypes.c_float, F, ctypes.c_int]
lib.cblas_sgemm(101, 111, 111, n, n, n, 1.0, a, n, b, n, 0.0, c, n)
assert c[0] == c[n * n - 1] == 2.0 * n, (c[0], c[n * n - 1])
print(next((line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()), sys.argv[1]))
"""


@dataclass
class State:
    path: str | None = None            # the library MLX's cblas_* calls resolve to, None for MLX's own
    config: str | None = None          # openblas_get_config()
    corename: str | None = None        # openblas_get_corename(): the kernels in use
    refused: list[str] = field(default_factory=list)   # why each other candidate was not loaded


STATE = State()


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo reports (x86 "flags", arm64 "Features")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def runs_here(config: str, corename: str, flags: set[str]) -> str | None:
    """None if a library that reports this config and core can run on a CPU with these flags, else why not."""
    if "DYNAMIC_ARCH" in config.split():
        return None
    core = corename.strip().lower()
    if core not in TARGET_FLAGS:
        return f"it is built for {corename!r} only, a target this check does not know"
    missing = sorted(TARGET_FLAGS[core] - flags)
    if missing:
        return f"it is built for {corename} only and this CPU lacks {', '.join(missing)}"
    return None


class NotFound(Exception):
    pass


def probe(library: str) -> tuple[str, str, str] | str:
    """(config, corename, path) of a library that loaded and ran sgemm in a child process, or why it can't
    run here; raises NotFound where there is no such library."""
    try:
        out = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, library], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"probing it failed ({err})"
    lines = out.stdout.splitlines()
    if out.returncode == 0 and len(lines) == 3:
        return lines[0], lines[1], lines[2]
    if out.returncode < 0:
        name = signal.Signals(-out.returncode).name
        return f"it crashed with {name} running sgemm" + (f" ({lines[0]})" if lines else "")
    last = (out.stderr.strip().splitlines() or ["no output"])[-1]
    if "cannot open shared object file" in last and library in last:
        raise NotFound(last)
    return f"it could not be loaded ({last})"


def candidates() -> list[str]:
    explicit = os.environ.get("MLX_T5_OPENBLAS")
    return [explicit, SYSTEM_OPENBLAS] if explicit else [SYSTEM_OPENBLAS]


def load(flags: set[str] | None = None) -> State:
    """Preload the first candidate that runs on this CPU (Linux only); return what is in use and why."""
    if STATE.path or STATE.refused or not sys.platform.startswith("linux") or os.environ.get("MLX_T5_NO_OPENBLAS"):
        return STATE
    if "mlx.core" in sys.modules:
        warnings.warn("mlx was imported before mlx_t5: MLX keeps its slow reference BLAS", stacklevel=2)
        return STATE
    flags = cpu_flags() if flags is None else flags
    unusable = []   # libraries that are there but can't run here: each is named in one warning
    for library in candidates():
        try:
            found = probe(library)
        except NotFound as err:
            if library == SYSTEM_OPENBLAS:   # not installed: said once below if nothing else loads
                STATE.refused.append(f"{library}: not found")
                continue
            found = str(err)
        if isinstance(found, tuple):
            config, corename, path = found
            found = runs_here(config, corename, flags)
            if found is None:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                # asked again in this process: a DYNAMIC_ARCH build's kernels are this process's CPUID's
                lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
                config, corename = lib.openblas_get_config().decode(), lib.openblas_get_corename().decode()
                STATE.path, STATE.config, STATE.corename = path, config, corename
                break
            library = f"{path} ({config})"
        unusable.append(f"not using the OpenBLAS {library} for MLX: {found}")
    STATE.refused += unusable
    if STATE.path:
        for why in unusable:
            warnings.warn(why, stacklevel=2)
    else:
        warnings.warn("; ".join(unusable + ["no usable OpenBLAS for MLX, so its matmuls use the reference BLAS "
                                            f"(~40x slower). Fix: {INSTALL_HINT}"]), stacklevel=2)
    return STATE


def _lib():
    return ctypes.CDLL(STATE.path) if STATE.path else None


def get_threads() -> int | None:
    """OpenBLAS threads MLX's matmuls use, None where MLX does not use the preloaded OpenBLAS."""
    lib = _lib()
    return lib.openblas_get_num_threads() if lib else None


def set_threads(threads: int) -> None:
    """Set OpenBLAS's thread count (it reads OPENBLAS_NUM_THREADS only once, at load)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    lib = _lib()
    if lib is None:
        raise RuntimeError("MLX here does not use the preloaded OpenBLAS: there are no BLAS threads to set")
    lib.openblas_set_num_threads(threads)
