"""LoRA adapters both ways between MLX (mlx_t5.lora / mlx-lm layout) and PEFT, and fusing them into a base.

    MLX   adapters.safetensors     encoder.block.0.layer.0.SelfAttention.q.lora_a   (in, r)   + explicit scale
                                   encoder.block.0.layer.0.SelfAttention.q.lora_b   (r, out)
    PEFT  adapter_model.safetensors
          base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight    (r, in)   scale = lora_alpha / r
          base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight    (out, r)  (rsLoRA: / sqrt(r))

Both compute W x + scale * B (A x), so converting is a transpose per matrix and lora_alpha = scale * r.
"""

import json
import math
import re
from pathlib import Path
from typing import Optional, Union

import mlx_t5  # noqa: I001  (first: it preloads OpenBLAS before mlx is imported)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_t5.lora import ADAPTER_FILE, CONFIG_FILE, fuse_lora, load_adapters, path_order
from reformulation.constants import LORA_ATTENTION, LORA_FFN, LORA_LINEARS, LORA_PARENTS, lora_targets_label
from reformulation.io import atomic_dir, read_json_object

from .checkpoints import SideFiles, load_checkpoint, model_args, read_config, save_checkpoint
from .errors import ConvertError

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
_MLX_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[ab])$")

PathLike = Union[str, Path]


def _read_tensors(path: Path, what: str) -> dict[str, np.ndarray]:
    """(float32 numpy arrays, bf16 / fp16 widened exactly; the dtype name of the file's tensors)."""
    if not path.is_file():
        raise ConvertError(f"{path.parent}: no {path.name} (not {what})")
    try:
        tensors = mx.load(str(path))
    except Exception as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: np.array(v.astype(mx.float32)) for k, v in tensors.items()}, _dtype_name(tensors)


def _dtype_name(tensors: dict) -> str:
    dtypes = {str(v.dtype).rsplit(".", 1)[-1] for v in tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _pairs(tensors: dict[str, np.ndarray], pattern: re.Pattern, names: tuple[str, str], where: Path) -> dict:
    """{module path: (a, b)} from `.lora_a/.lora_b` (or PEFT's lora_A/lora_B) keys; anything else is an error."""
    found, unknown = {}, []
    for key, value in tensors.items():
        m = pattern.match(key)
        if m is None:
            unknown.append(key)
            continue
        found.setdefault(m["path"], {})[m["which"]] = value
    if unknown:
        raise ConvertError(f"{where}: unknown tensors (only LoRA {names[0]}/{names[1]} matrices convert): "
                           f"{', '.join(sorted(unknown)[:6])}")
    half = sorted(p for p, ab in found.items() if len(ab) != 2)
    if half:
        raise ConvertError(f"{where}: {half[0]} has only one of {names[0]}/{names[1]}")
    if not found:
        raise ConvertError(f"{where}: no LoRA tensors")
    return {p: tuple(ab[k] for k in sorted(ab)) for p, ab in found.items()}


def _linear_shapes(base: PathLike) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} of the base's Linear layers, from its config.json alone (lazy init, no weights)."""
    model = mlx_t5.Model(model_args(base))
    shapes = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out_features, in_features = module.weight.shape
            shapes[path] = (in_features, out_features)
    return shapes


def check_adaptable(paths, where: Path):
    """mlx_t5.lora wraps the attention and FFN Linears only (not lm_head, not embeddings)."""
    bad = [p for p in sorted(paths) if p.rsplit(".", 1)[-1] not in LORA_LINEARS
           or p.split(".")[-2:-1] not in [[parent] for parent in LORA_PARENTS]]
    if bad:
        raise ConvertError(f"{where}: LoRA on {', '.join(bad[:4])}: mlx_t5.lora adapts only the attention "
                           f"({', '.join(LORA_ATTENTION)}) and FFN ({', '.join(LORA_FFN)}) layers")


def check_targets(modules: dict[str, tuple[int, int, int]], base: PathLike, where: Path):
    """modules: {path: (in, out, rank)}. Every adapter must sit on a Linear of the base with the same sizes."""
    shapes = _linear_shapes(base)
    absent = sorted(p for p in modules if p not in shapes)
    if absent:
        raise ConvertError(f"{where}: adapters for modules that {base} does not have (or that are not Linear): "
                           f"{', '.join(absent[:6])}")
    wrong = [f"{p} in={i} out={o} but the base has in={shapes[p][0]} out={shapes[p][1]}"
             for p, (i, o, _) in sorted(modules.items()) if (i, o) != shapes[p]]
    if wrong:
        raise ConvertError(f"{where}: adapter shapes do not match {base}: {'; '.join(wrong[:4])}")


