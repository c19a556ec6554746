"""One training config for both trainers (MLX and PyTorch): defaults, presets, YAML, CLI flags.

Precedence, lowest first: dataclass defaults < preset < YAML file < command-line flags. A preset
can be named in the YAML file or on the command line (the command line wins). Relative paths
(``data``, ``output_dir``, ...) are relative to the working directory.

    parser = argparse.ArgumentParser()
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args())   # validated TrainConfig
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .io import atomic_write_text
from .tokenizer import MIN_VOCAB


class ConfigError(ValueError):
    """An invalid training config; the message says what to change."""


SIZES = ("small", "base", "large")
SPLITS = ("target", "random")
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adafactor")
DTYPES = ("float32", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}
LORA_MODULES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")  # HF T5 Linear names
LORA_TARGETS = {"qv": ("q", "v"), "all": LORA_MODULES}


@dataclass
class TrainConfig:
    # model: exactly one of `model` (HF folder or hub id, fine-tune) or `init` (random init)
    model: str | None = None
    init: str | None = None  # "small" | "base" | "large" | path to a T5 config.json
    # data
    data: list[str] = field(default_factory=lambda: ["../shared/datasets/full.jsonl"])
    split: Literal["target", "random"] = "target"
    split_fractions: list[float] | None = None  # None: 0.8/0.1/0.1 (target), 0.96/0.02/0.02 (random)
    sample_fraction: float = 1.0
    normalize: bool = True
    max_source_length: int = 64
    max_target_length: int = 64
    tokenizer_vocab_size: int = 0  # > 0: train a task tokenizer of this size on the train split (init only)
    augment_copies: int = 0  # entity-swapped variants of each training row added to the train split
    augment_invented: float = 0.5  # share of swapped spans that get an invented name (else another row's span)
    # run
    output_dir: str = "runs/latest"
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 3e-4
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    dropout: float | None = None  # None: the model config's dropout_rate
    seed: int = 42
    dtype: Literal["float32", "bfloat16"] = "float32"
    # evaluation and logging (steps are optimizer steps)
    eval_every: int = 200  # 0: only at the end
    eval_samples: int = 200  # 0: the whole validation split
    eval_batch_size: int = 32
    eval_num_beams: int = 1
    eval_max_new_tokens: int = 64
    log_every: int = 10
    save_every: int = 0  # optimizer steps between resume checkpoints; 0: at every eval and at the end
    max_minutes: float | None = None  # wall-clock budget: stop (checkpoint, evaluate, save) once it is spent
    # LoRA / QLoRA
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "qv"  # "qv" | "all" | comma list of q,k,v,o,wi,wi_0,wi_1,wo
    quantize_base: int | None = None  # 4 | 8: quantized frozen base (QLoRA)
    fuse: bool = False  # merge the adapters into the weights when saving
    gradient_checkpointing: bool = False
    preset: str | None = None
    resume: str | None = None  # a checkpoint folder to continue from, or "auto": the latest in output_dir

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        """A config from ``values`` (coerced to field types), without validation."""
        return dataclasses.replace(cls(), **_coerce_all(values, source))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> Path:
        """Write the config as YAML (atomically), loadable again with ``load_config``."""
        import yaml

        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def lora_modules(self) -> tuple[str, ...]:
        """``lora_targets`` as HF module names, e.g. ("q", "v")."""
        return parse_lora_targets(self.lora_targets)

    def validate(self) -> "TrainConfig":
        """Raise ``ConfigError`` listing every problem; return self when there is none."""
        problems = []

        def need(ok, message):
            if not ok:
                problems.append(message)

        if self.model and self.init:
            problems.append("set either model (fine-tune) or init (random init), not both")
        elif not self.model and not self.init and self.resume in (None, "auto"):
            # a resumed checkpoint names its model; "auto" may find none and start fresh
            problems.append("set model (an HF folder or hub id) or init (small, base, large or a config.json)")
        if self.init and self.init not in SIZES:
            init = Path(self.init)
            if init.suffix != ".json":
                problems.append(f"init must be one of {', '.join(SIZES)} or a config.json path, got {self.init!r}")
            elif not init.is_file():
                problems.append(f"init config not found: {self.init}")
        if self.preset is not None and self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")

        if not self.data:
            problems.append("data: no data files given")
        for path in self.data:
            need(Path(path).is_file(), f"data file not found: {path}")
        need(self.split in SPLITS, f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.split_fractions is not None:
            f = self.split_fractions
            if len(f) != 3 or any(not 0 <= x <= 1 for x in f) or f[0] <= 0 or abs(sum(f) - 1) > 1e-6:
                problems.append(f"split_fractions must be three numbers train,valid,test in [0, 1] with train > 0 "
                                f"summing to 1, got {list(f)}")
        need(0 < self.sample_fraction <= 1, f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        need(self.max_source_length >= 2, f"max_source_length must be >= 2, got {self.max_source_length}")
        need(self.max_target_length >= 2, f"max_target_length must be >= 2, got {self.max_target_length}")
        if self.tokenizer_vocab_size:
            need(self.tokenizer_vocab_size >= MIN_VOCAB,
                 f"tokenizer_vocab_size must be 0 (the model's tokenizer) or >= {MIN_VOCAB}, "
                 f"got {self.tokenizer_vocab_size}")
            need(not self.model, "tokenizer_vocab_size trains a new vocabulary: it needs init (a model trained "
                                 "from scratch), not a pretrained model, whose embeddings belong to its tokenizer")
        need(self.augment_copies >= 0, f"augment_copies must be >= 0, got {self.augment_copies}")
        need(0 <= self.augment_invented <= 1, f"augment_invented must be in [0, 1], got {self.augment_invented}")

        need(self.epochs > 0 or self.max_steps is not None, f"epochs must be > 0, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.lr_schedule in SCHEDULES,
             f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be > 0 (or none to disable clipping), got {self.max_grad_norm}")
        need(self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype in ("float16", "fp16", "half"):
            problems.append(f"dtype {self.dtype}: T5 overflows in fp16; use bfloat16 or float32")
        else:
            need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

        need(self.eval_every >= 0, f"eval_every must be >= 0 (0: only at the end), got {self.eval_every}")
        need(self.eval_samples >= 0, f"eval_samples must be >= 0 (0: all), got {self.eval_samples}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        need(self.eval_num_beams >= 1, f"eval_num_beams must be >= 1, got {self.eval_num_beams}")
        need(self.eval_max_new_tokens >= 1, f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.save_every >= 0, f"save_every must be >= 0 (0: at every eval), got {self.save_every}")
        need(self.max_minutes is None or self.max_minutes > 0,
             f"max_minutes must be > 0 (or none for no time limit), got {self.max_minutes}")

        need(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            parse_lora_targets(self.lora_targets)
        except ConfigError as e:
            problems.append(str(e))
        if self.quantize_base is not None:
            need(self.quantize_base in (4, 8), f"quantize_base must be 4, 8 or none, got {self.quantize_base}")
            need(self.lora, "quantize_base trains LoRA adapters on a quantized base: it needs lora: true")
        need(not self.fuse or self.lora, "fuse merges LoRA adapters into the model: it needs lora: true")
        if self.resume is not None and self.resume != "auto":
            need(Path(self.resume).exists(), f"resume checkpoint not found: {self.resume}")

        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self


def parse_lora_targets(spec: str) -> tuple[str, ...]:
    """"qv" -> ("q", "v"); "all" -> every attention and FFN Linear; or a comma list of names."""
    if spec in LORA_TARGETS:
        return LORA_TARGETS[spec]
    names = tuple(n.strip() for n in str(spec).split(",") if n.strip())
    bad = [n for n in names if n not in LORA_MODULES]
    if not names or bad:
        raise ConfigError(f"lora_targets must be qv, all or a comma list of {', '.join(LORA_MODULES)}; "
                          f"got {spec!r}" + (f" (unknown: {', '.join(bad)})" if bad else ""))
    return names


# Presets set hardware-dependent knobs only; every value can still be overridden.
PRESETS: dict[str, dict] = {
    # The original project's run on an M2 MacBook (its README's hyper-parameters).
    "m2": dict(batch_size=2, grad_accum=2, learning_rate=3e-5, epochs=3.0, sample_fraction=0.1,
               warmup_steps=50, weight_decay=0.01, dtype="float32"),
    # A quick run on a laptop CPU: a tenth of the data, one epoch, frequent small evals.
    "cpu": dict(batch_size=8, grad_accum=1, learning_rate=3e-4, epochs=1.0, sample_fraction=0.1,
                warmup_steps=20, dtype="float32", eval_every=100, eval_samples=50, eval_batch_size=16),
    # Colab T4 (16 GB, no bf16): the original project's Colab settings.
    "t4": dict(batch_size=8, grad_accum=4, learning_rate=3e-5, epochs=5.0, warmup_steps=100,
               weight_decay=0.01, dtype="float32", eval_batch_size=64),
    # L4 / A10G (24 GB, bf16): 3e-4 is the usual AdamW rate for T5 fine-tuning (HF T5 docs, 1e-4..3e-4).
    "l4": dict(batch_size=32, grad_accum=1, learning_rate=3e-4, epochs=5.0, warmup_steps=100,
               weight_decay=0.01, dtype="bfloat16", eval_batch_size=128),
    "a10g": dict(batch_size=32, grad_accum=1, learning_rate=3e-4, epochs=5.0, warmup_steps=100,
                 weight_decay=0.01, dtype="bfloat16", eval_batch_size=128),
    # A100 (40/80 GB, bf16): twice the batch, same rate; also fits flan-t5-large full fine-tuning.
    "a100": dict(batch_size=64, grad_accum=1, learning_rate=3e-4, epochs=5.0, warmup_steps=100,
                 weight_decay=0.01, dtype="bfloat16", eval_batch_size=256),
}
PRESET_DESCRIPTIONS: dict[str, str] = {
    "m2": "original project on an M2 Mac: batch 2 x accum 2, lr 3e-5, 3 epochs on 10% of the data",
    "cpu": "quick CPU run: batch 8, lr 3e-4, 1 epoch on 10% of the data, small evals",
    "t4": "Colab T4 (float32, no bf16): batch 8 x accum 4, lr 3e-5, 5 epochs",
    "l4": "L4 24 GB: bfloat16, batch 32, lr 3e-4, 5 epochs",
    "a10g": "A10G 24 GB: bfloat16, batch 32, lr 3e-4, 5 epochs",
    "a100": "A100: bfloat16, batch 64, lr 3e-4, 5 epochs",
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HELP = {
    "model": "HF model folder or hub id to fine-tune",
    "init": "random init instead: small, base, large or a T5 config.json",
    "data": "JSONL files, comma-separated",
    "split": "target: leak-free, by target; random: the original's leaky row split",
    "split_fractions": "train,valid,test (default 0.8,0.1,0.1 target; 0.96,0.02,0.02 random)",
    "sample_fraction": "use this fraction of the data (of targets for split target)",
    "normalize": "fold accents (Maori for Māori) and whitespace in the data",
    "max_source_length": "input tokens kept, EOS included",
    "max_target_length": "target tokens kept, EOS included",
    "tokenizer_vocab_size": "train a SentencePiece tokenizer of this many pieces on the train split, saved with the "
                            "model (init only; 0: the model's own / Flan-T5's)",
    "augment_copies": "add N entity-swapped variants of each training row (names copied from the query replaced "
                      "in query and target; 0: off)",
    "augment_invented": "share of swapped names that are invented (the rest come from other training rows)",
    "output_dir": "folder for checkpoints, config.yaml, metrics.jsonl",
    "epochs": "passes over the training split",
    "max_steps": "optimizer steps; overrides epochs",
    "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "learning_rate": "peak learning rate",
    "lr_schedule": "decay after warmup",
    "warmup_steps": "linear warmup steps",
    "optimizer": "optimizer",
    "weight_decay": "decoupled weight decay",
    "max_grad_norm": "clip the global gradient norm (none: no clipping)",
    "dropout": "dropout rate (none: the model config's)",
    "seed": "seed for init, shuffling and the random split",
    "dtype": "training precision (fp16 overflows in T5)",
    "eval_every": "evaluate every N optimizer steps (0: at the end only)",
    "eval_samples": "validation examples generated per eval (0: all)",
    "eval_batch_size": "batch size for evaluation",
    "eval_num_beams": "beams when generating for eval",
    "eval_max_new_tokens": "token limit when generating for eval",
    "log_every": "log train loss every N optimizer steps",
    "lora": "train LoRA adapters instead of all weights",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA alpha (scale alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_targets": "qv, all, or a comma list of q,k,v,o,wi,wi_0,wi_1,wo",
    "quantize_base": "4 or 8: quantize the frozen base (QLoRA)",
    "fuse": "merge the adapters into the saved model",
    "gradient_checkpointing": "recompute activations to save memory",
    "preset": "hardware preset",
    "resume": "checkpoint folder to continue from, or auto: the latest in output_dir",
}
_HINTS = typing.get_type_hints(TrainConfig)


def _unwrap(hint):
    """(base type, optional, choices) of a field's type hint."""
    optional = False
    args = typing.get_args(hint)
    if type(None) in args:
        optional = True
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return str, optional, typing.get_args(hint)
    return hint, optional, None


