"""Pick a hardware preset from the machine torch runs on (the preset values live in reformulation.config)."""

import platform

import torch

# Substrings of torch.cuda.get_device_name(), checked in order ("A100" before "A10").
_GPU_NAMES = (
    ("H100", "a100"),  # no preset of its own: bf16 and 80 GB, the A100 settings fit
    ("H200", "a100"),
    ("A100", "a100"),
    ("A10", "a10g"),  # A10G (AWS) and A10
    ("L40", "l4"),
    ("L4", "l4"),
    ("T4", "t4"),
)


def detect_preset() -> tuple[str, str]:
    """``(preset, why)`` for this machine: a CUDA GPU by name, macOS -> m2, otherwise cpu."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for needle, preset in _GPU_NAMES:
            if needle in name.upper():
                return preset, f"CUDA device {name!r}"
        # an unlisted GPU: choose by what matters to the presets, bf16 support and memory
        memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        if not torch.cuda.is_bf16_supported():
            return "t4", f"CUDA device {name!r} without bfloat16"
        preset = "a100" if memory_gb >= 40 else "l4"
        return preset, f"CUDA device {name!r} with bfloat16 and {memory_gb:.0f} GiB"
    if platform.system() == "Darwin":
        return "m2", "macOS"
    return "cpu", "no CUDA device"


def check_dtype(dtype: str) -> str | None:
    """Why ``dtype`` cannot train here (None when it can)."""
    if dtype != "bfloat16":
        return None
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return (f"dtype bfloat16: {torch.cuda.get_device_name(0)} has no bfloat16 support "
                "(T4 and older): use dtype float32 (fp16 overflows in T5)")
    return None
