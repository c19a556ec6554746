"""Int8Linear and the int8 folder format: dynamic int8 quantization of a T5 for CPU serving.

Every ``nn.Linear`` (attention q/k/v/o, the FFN, ``lm_head``) becomes an ``Int8Linear``: int8
weights with one fp32 scale per output channel, and activations quantized per token at run time
(W8A8 dynamic), multiplied with ``torch._int_mm`` (int8 x int8 -> int32) on CPU. Embeddings,
RMS norms and the relative-position bias tables stay fp32.

Why not ``torch.ao.quantization.quantize_dynamic``: it is deprecated (torchao replaces it), and its
packed ``_packed_params`` are opaque objects that neither safetensors nor ``torch.load(...,
weights_only=True)`` can hold. Here the quantized state is two plain tensors per layer, so the
folder is a safetensors file plus a JSON marker: no pickle, no re-quantization on load, and what
was measured after ``quantize_model`` is bit for bit what ``load_int8`` serves.

Folder layout: ``config.json`` (the HF config, unchanged), ``quantized_int8.safetensors`` (named so
that ``from_pretrained`` and the MLX loader refuse it rather than read int8 as floats),
``quantization.json`` and the tokenizer files. ``python -m torch_t5.quantize`` writes one.
"""

import fnmatch
import warnings
from pathlib import Path

import torch
from torch import nn

from reformulation.io import atomic_dir, atomic_write_json, read_json_object

from .hf import quiet_transformers

WEIGHTS_FILE = "quantized_int8.safetensors"
MARKER_FILE = "quantization.json"
FORMAT = "torch_t5.int8_dynamic"
FORMAT_VERSION = 1
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


class QuantizeError(RuntimeError):
    """A model folder that cannot be quantized or an int8 folder that cannot be loaded."""


def _version(t: torch.Tensor) -> int:
    """In-place change counter. Inference tensors (made under inference_mode) track none: the fused copies
    GreedyDecoder builds are such tensors, and nothing edits them."""
    return -1 if t.is_inference() else t._version


# fbgemm's int8 kernels (x86); where the engine is another one (qnnpack on ARM) or gone, _int_mm runs
_FBGEMM = torch.backends.quantized.engine in ("x86", "fbgemm") and hasattr(torch.ops.quantized, "linear_dynamic")


