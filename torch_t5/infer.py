"""The torch backend of chat.py / api.py: load a checkpoint, turn queries into subquery strings.

    model, tokenizer = load("runs/base/final")          # HF folder, hub id, LoRA adapter or int8 folder
    generate(model, tokenizer, ["Who lived longer, Tesla or Milankovic?"], num_beams=4)
    # -> ["Nikola Tesla lifespan|Milutin Milankovic lifespan"]
"""

import contextlib
from pathlib import Path

import torch

from reformulation.data import format_source
from reformulation.io import read_json_object

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class InferError(RuntimeError):
    """A checkpoint that cannot be loaded or options that cannot be used; the message says which."""


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load-time chatter (T5 in transformers 5 warns about every untied head)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InferError(f"dtype {dtype!r} not supported (choose {', '.join(DTYPES)}; T5 overflows in float16)")
    return DTYPES[dtype]


def load(path, device: str | None = None, dtype=None, tokenizer: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        path: an HF folder or hub id; a PEFT adapter folder (its base model is loaded and the
            adapter merged in); or an int8 folder written by ``torch_t5.quantize``.
        device: "cpu", "cuda", "mps"; None picks the best available.
        dtype: "float32" / "bfloat16" (or a torch dtype); None: float32.
        tokenizer: folder or hub id of the tokenizer when the model folder has none.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    device = device or default_device()
    torch_dtype = _dtype(dtype)
    local = Path(path).expanduser()
    if not local.exists() and _looks_local(str(path)):
        raise InferError(f"{path}: no such model folder")
    if (local / "quantization.json").is_file():
        from .quantize import QuantizeError, load_int8

        if torch_dtype not in (None, torch.float32):
            raise InferError(f"{path} is an int8 folder: it runs its own int8/fp32 kernels, dtype {dtype!r} does not apply")
        try:
            return load_int8(local, device=device)
        except QuantizeError as e:
            raise InferError(str(e)) from None
    try:
        with quiet_transformers():
            if (local / "adapter_config.json").is_file():
                model, tok_source = _load_adapter(local, torch_dtype)
            else:
                model = AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=torch_dtype or torch.float32)
                tok_source = path
            tok = AutoTokenizer.from_pretrained(str(tokenizer or tok_source))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InferError(f"{path}: could not load ({type(e).__name__}: {first})") from None
    return model.to(device).eval(), tok


def _looks_local(path: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a folder
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _load_adapter(adapter_dir: Path, torch_dtype):
    """Base model named by adapter_config.json + the LoRA weights, merged for plain-speed inference."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    base = read_json_object(adapter_dir / "adapter_config.json", "a PEFT adapter folder",
                            InferError).get("base_model_name_or_path")
    if not base:
        raise InferError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path")
    model = AutoModelForSeq2SeqLM.from_pretrained(base, dtype=torch_dtype or torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # the trainer saves the tokenizer beside the adapter; fall back to the base model's
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    return model, tok_source


@torch.inference_mode()
def generate(model, tokenizer, queries, *, num_beams: int = 1, max_new_tokens: int = 64, batch_size: int = 32,
             normalize: bool = True, fast: bool = True, **generate_kwargs) -> list[str]:
    """Subquery strings ("a|b|c") for each query, in input order.

    Applies ``format_source`` (the training prompt), sorts by length so each padded batch wastes
    little, and decodes greedily (``num_beams=1``) or with beam search. Extra keyword arguments go
    to ``model.generate`` (e.g. ``length_penalty``). Greedy decoding of a T5 on the CPU runs through
    ``torch_t5.greedy`` (same tokens, ~1.6x faster at batch 1) unless ``fast=False``.
    """
    if isinstance(queries, str):
        raise InferError("queries must be a list of strings, not one string")
    queries = list(queries)
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise InferError(f"num_beams, max_new_tokens and batch_size must be >= 1 "
                         f"(got {num_beams}, {max_new_tokens}, {batch_size})")
    sources = [format_source(q, normalize=normalize) for q in queries]
    lengths = [len(ids) for ids in tokenizer(sources)["input_ids"]]
    order = sorted(range(len(sources)), key=lambda i: -lengths[i])
    from .greedy import decoder_for, supported as greedy_supported  # greedy -> quantize -> infer: import late

    device = next(model.parameters()).device
    greedy = fast and num_beams == 1 and set(generate_kwargs) <= {"min_new_tokens"} and greedy_supported(model)
    out = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer([sources[i] for i in idx], return_tensors="pt", padding=True).to(device)
        if greedy:
            ids = decoder_for(model)(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                     min_new_tokens=generate_kwargs.get("min_new_tokens", 0))
        else:
            ids = model.generate(**batch, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                                 **generate_kwargs)
        for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            out[i] = text.strip()
    return out