def mlx_to_peft(adapters_dir: PathLike, base_dir: PathLike, out_dir: PathLike) -> dict:
    """MLX adapters.safetensors + adapter_config.json -> PEFT adapter folder; returns the PEFT config dict."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapters_dir = Path(adapters_dir)
    config = read_json_object(adapters_dir / CONFIG_FILE, "an MLX adapter folder", ConvertError)
    params = config.get("lora_parameters")
    if config.get("fine_tune_type", "lora") != "lora" or not isinstance(params, dict) or "scale" not in params:
        raise ConvertError(f"{adapters_dir / CONFIG_FILE}: expected fine_tune_type 'lora' with "
                           f"lora_parameters.scale (DoRA and full fine-tunes do not convert)")
    where = adapters_dir / ADAPTER_FILE
    tensors, dtype = _read_tensors(where, "an MLX adapter folder")
    pairs = _pairs(tensors, _MLX_KEY, ("lora_a", "lora_b"), where)
    modules = {}
    for path, (a, b) in pairs.items():  # a: (in, r), b: (r, out)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ConvertError(f"{where}: {path}: lora_a {a.shape} and lora_b {b.shape} are not (in, r) and (r, out)")
        modules[path] = (a.shape[0], b.shape[1], a.shape[1])
    ranks = {r for _, _, r in modules.values()}
    if len(ranks) != 1:
        raise ConvertError(f"{where}: adapters of different ranks {sorted(ranks)}; "
                           f"PEFT would need a rank_pattern, not supported")
    rank = ranks.pop()
    listed = config.get("target_modules")
    if listed is not None and sorted(listed) != sorted(modules):
        raise ConvertError(f"{adapters_dir / CONFIG_FILE}: target_modules do not match the tensors in {ADAPTER_FILE}")
    check_targets(modules, base_dir, where)

    scale = float(params["scale"])
    targets = sorted(modules, key=path_order)
    peft_config = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=float(params.get("dropout", 0.0)),
                             target_modules=targets, task_type="SEQ_2_SEQ_LM", bias="none",
                             base_model_name_or_path=str(config.get("base_model") or base_dir))
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    state = {}
    for path in targets:
        a, b = pairs[path]
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(a.T)).to(torch_dtype)
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(b.T)).to(torch_dtype)
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))
    return peft_config.to_dict()


def _pattern_value(pattern: dict, path: str, default):
    for key, value in (pattern or {}).items():  # PEFT matches pattern keys against the end of the module path
        if re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def _peft_scale(config: dict, path: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_peft_config(peft_dir: Path) -> dict:
    config = read_json_object(peft_dir / CONFIG_FILE, "a PEFT adapter folder", ConvertError)
    path = peft_dir / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise ConvertError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters convert")
    unsupported = [(k, v) for k, v in (("use_dora", True), ("fan_in_fan_out", True), ("lora_bias", True))
                   if config.get(k) == v]
    if config.get("bias", "none") != "none":
        unsupported.append(("bias", config["bias"]))
    if config.get("modules_to_save"):
        unsupported.append(("modules_to_save", config["modules_to_save"]))
    if unsupported:
        raise ConvertError(f"{path}: not expressible as MLX LoRA adapters: "
                           f"{', '.join(f'{k}={v!r}' for k, v in unsupported)}")
    return config


def peft_to_mlx(peft_dir: PathLike, out_dir: PathLike, base_dir: Optional[PathLike] = None) -> dict:
    """PEFT LoRA adapter folder -> MLX adapters.safetensors + adapter_config.json; returns the MLX config.

    `base_dir`, when given, is checked to have every target module with the adapter's sizes.
    """
    peft_dir = Path(peft_dir)
    config = read_peft_config(peft_dir)
    where = peft_dir / PEFT_WEIGHTS
    tensors, dtype = _read_tensors(where, "a PEFT adapter folder")
    pairs = _pairs(tensors, _PEFT_KEY, ("lora_A", "lora_B"), where)
    modules, scales = {}, {}
    for path, (A, B) in pairs.items():  # A: (r, in), B: (out, r)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ConvertError(f"{where}: {path}: lora_A {A.shape} and lora_B {B.shape} are not (r, in) and (out, r)")
        rank = A.shape[0]
        modules[path] = (A.shape[1], B.shape[0], rank)
        scales[path] = _peft_scale(config, path, rank)
    if len({r for *_, r in modules.values()}) != 1 or len(set(scales.values())) != 1:
        raise ConvertError(f"{peft_dir / CONFIG_FILE}: modules have different ranks or alphas (rank_pattern / "
                           f"alpha_pattern); MLX adapters share one rank and scale")
    rank = next(iter(modules.values()))[2]
    scale = next(iter(scales.values()))
    check_adaptable(modules, where)
    if base_dir is not None:
        check_targets(modules, base_dir, where)
    targets = sorted(modules, key=path_order)
    mlx_config = {
        "fine_tune_type": "lora",
        "base_model": config.get("base_model_name_or_path"),
        "lora_parameters": {"rank": rank, "alpha": scale * rank, "scale": scale,
                            "dropout": float(config.get("lora_dropout", 0.0)), "targets": lora_targets_label(targets)},
        "target_modules": targets,
    }
    mx_dtype = {"bfloat16": mx.bfloat16, "float16": mx.float16}.get(dtype, mx.float32)
    weights = {}
    for path in targets:
        A, B = pairs[path]
        weights[f"{path}.lora_a"] = mx.array(np.ascontiguousarray(A.T)).astype(mx_dtype)
        weights[f"{path}.lora_b"] = mx.array(np.ascontiguousarray(B.T)).astype(mx_dtype)
    with atomic_dir(Path(out_dir)) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), weights, metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(mlx_config, indent=2) + "\n")
    return mlx_config


def is_peft_folder(folder: PathLike) -> bool:
    return (Path(folder) / PEFT_WEIGHTS).is_file()


def fuse(base_dir: PathLike, adapters_dir: PathLike, out_dir: PathLike, dequantize: bool = False) -> str:
    """Merge LoRA adapters into their base and write a plain checkpoint; returns "mlx" or "peft".

    MLX adapters (adapters.safetensors) are fused with mlx_t5 (a quantized base stays quantized unless
    `dequantize`); PEFT folders (adapter_model.safetensors) with peft's merge_and_unload on an HF base.
    """
    adapters_dir = Path(adapters_dir)
    if is_peft_folder(adapters_dir):
        _fuse_peft(base_dir, adapters_dir, out_dir)
        return "peft"
    if not (adapters_dir / ADAPTER_FILE).is_file():
        raise ConvertError(f"{adapters_dir}: neither {ADAPTER_FILE} (MLX) nor {PEFT_WEIGHTS} (PEFT)")
    model = load_checkpoint(base_dir)
    try:
        load_adapters(model, adapters_dir)
    except (mlx_t5.LoadError, ValueError) as e:
        raise ConvertError(str(e)) from None
    fuse_lora(model, dequantize=dequantize)
    save_checkpoint(model, out_dir, base_dir)
    return "mlx"


def _fuse_peft(base_dir: PathLike, peft_dir: Path, out_dir: PathLike):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    config = read_config(base_dir)
    if config.get("quantization"):
        raise ConvertError(f"{base_dir}: quantized MLX checkpoint; PEFT fusing needs a float base "
                           f"(python -m convert mlx-to-hf first)")
    read_peft_config(peft_dir)
    tensors, _ = _read_tensors(peft_dir / PEFT_WEIGHTS, "a PEFT adapter folder")
    pairs = _pairs(tensors, _PEFT_KEY, ("lora_A", "lora_B"), peft_dir / PEFT_WEIGHTS)
    check_targets({p: (A.shape[1], B.shape[0], A.shape[0]) for p, (A, B) in pairs.items()}, base_dir,
                  peft_dir / PEFT_WEIGHTS)
    if Path(out_dir).resolve() == Path(base_dir).resolve():
        raise ConvertError(f"{out_dir}: output folder is the base folder; choose another --out")
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base_dir), dtype="auto")
    merged = PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload()
    # transformers 5 may report an untied checkpoint as tied once loaded: keep what the base's config says
    merged.config.tie_word_embeddings = bool(config.get("tie_word_embeddings", True))
    with atomic_dir(Path(out_dir)) as tmp:
        merged.save_pretrained(str(tmp))
        SideFiles(base_dir).save_pretrained(str(tmp))
