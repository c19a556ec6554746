"""One training config for both trainers (MLX and PyTorch): defaults, presets, YAML, CLI flags.

Precedence, lowest first: dataclass defaults < preset < YAML file < command-line flags. A preset
can be named in the YAML file or on the command line (the command line wins). Relative paths
(``data``, ``output_dir``, ...) are relative to the working directory.

    parser = argparse.ArgumentParser()
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args())   # validated TrainConfig

Each field carries its ``--help`` text and the rule its value must meet (``setting``); flags, type
coercion and the per-field checks are derived from the fields and their type hints.
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .constants import FLAN_T5_SHAPES, LORA_LINEARS, parse_lora_targets
from .io import atomic_write_text
from .tokenizer import MIN_VOCAB


class ConfigError(ValueError):
    """An invalid training config; the message says what to change."""


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

# The rules a field's value may have to meet; the key is what the error message says ("must be >= 1").
RULES = {
    "> 0": lambda x: x > 0,
    ">= 0": lambda x: x >= 0,
    ">= 1": lambda x: x >= 1,
    ">= 2": lambda x: x >= 2,
    "in (0, 1]": lambda x: 0 < x <= 1,
    "in [0, 1)": lambda x: 0 <= x < 1,
    "in [0, 1]": lambda x: 0 <= x <= 1,
    f"0 or >= {MIN_VOCAB}": lambda x: x == 0 or x >= MIN_VOCAB,
    "4, 8 or none": lambda x: x in (4, 8),
}


def setting(default, help: str, rule: str | None = None, note: str = "", **meta):
    """A TrainConfig field: its default (a callable is a factory, for lists), its --help text, and the RULES
    entry its value must meet, if any (`note` is added to that error message)."""
    if rule is not None and rule not in RULES:
        raise KeyError(f"no rule {rule!r}")
    kind = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kind, metadata={"help": help, "rule": rule, "note": note, **meta})


@dataclass
class TrainConfig:
    # model: exactly one of `model` (fine-tune) or `init` (random init)
    model: str | None = setting(None, "HF model folder or hub id to fine-tune")
    init: str | None = setting(None, "random init instead: small, base, large or a T5 config.json")
    # data
    data: list[str] = setting(lambda: ["../shared/datasets/full.jsonl"], "JSONL files, comma-separated")
    split: Literal["target", "random"] = setting("target", "target: leak-free, by target; random: the original's "
                                                 "leaky row split")
    split_fractions: list[float] | None = setting(None, "train,valid,test (default 0.8,0.1,0.1 target; "
                                                  "0.96,0.02,0.02 random)")
    sample_fraction: float = setting(1.0, "use this fraction of the data (of targets for split target)", "in (0, 1]")
    normalize: bool = setting(True, "fold accents (Maori for Māori) and whitespace in the data")
    max_source_length: int = setting(64, "input tokens kept, EOS included", ">= 2")
    max_target_length: int = setting(64, "target tokens kept, EOS included", ">= 2")
    tokenizer_vocab_size: int = setting(0, "train a SentencePiece tokenizer of this many pieces on the train split, "
                                        "saved with the model (init only; 0: the model's own / Flan-T5's)",
                                        f"0 or >= {MIN_VOCAB}", " (0: the model's tokenizer)")
    augment_copies: int = setting(0, "add N entity-swapped variants of each training row (names copied from the "
                                  "query replaced in query and target; 0: off)", ">= 0")
    augment_invented: float = setting(0.5, "share of swapped names that are invented (the rest come from other "
                                      "training rows)", "in [0, 1]")
    augment_names: Literal["syllables", "letters"] = setting("syllables", "how invented names are spelled: "
                                                             "syllables (a fixed set) or letters (a character "
                                                             "model of the training names)")
    # run
    output_dir: str = setting("runs/latest", "folder for checkpoints, config.yaml, metrics.jsonl")
    epochs: float = setting(3.0, "passes over the training split")  # > 0 unless max_steps is set: see validate
    max_steps: int | None = setting(None, "optimizer steps; overrides epochs", ">= 1")
    batch_size: int = setting(8, "examples per micro-batch", ">= 1")
    grad_accum: int = setting(1, "micro-batches per optimizer step", ">= 1")
    learning_rate: float = setting(3e-4, "peak learning rate", "> 0")
    lr_schedule: Literal["linear", "cosine", "constant"] = setting("linear", "decay after warmup")
    warmup_steps: int = setting(0, "linear warmup steps", ">= 0")
    optimizer: Literal["adamw", "adafactor"] = setting("adamw", "optimizer")
    weight_decay: float = setting(0.0, "decoupled weight decay", ">= 0")
    max_grad_norm: float | None = setting(1.0, "clip the global gradient norm (none: no clipping)", "> 0",
                                          " (or none to disable clipping)")
    dropout: float | None = setting(None, "dropout rate (none: the model config's)", "in [0, 1)")
    seed: int = setting(42, "seed for init, shuffling and the random split")
    dtype: Literal["float32", "bfloat16"] = setting("float32", "training precision (fp16 overflows in T5)",
                                                    aliases={"fp32": "float32", "f32": "float32", "bf16": "bfloat16"})
    # evaluation and logging (steps are optimizer steps)
    eval_every: int = setting(200, "evaluate every N optimizer steps (0: at the end only)", ">= 0",
                              " (0: only at the end)")
    eval_samples: int = setting(200, "validation examples generated per eval (0: all)", ">= 0", " (0: all)")
    eval_batch_size: int = setting(32, "batch size for evaluation", ">= 1")
    eval_num_beams: int = setting(1, "beams when generating for eval", ">= 1")
    eval_max_new_tokens: int = setting(64, "token limit when generating for eval", ">= 1")
    log_every: int = setting(10, "log train loss every N optimizer steps", ">= 1")
    save_every: int = setting(0, "optimizer steps between resume checkpoints (0: at every eval and at the end)",
                              ">= 0", " (0: at every eval)")
    max_minutes: float | None = setting(None, "wall-clock budget: stop (checkpoint, evaluate, save) once it is "
                                        "spent (none: no limit)", "> 0", " (or none for no time limit)")
    # LoRA / QLoRA
    lora: bool = setting(False, "train LoRA adapters instead of all weights")
    lora_rank: int = setting(8, "LoRA rank r", ">= 1")
    lora_alpha: float = setting(16.0, "LoRA alpha (scale alpha / r)", "> 0")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", "in [0, 1)")
    lora_targets: str = setting("qv", f"qv, all, or a comma list of {','.join(LORA_LINEARS)}")
    quantize_base: int | None = setting(None, "4 or 8: quantize the frozen base (QLoRA)", "4, 8 or none")
    fuse: bool = setting(False, "merge the adapters into the saved model")
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory")
    preset: str | None = setting(None, "hardware preset: " + "; ".join(f"{k}: {v}" for k, v in
                                                                       PRESET_DESCRIPTIONS.items()),
                                 choices=tuple(PRESETS))  # named in the metavar; unknown ones fail in validate
    resume: str | None = setting(None, "checkpoint folder to continue from, or auto: the latest in output_dir")
    distributed_timeout: float = setting(300.0, "MLX data-parallel runs (mlx.launch): seconds a rank waits for the "
                                         "others (rank 0's evals included) before stopping with an error", "> 0")

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
        problems = {f.name: p for f in dataclasses.fields(self) if (p := _problem(f, getattr(self, f.name)))}
        if self.dtype in ("float16", "fp16", "half"):
            problems["dtype"] = f"dtype {self.dtype}: T5 overflows in fp16; use bfloat16 or float32"
        if self.max_steps is None and not self.epochs > 0:
            problems["epochs"] = f"epochs must be > 0, got {self.epochs}"
        problems = list(problems.values())

        def need(ok, message):
            if not ok:
                problems.append(message)

        if self.model and self.init:
            problems.append("set either model (fine-tune) or init (random init), not both")
        elif not self.model and not self.init and self.resume in (None, "auto"):
            # a resumed checkpoint names its model; "auto" may find none and start fresh
            problems.append("set model (an HF folder or hub id) or init (small, base, large or a config.json)")
        if self.init and self.init not in FLAN_T5_SHAPES:
            if Path(self.init).suffix != ".json":
                problems.append(f"init must be one of {', '.join(FLAN_T5_SHAPES)} or a config.json path, "
                                f"got {self.init!r}")
            else:
                need(Path(self.init).is_file(), f"init config not found: {self.init}")
        need(self.preset is None or self.preset in PRESETS,
             f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        need(self.data, "data: no data files given")
        problems += [f"data file not found: {path}" for path in self.data if not Path(path).is_file()]
        f = self.split_fractions
        need(f is None or (len(f) == 3 and all(0 <= x <= 1 for x in f) and f[0] > 0 and abs(sum(f) - 1) <= 1e-6),
             f"split_fractions must be three numbers train,valid,test in [0, 1] with train > 0 summing to 1, "
             f"got {f}")
        need(not (self.tokenizer_vocab_size and self.model),
             "tokenizer_vocab_size trains a new vocabulary: it needs init (a model trained from scratch), not a "
             "pretrained model, whose embeddings belong to its tokenizer")
        try:
            parse_lora_targets(self.lora_targets)
        except ValueError as e:
            problems.append(str(e))
        need(self.quantize_base is None or self.lora,
             "quantize_base trains LoRA adapters on a quantized base: it needs lora: true")
        need(not self.fuse or self.lora, "fuse merges LoRA adapters into the model: it needs lora: true")
        need(self.resume in (None, "auto") or Path(self.resume).exists(),
             f"resume checkpoint not found: {self.resume}")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _unwrap(hint):
    """(base type, optional, choices) of a field's type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return str, optional, typing.get_args(hint)
    return hint, optional, None