def _has_vnni() -> bool:
    """AVX-512 VNNI / AVX-VNNI: int8 dot products accumulate in int32. Without them fbgemm's u8 x s8 pairs
    sum in int16 and can saturate, which is why torch's dynamic Linear keeps activations to 7 bits."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


_REDUCE_RANGE = not _has_vnni()


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (symmetric, per output channel) and x quantized per row at run time.

    On x86 CPUs the matmul is fbgemm's prepacked int8 kernel (``quantized::linear_dynamic``, the one
    behind torch's dynamic quantization; 2-5x faster than ``torch._int_mm`` for one decoding row).
    That op picks one activation range per call, for the whole batch; each row is first divided by
    its abs-max and two constant columns (+1, -1, against zero weights) pin every row's range to
    [-1, 1], so the scale is per row again and a query's result does not depend on its batch.
    Activations get 8 bits on CPUs with VNNI, 7 elsewhere (see _has_vnni).
    Elsewhere (CUDA, ARM): int8 x int8 -> int32 with ``torch._int_mm`` (or a float matmul on CUDA).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None
        self._packed = self._packed_for = None  # fbgemm's packed weight: derived, never saved
        self._pins = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        # 127 both ways: a symmetric grid keeps zero exact and the int32 accumulation free of offsets
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device)
        q.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        q.weight_scale.copy_(scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    @classmethod
    def concat(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing the given bias-free layers' outputs side by side (q, k and v in one matmul)."""
        if len({layer.in_features for layer in layers}) != 1 or any(layer.bias is not None for layer in layers):
            raise ValueError("concat needs bias-free layers of the same input size")
        fused = cls(layers[0].in_features, sum(layer.out_features for layer in layers), device=layers[0].weight.device)
        fused.weight = torch.cat([layer.weight for layer in layers])
        fused.weight_scale = torch.cat([layer.weight_scale for layer in layers])
        return fused

    def _fbgemm_weight(self):
        """The packed weight (with its two zero columns), rebuilt when the int8 weights change; None
        where fbgemm cannot pack it (forward then uses _int_mm)."""
        key = (_version(self.weight), _version(self.weight_scale))
        if self._packed_for is None or self._packed_for[0] is not self.weight or self._packed_for[1] != key:
            w = torch.cat([self.weight, self.weight.new_zeros(self.out_features, 2)], dim=1)
            try:
                with warnings.catch_warnings():  # quantized tensors are deprecated: hence the fallback
                    warnings.simplefilter("ignore", UserWarning)
                    qweight = torch._make_per_channel_quantized_tensor(
                        w, self.weight_scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                    self._packed = torch.ops.quantized.linear_prepack(qweight, None)
            except (RuntimeError, AttributeError):
                self._packed = None
            self._packed_for = (self.weight, key)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul_2d(x.reshape(-1, self.in_features).float())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def matmul_2d(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T for a (rows, in_features) float32 x, without the bias (the decoding loop's entry)."""
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
        packed = self._fbgemm_weight() if x.device.type == "cpu" and _FBGEMM else None
        if packed is not None:
            if self._pins is None or self._pins.shape[0] < x.shape[0]:
                self._pins = x.new_tensor([[1.0, -1.0]]).expand(max(x.shape[0], 64), 2)
            x = torch.cat([x / x_scale, self._pins[:x.shape[0]]], dim=1)
            return torch.ops.quantized.linear_dynamic(x, packed, _REDUCE_RANGE).mul_(x_scale)
        x_scale = x_scale / 127.0
        xq = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
        if xq.device.type == "cpu":
            acc = torch._int_mm(xq, self.weight.t()).float()
        else:  # _int_mm on CUDA wants M > 16 and multiples of 8: same integers, float accumulation
            acc = xq.float() @ self.weight.float().t()
        return acc * x_scale * self.weight_scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _skipped(name: str, skip) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern) or name == pattern
               for pattern in skip)


def quantize_model(model: nn.Module, skip=()) -> list[str]:
    """Swap every nn.Linear of ``model`` (in place) for an Int8Linear; return the swapped names.

    ``skip``: module names, name suffixes ("wo") or glob patterns ("decoder.*") to keep in float.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not _skipped(name, skip)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module))
    return [name for name, _ in targets]


def save_int8(model, tokenizer, out_dir, modules: list[str], source: str | None = None) -> Path:
    """Write an int8 folder atomically (safetensors + quantization.json + config + tokenizer)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied tensors (embed_tokens, a tied fp32 lm_head) are views of shared.weight: write it once
    for alias in _ALIASES:
        if alias in state and state[alias].data_ptr() == state["shared.weight"].data_ptr():
            del state[alias]
    marker = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "weights": "int8, symmetric, one fp32 scale per output channel",
        "activations": "int8, symmetric, one scale per token, computed at run time",
        "modules": modules,
        "source": source,
        "torch": torch.__version__,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "quantization": FORMAT})
        model.config.to_json_file(str(tmp / "config.json"))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / MARKER_FILE, marker)
    return out_dir


def is_int8_folder(path) -> bool:
    return (Path(path).expanduser() / MARKER_FILE).is_file()


def _read_marker(path: Path) -> dict:
    marker_file = path / MARKER_FILE
    marker = read_json_object(marker_file, "an int8 folder written by torch_t5.quantize", QuantizeError)
    if marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        raise QuantizeError(f"{marker_file}: format {marker.get('format')!r} v{marker.get('version')} is not "
                            f"{FORMAT!r} v{FORMAT_VERSION}")
    return marker


def load_int8(path, device: str = "cpu"):
    """Load an int8 folder written by ``quantize`` as ``(model, tokenizer)`` in eval mode.

    Args:
        path: the folder (``quantization.json``, ``quantized_int8.safetensors``, ``config.json``).
        device: where to put it; the int8 kernel is the CPU one (other devices use a float fallback).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    marker = _read_marker(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise QuantizeError(f"{path}: {WEIGHTS_FILE} is missing")
    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):  # no random init of weights that are overwritten next
            model = AutoModelForSeq2SeqLM.from_config(config)
    for name in marker["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise QuantizeError(f"{path / MARKER_FILE}: module {name!r} is not in the model of config.json") from None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                          device="meta"))
    state = load_file(str(weights_file), device=device)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - set(_ALIASES))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise QuantizeError(f"{weights_file}: does not match config.json + {MARKER_FILE} "
                            f"(missing {missing[:10]}, unexpected {unexpected[:10]})")
    model.load_state_dict(state, strict=False, assign=True)
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    if "lm_head.weight" not in state and not isinstance(model.lm_head, Int8Linear):
        model.lm_head.weight = model.shared.weight  # T5 v1.0: tied head kept in fp32
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise QuantizeError(f"{weights_file}: tensors not filled from the checkpoint: {still_meta[:10]}")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