def _coerce(name: str, value, source: str = "config"):
    """``value`` as field ``name``'s type (YAML gives "3e-4" as a string; the CLI gives strings)."""
    base, optional, _ = _unwrap(_HINTS[name])
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be empty")
    if name == "dtype" and isinstance(value, str):
        return DTYPE_ALIASES.get(value.lower(), value.lower())
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            word = value.strip().lower() if isinstance(value, str) else None
            if word in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return word in ("true", "yes", "on", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [item(v) if item is not str else str(v) for v in value]
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base))
        if typing.get_origin(base) is list:
            kind = "a list (or a comma-separated string)"
        raise ConfigError(f"{source}: {name} must be {kind}{' or none' if optional else ''}, got {value!r}") from None
    raise AssertionError(f"unhandled type {base} for {name}")


def _coerce_all(values: dict, source: str) -> dict:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    return {k: _coerce(k, v, source) for k, v in values.items()}


def _read_yaml(path) -> dict:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """Resolve and validate a config: defaults < preset < YAML ``path`` < ``overrides``.

    ``overrides`` (e.g. from the command line) may name a preset with ``preset``. A ``None``
    value in ``overrides`` means "not given" and is skipped; in the YAML file ``null`` is a value.
    """
    return _resolve(path, {k: v for k, v in (overrides or {}).items() if v is not None})