def _problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with one field's value on its own (its Literal choices, its rule); None: nothing."""
    _, _, choices = _unwrap(_HINTS[f.name])
    rule = f.metadata["rule"]
    if value is None:
        return None
    if choices and value not in choices:
        return f"{f.name} must be one of {', '.join(choices)}, got {value!r}"
    if rule and not RULES[rule](value):
        return f"{f.name} must be {rule}{f.metadata['note']}, got {value}"
    return None


# -- coercion: YAML gives "3e-4" as a string, the command line gives strings -------------------

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in _TRUE + _FALSE:
        raise ValueError(value)
    return word in _TRUE


def _to_int(value) -> int:
    if isinstance(value, str) and "e" in value.lower():  # "1e3"
        value = float(value)
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _to_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def _to_str(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(value)
    return str(value)


_CONVERT = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(name: str, value, source: str = "config"):
    """``value`` as field ``name``'s type; lists also from a comma-separated string, optionals from "none"."""
    base, optional, _ = _unwrap(_HINTS[name])
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be empty")
    aliases = FIELDS[name].metadata.get("aliases")
    if aliases is not None and isinstance(value, str):
        return aliases.get(value.lower(), value.lower())
    is_list = typing.get_origin(base) is list
    try:
        if not is_list:
            return _CONVERT[base](value)
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(value)
        return [_CONVERT[typing.get_args(base)[0]](v) for v in items]
    except (TypeError, ValueError):
        kind = "a list (or a comma-separated string)" if is_list else base.__name__
        raise ConfigError(f"{source}: {name} must be {kind}{' or none' if optional else ''}, got {value!r}") from None


def _coerce_all(values: dict, source: str) -> dict:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    return {k: _coerce(k, v, source) for k, v in values.items()}


# -- files and flags ---------------------------------------------------------------------------

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
    """Add ``--config FILE`` and one flag per TrainConfig field (``--learning-rate``, ``--lora/--no-lora``),
    each with the field's help text and default.

    Flags default to "not given" so only the ones typed override the YAML file and preset.
    Lists are comma-separated (``--data a.jsonl,b.jsonl``); optional values accept ``none``.
    """
    group = parser.add_argument_group("training config (defaults < --preset < --config < flags)")
    group.add_argument("--config", default=None, metavar="FILE", help="YAML file of config keys")
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        base, _, choices = _unwrap(_HINTS[name])
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        if base is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(_flag(name), default=argparse.SUPPRESS, type=_arg_type(name), help=help_text,
                               metavar=_metavar(name, base, f.metadata.get("choices", choices)))
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
