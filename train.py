"""Train with the engine that is fastest here: MLX on Apple Silicon, PyTorch elsewhere. Same config, same outputs.

    python train.py --config configs/quickstart.yaml            # the README's main job
    python train.py --engine mlx --config configs/quickstart.yaml

Both engines read the config the same way (reformulation.config), evaluate the same rows and write final/, best/,
metrics.jsonl, curves.png and summary.json alike (reformulation.run); their resume checkpoints and LoRA folders
differ. On an x86 or ARM Linux CPU, torch trains the small from-scratch models ~1.8x faster per sample than MLX (whose CPU element-wise kernels
are single-threaded), so a time-capped run there gets ~1.8x the steps; on a Mac, MLX uses the GPU and unified memory.
Every other flag is the trainer's own (`python -m mlx_t5.train --help`, `python -m torch_t5.train --help`).
"""

import argparse
import importlib
import platform
import sys

ENGINES = {"mlx": "mlx_t5.train", "torch": "torch_t5.train"}


def default_engine() -> tuple[str, str]:
    """(engine, why) for this machine."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "mlx", "Apple Silicon"
    return "torch", f"{platform.system()} {platform.machine()}: torch trains ~1.8x faster per sample on a CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--engine", choices=tuple(ENGINES), default=None)
    args, rest = parser.parse_known_args(argv)
    engine, why = (args.engine, "--engine") if args.engine else default_engine()
    if "-h" not in rest and "--help" not in rest:
        print(f"engine: {engine} ({why}); choose with --engine {'|'.join(ENGINES)}", flush=True)
    return importlib.import_module(ENGINES[engine]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
