"""LoRA / QLoRA adapters for T5: inject, save, load, fuse.

mlx-lm's `linear_to_lora_layers` assumes a decoder-only `model.layers`; T5 has two stacks and three
attentions per decoder block, so this module finds the Linear layers by their HF names instead and wraps
them in mlx-lm's `LoRALinear` (which also wraps `QuantizedLinear`: that is QLoRA).

Adapter files follow mlx-lm: `adapters.safetensors` (only `lora_a` (in, r) / `lora_b` (r, out), keys like
`encoder.block.0.layer.0.SelfAttention.q.lora_a`) and `adapter_config.json`.
"""

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from reformulation.constants import LORA_PARENTS, lora_targets_label, parse_lora_targets
from reformulation.io import atomic_dir, read_json_object

from .model import Dropout
from .utils import LoadError

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def _linear_paths(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Module paths of the Linear layers whose last name is in `names` (q, v, wo, ...) or whose full
    path is in `names`, inside the attentions and FFNs (never `lm_head`)."""
    wanted = set(names)
    paths = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            continue
        parts = path.split(".")
        in_block = len(parts) > 2 and parts[-2] in LORA_PARENTS
        if in_block and (parts[-1] in wanted or path in wanted):
            paths.append(path)
    return sorted(paths, key=path_order)


def path_order(path: str):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _get(model: nn.Module, path: str):
    module = model
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else module[part]
    return module


def _set(model: nn.Module, path: str, value: nn.Module):
    parent_path, _, name = path.rpartition(".")
    _get(model, parent_path)[name] = value


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Union[str, Sequence[str]] = "qv") -> list[str]:
    """Freeze the model and wrap the target Linear (or QuantizedLinear) layers in LoRALinear.

    Args:
        rank: r of the low-rank update; alpha: its scale is alpha / rank (PEFT's convention).
        dropout: dropout on the adapter input.
        targets: "qv" (q and v of every attention: encoder self, decoder self and cross),
            "all" (q, k, v, o and the FFN's wi / wi_0 / wi_1 / wo), or a list of those names
            or of full module paths.

    Returns:
        The wrapped module paths, e.g. "encoder.block.0.layer.0.SelfAttention.q".
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    paths = _linear_paths(model, parse_lora_targets(targets, "LoRA targets", paths=True))
    if not paths:
        raise ValueError(f"no Linear layer of the model matches LoRA targets {targets!r}")
    model.freeze()
    for path in paths:
        layer = LoRALinear.from_base(_get(model, path), r=rank, dropout=dropout, scale=alpha / rank)
        layer.dropout = Dropout(dropout)  # the same dropout, its rate readable for adapter_config.json
        _set(model, path, layer)
    return paths


def lora_modules(model: nn.Module) -> list[str]:
    """Paths of the LoRALinear modules in `model`."""
    return sorted((p for p, m in model.named_modules() if isinstance(m, LoRALinear)), key=path_order)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def adapter_config(model: nn.Module, meta: Optional[dict] = None) -> dict:
    """adapter_config.json for the adapters in `model`; `meta` adds keys (base_model, lora_parameters, ...)."""
    paths = lora_modules(model)
    if not paths:
        raise ValueError("the model has no LoRA layers (call apply_lora first)")
    first = _get(model, paths[0])
    rank = first.lora_a.shape[1]
    config = {
        "fine_tune_type": "lora",
        "base_model": None,
        "lora_parameters": {"rank": rank, "alpha": float(first.scale * rank), "scale": float(first.scale),
                            "dropout": float(first.dropout.p), "targets": lora_targets_label(paths)},
        "target_modules": paths,
    }
    for key, value in (meta or {}).items():
        if key == "lora_parameters":
            config["lora_parameters"].update(value)
        else:
            config[key] = value
    return config


def save_adapters(model: nn.Module, folder: Union[str, Path], meta: Optional[dict] = None) -> Path:
    """Write `adapters.safetensors` (lora_a / lora_b only) and `adapter_config.json` atomically.

    Args:
        meta: extra keys for adapter_config.json, e.g. {"base_model": "google/flan-t5-small"};
            a "lora_parameters" dict is merged into the derived one.
    """
    config = adapter_config(model, meta)
    weights = adapter_weights(model)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), weights, metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder: Union[str, Path]) -> dict:
    path = Path(folder) / CONFIG_FILE
    config = read_json_object(path, "an adapter folder", LoadError)
    params = config.get("lora_parameters")
    if config.get("fine_tune_type", "lora") != "lora" or not isinstance(params, dict):
        raise LoadError(f"{path}: expected fine_tune_type 'lora' with lora_parameters")
    missing = [k for k in ("rank", "scale") if k not in params]
    if missing or not config.get("target_modules"):
        raise LoadError(f"{path}: missing {', '.join(missing + ([] if config.get('target_modules') else ['target_modules']))}")
    return config


def load_adapters(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Wrap the layers named in `folder`'s adapter_config.json and load its adapter weights (strict)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    params = config["lora_parameters"]
    weights_file = folder / ADAPTER_FILE
    if not weights_file.is_file():
        raise LoadError(f"{folder}: no {ADAPTER_FILE}")
    rank, scale = int(params["rank"]), float(params["scale"])
    paths = config["target_modules"]
    if not lora_modules(model):
        try:
            wrapped = apply_lora(model, rank=rank, alpha=scale * rank, dropout=float(params.get("dropout", 0.0)),
                                 targets=paths)
        except ValueError as err:
            raise LoadError(f"{folder / CONFIG_FILE}: {err}") from None
        if sorted(wrapped) != sorted(paths):
            missing = sorted(set(paths) - set(wrapped))
            raise LoadError(f"{folder / CONFIG_FILE}: target modules not in the model: {', '.join(missing[:10])}")
    try:
        weights = mx.load(str(weights_file))
    except Exception as err:  # truncated or not safetensors
        raise LoadError(f"{weights_file}: cannot read ({err})") from None
    expected = adapter_weights(model)
    if set(weights) != set(expected):
        extra, missing = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
        raise LoadError(f"{weights_file}: adapters do not match the model (missing: {missing[:5]}, "
                        f"unexpected: {extra[:5]})")
    bad = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if bad:
        raise LoadError(f"{weights_file}: shape mismatch for {', '.join(bad[:5])} "
                        f"({tuple(weights[bad[0]].shape)} != {tuple(expected[bad[0]].shape)})")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every LoRA update into its base layer: W + scale * (lora_a @ lora_b)^T.

    A quantized base is re-quantized after merging unless `dequantize`; with `dequantize=True`
    every quantized layer of the model becomes a plain one and `model.args.quantization` is cleared,
    so the saved checkpoint is a full-precision model.
    """
    for path in lora_modules(model):
        _set(model, path, _get(model, path).fuse(dequantize=dequantize))
    if dequantize:  # the layers without adapters too: the saved checkpoint is all float
        from .quantize import dequantize_model

        model = dequantize_model(model)
    model.unfreeze()
    for _, module in model.named_modules():  # what nn.quantize leaves: quantized weights are not trainable
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            module.freeze()
    mx.eval(model.parameters())
    return model

