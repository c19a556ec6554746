"""Fine-tune or train T5 from scratch with MLX: full SFT, LoRA, QLoRA.

    python -m mlx_t5.train --config configs/quickstart.yaml
    python -m mlx_t5.train --model google/flan-t5-small --preset m2 --lora --output-dir runs/m2-lora
    python -m mlx_t5.train --resume runs/quickstart/checkpoint          # continue exactly where it stopped

Config precedence: defaults < --preset < --config FILE < flags. With --resume and no --config, the
checkpoint's own config.yaml is the file layer, so flags (e.g. a larger --max-steps) still apply.
Writes OUTPUT_DIR/{final,best,checkpoint}/ (LoRA: adapter/, and final/ with fuse), metrics.jsonl, curves.png,
summary.json: the run contract of reformulation.run.
"""

import argparse
import os
import sys

from reformulation.config import ConfigError, add_config_args, config_from_args, print_config
from reformulation.data import DataError

from .distributed import DistributedError
from .utils import LoadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlx_t5.train", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_config_args(parser)


def resolve_config(args: argparse.Namespace):
    """The validated config; a resume without --config reads the checkpoint's config.yaml."""
    from .checkpoint import resume_folder

    if getattr(args, "resume", None) and args.config is None:
        folder = resume_folder(args.resume)
        if (folder / "config.yaml").is_file():
            args.config = str(folder / "config.yaml")
    return config_from_args(args)


def main(argv=None) -> int:
    from rich.console import Console
    from rich.markup import escape

    args = build_parser().parse_args(argv)
    console, err = Console(quiet=os.environ.get("MLX_RANK", "0") != "0"), Console(stderr=True)  # rank 0 prints

    def fail(message: str, code: int = 2) -> int:
        err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return code

    from .trainer import TrainError, train

    try:
        cfg = resolve_config(args)
    except (ConfigError, TrainError) as e:
        return fail(str(e))
    print_config(cfg, console)
    try:
        train(cfg, console)
    except (ConfigError, DataError, DistributedError, LoadError, TrainError) as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        return fail(str(e) or "interrupted", 130)
    except OSError as e:  # disk full, permissions: name the file
        return fail(f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