def _resolve(path, overrides: dict) -> TrainConfig:
    file_values = _coerce_all(_read_yaml(path), str(path)) if path is not None else {}
    cli_values = _coerce_all(overrides, "overrides")
    preset = cli_values.get("preset", file_values.get("preset"))
    preset_values = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        preset_values = PRESETS[preset]
    values = {**preset_values, **file_values, **cli_values}
    return dataclasses.replace(TrainConfig(), **values).validate()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE`` and one flag per TrainConfig field (``--learning-rate``, ``--lora/--no-lora``).

    Flags default to "not given" so only the ones typed override the YAML file and preset.
    Lists are comma-separated (``--data a.jsonl,b.jsonl``); optional values accept ``none``.
    """
    group = parser.add_argument_group("training config (defaults < --preset < --config < flags)")
    group.add_argument("--config", default=None, metavar="FILE", help="YAML file of config keys")
    defaults = TrainConfig()
    for name in FIELDS:
        base, optional, choices = _unwrap(_HINTS[name])
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{_HELP.get(name, name)} (default: {shown})"
        if name == "preset":
            choices = tuple(PRESETS)
            help_text = "hardware preset: " + "; ".join(f"{k}: {v}" for k, v in PRESET_DESCRIPTIONS.items())
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if base is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
            continue
        group.add_argument(_flag(name), default=argparse.SUPPRESS, metavar=_metavar(name, base, choices),
                           type=_arg_type(name), help=help_text)
    return parser


def _metavar(name, base, choices):
    if choices:
        return "{" + ",".join(choices) + "}"
    if typing.get_origin(base) is list:
        return "A,B,..."
    return name.split("_")[-1].upper() if base is str else getattr(base, "__name__", "X").upper()


def _arg_type(name: str):
    def convert(text: str):
        try:
            return _coerce(name, text, _flag(name))
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    convert.__name__ = name  # argparse names the type in its error message
    return convert


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated config from ``--config`` plus the flags given explicitly."""
    # Flags default to SUPPRESS, so an attribute present here was typed; "--max-steps none" is None.
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return _resolve(getattr(args, "config", None), overrides)


def print_config(cfg: TrainConfig, console=None) -> None:
    """A table of the resolved parameters, values that differ from the defaults in bold."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    defaults = TrainConfig().to_dict()
    table = Table(title="Training config", show_header=True)
    table.add_column("parameter")
    table.add_column("value")
    for name, value in cfg.to_dict().items():
        shown = escape(", ".join(map(str, value)) if isinstance(value, list) else str(value))
        table.add_row(name, f"[bold]{shown}[/]" if value != defaults[name] else shown)
    console.print(table)
