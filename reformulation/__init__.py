"""Shared core of the query-reformulation project: data, prompt, metrics, config, reporting.

Framework-free: importing it never imports mlx or torch. Names are imported on first use
(PEP 562), so ``python -m reformulation.data`` runs its module once, and ``import reformulation``
stays cheap.
"""

import importlib
import typing

_EXPORTS = {
    "config": ("PRESETS", "PRESET_DESCRIPTIONS", "ConfigError", "TrainConfig", "add_config_args", "config_from_args",
               "load_config", "print_config"),
    "data": ("PROMPT_PREFIX", "SEPARATOR", "DataError", "DuplicateRowsWarning", "Example", "LoadResult", "Splits",
             "format_source", "format_target", "load_examples", "make_splits", "normalize_text", "pad_batch",
             "parse_subqueries", "random_split", "read_jsonl", "shift_right", "split_by_target", "tokenize"),
    "io": ("atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"),
    "metrics": ("rouge_l", "score"),
    "reporting": ("MetricsLog", "plot_curves", "read_metrics", "summary_table"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'reformulation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if typing.TYPE_CHECKING:  # for type checkers and IDEs
    from .config import (
        PRESET_DESCRIPTIONS,
        PRESETS,
        ConfigError,
        TrainConfig,
        add_config_args,
        config_from_args,
        load_config,
        print_config,
    )
    from .data import (
        PROMPT_PREFIX,
        SEPARATOR,
        DataError,
        DuplicateRowsWarning,
        Example,
        LoadResult,
        Splits,
        format_source,
        format_target,
        load_examples,
        make_splits,
        normalize_text,
        pad_batch,
        parse_subqueries,
        random_split,
        read_jsonl,
        shift_right,
        split_by_target,
        tokenize,
    )
    from .io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
    from .metrics import rouge_l, score
    from .reporting import MetricsLog, plot_curves, read_metrics, summary_table
