"""What this machine runs the project with: paste the output into bug reports.

    python -m mlx_t5.info          # text
    python -m mlx_t5.info --json
"""

import argparse
import json
import os
import platform
import sys
from importlib import metadata

from . import blas

# The instruction sets whose presence changes which kernels run (and how fast): BLAS targets, ONNX Runtime's
# and fbgemm's int8 paths (VNNI), bf16; NEON/SVE on arm64.
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")
PACKAGES = ("mlx", "mlx-lm", "torch", "onnxruntime", "transformers", "tokenizers", "numpy")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import mlx.core as mx

    flags = blas.cpu_flags()
    state = blas.STATE
    return {
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "cpu": f"{_cpu_name()}, {os.cpu_count()} cores",
        "cpu_flags": {flag: flag in flags for flag in FLAGS} if flags else "unknown (no /proc/cpuinfo)",
        "mlx_device": str(mx.default_device()),
        "blas": {"library": state.path or ("platform (Accelerate)" if sys.platform == "darwin"
                                           else "MLX's bundled reference BLAS (slow)"),
                 "config": state.config, "core": state.corename, "threads": blas.get_threads(),
                 "refused": state.refused},
        "versions": {package: _version(package) for package in PACKAGES},
    }


def _text(info: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:"] + _text(value, indent + "  ")
        elif isinstance(value, list):
            lines += [f"{indent}{key}: {'none' if not value else ''}"] + [f"{indent}  - {item}" for item in value]
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_t5.info", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else "\n".join(_text(info)))


if __name__ == "__main__":
    main()
