"""Load a checkpoint, turn queries into subquery strings (torch_t5.engine serves these to chat and the API).

    model, tokenizer = load("runs/base/final")          # HF folder, hub id, LoRA adapter or int8 folder
    generate(model, tokenizer, ["Who lived longer, Tesla or Milankovic?"], num_beams=4)
    # -> ["Nikola Tesla lifespan|Milutin Milankovic lifespan"]
    for piece in stream_generate(model, tokenizer, "Who lived longer, Tesla or Milankovic?"):
        print(piece, end="")
"""

import threading
from pathlib import Path
from typing import Iterator

import torch

from reformulation.data import format_source, text_pieces
from reformulation.engine import first_line
from reformulation.io import read_json_object

from .greedy import decoder_for, supported as greedy_supported
from .hf import quiet_transformers
from .int8 import QuantizeError, is_int8_folder, load_int8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class InferError(RuntimeError):
    """A checkpoint that cannot be loaded or options that cannot be used; the message says which."""


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
            adapter merged in); or an int8 folder written by ``python -m torch_t5.quantize``.
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
    if is_int8_folder(local):
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
        raise InferError(f"{path}: could not load ({type(e).__name__}: {first_line(e)})") from None
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


def _sampling(temperature: float) -> dict:
    """model.generate's options for temperature (0 = greedy): plain softmax sampling, no top-k cut."""
    return {"do_sample": True, "temperature": float(temperature), "top_k": 0} if temperature > 0 else \
        {"do_sample": False}


@torch.inference_mode()
def generate(model, tokenizer, queries, *, num_beams: int = 1, max_new_tokens: int = 64, temperature: float = 0.0,
             batch_size: int = 32, normalize: bool = True, fast: bool = True, **generate_kwargs) -> list[str]:
    """Subquery strings ("a|b|c") for each query, in input order.

    Applies ``format_source`` (the training prompt), sorts by length so each padded batch wastes
    little, and decodes greedily (``num_beams=1``), with beam search, or by sampling (``temperature > 0``).
    Extra keyword arguments go to ``model.generate`` (e.g. ``length_penalty``). Greedy decoding of a T5
    on the CPU runs through ``torch_t5.greedy`` (same tokens, ~1.6x faster at batch 1) unless ``fast=False``.
    """
    if isinstance(queries, str):
        raise InferError("queries must be a list of strings, not one string")
    queries = list(queries)
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise InferError(f"num_beams, max_new_tokens and batch_size must be >= 1 "
                         f"(got {num_beams}, {max_new_tokens}, {batch_size})")
    if temperature < 0 or (temperature > 0 and num_beams > 1):
        raise InferError(f"temperature must be >= 0, and 0 with beam search (got {temperature}, {num_beams} beams)")
    sources = [format_source(q, normalize=normalize) for q in queries]
    lengths = [len(ids) for ids in tokenizer(sources)["input_ids"]]
    order = sorted(range(len(sources)), key=lambda i: -lengths[i])
    device = next(model.parameters()).device
    greedy = fast and num_beams == 1 and temperature == 0 and set(generate_kwargs) <= {"min_new_tokens"} and \
        greedy_supported(model)
    out = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer([sources[i] for i in idx], return_tensors="pt", padding=True).to(device)
        if greedy:
            ids = decoder_for(model)(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                     min_new_tokens=generate_kwargs.get("min_new_tokens", 0))
        else:
            ids = model.generate(**batch, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                 **_sampling(temperature), **generate_kwargs)
        for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


def stream_generate(model, tokenizer, query: str, *, max_new_tokens: int = 64,
                    temperature: float = 0.0) -> Iterator[str]:
    """One query's answer as text pieces, as the tokens come; greedy or sampled. The pieces join to what
    ``generate`` returns. Closing the iterator stops generation (chat's Ctrl-C, a client that left)."""
    batch = tokenizer([format_source(query)], return_tensors="pt")
    if temperature == 0 and greedy_supported(model):
        # torch_t5.greedy step by step, in this thread: stopping the iteration cancels it
        steps = decoder_for(model).steps(batch["input_ids"], batch["attention_mask"], max_new_tokens)
        yield from text_pieces(tokenizer, (int(step[0]) for step in steps))
        return
    yield from _stream_on_thread(model, tokenizer, batch, max_new_tokens, temperature)


def _stream_on_thread(model, tokenizer, batch, max_new_tokens: int, temperature: float) -> Iterator[str]:
    """model.generate on a worker thread, its TextIteratorStreamer read here; a worker's exception is
    raised here, and leaving the loop stops the worker at its next token."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    cancel = threading.Event()

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    batch = batch.to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    failure = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=max_new_tokens, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([Cancelled()]), **_sampling(temperature))
        except Exception as err:  # raised in the consumer's thread below
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=run, name="torch-stream", daemon=True)
    worker.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        cancel.set()
        worker.join()
    if failure:
        raise failure[0]
