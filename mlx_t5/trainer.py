"""The MLX fine-tuning loop: batching, optimizer and schedule, compiled step, evaluation, checkpoints, resume.

`Trainer(cfg).train()` runs a whole job from a validated `reformulation.config.TrainConfig`;
`python -m mlx_t5.train` is its command line. The pieces are importable on their own (`epoch_batches`,
`collate`, `build_optimizer`, `build_schedule`, `make_step`, `evaluate`) for tests and benchmarks.

Numerics follow transformers + torch.optim.AdamW: token-weighted mean cross-entropy over labels != -100
(also across gradient-accumulation micro-batches), AdamW with bias correction, decoupled weight decay that
skips the RMS-norm weights (as the HF Trainer does), torch's global-norm clipping, HF's linear / cosine
schedules with linear warmup. Master weights and optimizer state are always float32; `dtype: bfloat16`
runs the forward and backward passes in bfloat16 (weights cast inside the step), the loss in float32.
"""

import math
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from reformulation.config import TrainConfig
from reformulation.constants import GROUP_SIZE
from reformulation.data import DuplicateRowsWarning, Splits, load_examples, make_splits, shift_right, tokenize
from reformulation.io import atomic_dir, atomic_write_json, atomic_write_text, read_json_object
from reformulation.metrics import score
from reformulation.reporting import MetricsLog, examples_table, plot_curves, read_metrics, summary_table
from reformulation.recipe import task_tokenizer, training_examples
from reformulation.run import BEST_DIR, FINAL_DIR, eval_indices, is_better

from .distributed import World, file_digest
from .generation import generate
from .init import init_model
from .lora import CONFIG_FILE as ADAPTER_CONFIG, adapter_config, adapter_weights, apply_lora, fuse_lora
from .lora import ADAPTER_FILE, load_adapters
from .model import Block, Dropout, Model, loss_fn, summed_token_loss
from .quantize import quantize_model
from .utils import DTYPES, load, load_tokenizer, model_config, save

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO_ROOT.parent / "shared" / "tokenizers" / "flan-t5-small"
PAD_MULTIPLE = 8  # sequence lengths are padded up to multiples of this: few shapes, so few compilations
SORT_WINDOW = 64  # batches per window sorted by length: little padding, the epoch stays shuffled
# changing these between a checkpoint and its resume would change the data order or the model
RESUME_KEYS = ("model", "init", "data", "split", "split_fractions", "sample_fraction", "normalize",
               "max_source_length", "max_target_length", "batch_size", "grad_accum", "seed", "optimizer",
               "lora", "lora_rank", "lora_alpha", "lora_targets", "quantize_base", "tokenizer_vocab_size",
               "augment_copies", "augment_invented")


class TrainError(RuntimeError):
    """A training job that cannot run as configured; the message says why."""


# -- batches -------------------------------------------------------------------------------------------

def bucket(length: int, multiple: int = PAD_MULTIPLE) -> int:
    return max(multiple, -(-length // multiple) * multiple)


def collate(input_ids: list, labels: list, pad_token_id: int = 0, decoder_start_token_id: int = 0,
            multiple: int = PAD_MULTIPLE) -> dict[str, np.ndarray]:
    """One padded batch: lengths rounded up to `multiple`; labels padded with -100 so padding never counts."""
    src = bucket(max(map(len, input_ids)), multiple)
    tgt = bucket(max(map(len, labels)), multiple)
    ids = np.full((len(input_ids), src), pad_token_id, dtype=np.int32)
    mask = np.zeros((len(input_ids), src), dtype=np.int32)
    lab = np.full((len(labels), tgt), -100, dtype=np.int32)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)], mask[i, : len(x)], lab[i, : len(y)] = x, 1, y
    dec = shift_right(lab, decoder_start_token_id, pad_token_id).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": lab}


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list:
    """Index arrays of one epoch's batches, a pure function of (seed, epoch) so a resumed run sees the
    same order. Shuffled, then sorted by (source, target) length inside windows of SORT_WINDOW batches,
    and the batches shuffled again: similar lengths share a batch without a fixed batch composition."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    window = batch_size * SORT_WINDOW
    batches = []
    for start in range(0, n, window):
        chunk = order[start: start + window]
        chunk = chunk[np.lexsort((lengths[chunk, 1], lengths[chunk, 0]))]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@dataclass
class TokenizedSplit:
    examples: list
    input_ids: list
    labels: list
    lengths: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lengths = np.array([[len(x), len(y)] for x, y in zip(self.input_ids, self.labels)],
                                dtype=np.int64).reshape(-1, 2)

    def __len__(self):
        return len(self.examples)

    def batch(self, indices, args) -> dict[str, np.ndarray]:
        return collate([self.input_ids[i] for i in indices], [self.labels[i] for i in indices],
                       args.pad_token_id, args.decoder_start_token_id)

    def subset(self, indices) -> "TokenizedSplit":
        return TokenizedSplit([self.examples[i] for i in indices], [self.input_ids[i] for i in indices],
                              [self.labels[i] for i in indices])


def tokenize_split(tokenizer, examples: list, cfg: TrainConfig) -> TokenizedSplit:
    out = tokenize(tokenizer, examples, cfg.max_source_length, cfg.max_target_length)
    return TokenizedSplit(list(examples), out["input_ids"], out["labels"])


# -- optimizer and schedule ----------------------------------------------------------------------------

def build_schedule(cfg: TrainConfig, total_steps: int) -> Callable:
    """HF's schedules: linear warmup from 0 over `warmup_steps`, then linear / cosine decay to 0 at
    `total_steps`, or constant. Step t (0-based) is the rate of the (t+1)-th optimizer update."""
    lr, warmup = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.lr_schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, decay_steps)
    elif cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, 0.0)
    else:
        main = lambda step: mx.array(lr, dtype=mx.float32)  # noqa: E731
    if warmup == 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def _no_decay(path: str, _=None) -> bool:
    # the HF Trainer leaves norm weights (and biases; T5 has none) out of weight decay
    return "layer_norm" in path


def build_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    """AdamW (torch semantics: bias correction on) or Adafactor (HF's fine-tuning settings: fixed lr,
    no relative step, no parameter scaling); weight decay skips the norm weights."""
    schedule = build_schedule(cfg, total_steps)

    def make(weight_decay: float) -> optim.Optimizer:
        if cfg.optimizer == "adafactor":
            return optim.Adafactor(learning_rate=schedule, relative_step=False, scale_parameter=False,
                                   warmup_init=False, weight_decay=weight_decay)
        return optim.AdamW(learning_rate=schedule, betas=[0.9, 0.999], eps=1e-8, weight_decay=weight_decay,
                           bias_correction=True)

    if cfg.weight_decay == 0:
        return make(0.0)
    return optim.MultiOptimizer([make(0.0), make(cfg.weight_decay)], [_no_decay])


# -- model ---------------------------------------------------------------------------------------------

def default_tokenizer() -> str:
    return str(DEFAULT_TOKENIZER) if DEFAULT_TOKENIZER.is_dir() else "google/flan-t5-small"


def set_dropout(model: nn.Module, p: float):
    """Replace every nn.Dropout of the model (attention, FFN, residual) by one with rate p."""
    for _, module in model.named_modules():
        for name, child in module.children().items():
            if isinstance(child, nn.Dropout):
                module[name] = Dropout(p)


class _KeyBox:
    key = None


class KeyedDropout(nn.Module):
    """Dropout whose masks come from its block's key, so a recomputation draws the same masks."""

    def __init__(self, p: float, box: _KeyBox):
        super().__init__()
        self.p = p  # read like model.Dropout's (attention's unfused path)
        self._p_1 = 1 - p
        self._box = box

    def __call__(self, x: mx.array) -> mx.array:
        if self._p_1 == 1 or not self.training:
            return x
        self._box.key, key = mx.random.split(self._box.key)
        return (mx.random.bernoulli(self._p_1, x.shape, key=key) * x) * (1 / self._p_1)


class CheckpointedBlock(Block):
    """A T5 block whose activations are recomputed in the backward pass (gradient checkpointing).

    Its dropouts draw from a key passed into the checkpointed function: the recomputation reproduces
    the forward's masks (global-RNG dropout would draw new ones and corrupt the gradients)."""

    recompute = True  # False runs the same keyed block without mx.checkpoint (to verify the gradients)

    def __call__(self, x, self_bias, memory=None, cross_bias=None, cache=None):
        if cache is not None or not self.training:
            return super().__call__(x, self_bias, memory, cross_bias, cache)
        extra = [a for a in (memory, cross_bias) if a is not None]

        def inner(params, key, x, self_bias, *extra):
            self.update(params)
            self._box.key = mx.stop_gradient(key)
            it = iter(extra)
            mem = next(it) if memory is not None else None
            cross = next(it) if cross_bias is not None else None
            return Block.__call__(self, x, self_bias, mem, cross)

        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)  # a fresh key from the global stream
        fn = mx.checkpoint(inner) if self.recompute else inner
        return fn(self.trainable_parameters(), key, x, self_bias, *extra)


def enable_gradient_checkpointing(model: Model):
    """Recompute each block's activations in the backward pass: memory per block instead of per layer."""
    for stack in (model.encoder, model.decoder):
        for block in stack.block:
            block.__class__ = CheckpointedBlock
            block._box = _KeyBox()
            for _, module in block.named_modules():
                for name, child in module.children().items():
                    if isinstance(child, nn.Dropout):
                        module[name] = KeyedDropout(child.p, block._box)


def build_model(cfg: TrainConfig, console=None, tokenizer=None):
    """(model, tokenizer, base name) as configured: loaded or randomly initialised, float32 master weights.
    A random init takes `tokenizer` (a task tokenizer) when given, with one embedding row per id."""
    if cfg.model:
        model, tokenizer = load(cfg.model, dtype="float32")
        local = Path(cfg.model).expanduser()
        base = str(local.resolve()) if local.is_dir() else cfg.model
    else:
        try:
            model = init_model(cfg.init, seed=cfg.seed, vocab_size=len(tokenizer) if tokenizer is not None else None)
        except ValueError as err:
            raise TrainError(str(err)) from None
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(default_tokenizer())
        base = None
    if len(tokenizer) > model.args.vocab_size:
        raise TrainError(f"the tokenizer has {len(tokenizer)} ids but the model only {model.args.vocab_size} "
                         "embedding rows")
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
        model.args.dropout_rate = cfg.dropout
    return model, tokenizer, base


def prepare_lora(model: Model, cfg: TrainConfig) -> list[str]:
    """QLoRA: quantize the frozen base first; then wrap the target layers (seeded adapter init)."""
    if cfg.quantize_base:
        quantize_model(model, bits=cfg.quantize_base, group_size=GROUP_SIZE)
    mx.random.seed(cfg.seed)
    return apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      targets=list(cfg.lora_modules()))


def cast_frozen(model: nn.Module, dtype: mx.Dtype):
    """Frozen float weights (a LoRA base) are only read: keep them in the compute dtype once."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    frozen = [(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters())
              if k not in trainable and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype]
    if frozen:
        model.load_weights(frozen, strict=False)


# -- the compiled step ---------------------------------------------------------------------------------

def global_norm(tree) -> mx.array:
    """L2 norm over every array of `tree`, each sum of squares as a BLAS dot product (MLX's CPU
    reductions are not vectorised; this is ~10x faster on 77M gradients and as accurate in float32)."""
    squares = [(g.reshape(1, -1) @ g.reshape(-1, 1)).reshape(()) for _, g in tree_flatten(tree)]
    return mx.sqrt(sum(squares[1:], squares[0]))


def make_step(model: Model, optimizer: optim.Optimizer, max_grad_norm: Optional[float] = 1.0,
              compute_dtype: mx.Dtype = mx.float32):
    """Compiled training functions over [model.state, optimizer.state, mx.random.state].

    Returns (step, micro, apply):
      step(batch) -> (loss_sum, ntoks, grad_norm): forward, backward, clip, update (no accumulation);
      micro(batch) -> (loss_sum, ntoks, grads): gradients of the summed token loss of one micro-batch;
      apply(grads, ntoks) -> grad_norm: mean over `ntoks` tokens, clip, update.
    `batch` is (input_ids, attention_mask, decoder_input_ids, labels) as mx arrays.
    """
    def summed_loss(input_ids, attention_mask, decoder_input_ids, labels):
        master = None
        if compute_dtype != mx.float32:  # bf16 compute on float32 master weights
            master = model.trainable_parameters()
            model.update(tree_map(lambda p: p.astype(compute_dtype), master))
        loss_sum, ntoks = summed_token_loss(model, input_ids, attention_mask, decoder_input_ids, labels)
        if master is not None:
            model.update(master)
        return loss_sum, ntoks

    value_and_grad = nn.value_and_grad(model, summed_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def update(grads, ntoks):
        # mean over the group's tokens and torch's clip_grad_norm_, folded into one scale that the
        # compiled optimizer update fuses (no clipped copy of the gradients is materialised)
        norm = global_norm(grads) / ntoks
        scale = 1 / ntoks
        if max_grad_norm:
            scale = scale * mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)
        optimizer.update(model, tree_map(lambda g: g * scale.astype(g.dtype), grads))
        return norm

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (loss_sum, ntoks), grads = value_and_grad(*batch)
        return loss_sum, ntoks, update(grads, ntoks)

    @partial(mx.compile, inputs=state, outputs=state)
    def micro(batch):
        (loss_sum, ntoks), grads = value_and_grad(*batch)
        return loss_sum, ntoks, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grads, ntoks):
        return update(grads, ntoks)

    return step, micro, apply


def to_mx(batch: dict) -> tuple:
    return tuple(mx.array(batch[k]) for k in ("input_ids", "attention_mask", "decoder_input_ids", "labels"))


# -- evaluation ----------------------------------------------------------------------------------------

def eval_loss(model: Model, split: TokenizedSplit, batch_size: int) -> float:
    """Token-weighted mean cross-entropy of the split (labels != -100), batches sorted by length."""
    order = np.lexsort((split.lengths[:, 1], split.lengths[:, 0]))
    total, ntoks = mx.array(0.0), mx.array(0)
    for i in range(0, len(order), batch_size):
        loss, n = loss_fn(model, *to_mx(split.batch(order[i: i + batch_size], model.args)))
        total, ntoks = total + loss * n, ntoks + n
        mx.eval(total, ntoks)
    return (total / mx.maximum(ntoks, 1)).item()


def predict(model: Model, tokenizer, queries: list[str], batch_size: int = 32, num_beams: int = 1,
            max_new_tokens: int = 64, progress: Optional[Callable[[int], None]] = None) -> list[str]:
    """Generated subquery strings for `queries` (the prompt applied), batched by length."""
    order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
    out = [None] * len(queries)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        texts = generate(model, tokenizer, [queries[i] for i in idx], batch_size=len(idx), num_beams=num_beams,
                         max_new_tokens=max_new_tokens)
        for i, text in zip(idx, texts):
            out[i] = text
        if progress is not None:
            progress(len(idx))
    return out


def evaluate(model: Model, tokenizer, split: TokenizedSplit, cfg: TrainConfig, prefix: str = "eval",
             progress=None, with_predictions: bool = False):
    """Masked loss and generation scores (ROUGE-L, exact match, subquery F1) on `split`, in eval mode;
    with_predictions: (metrics, the generated strings)."""
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        loss = eval_loss(model, split, cfg.eval_batch_size)
        predictions = predict(model, tokenizer, [e.query for e in split.examples], cfg.eval_batch_size,
                              cfg.eval_num_beams, cfg.eval_max_new_tokens, progress)
        scores = score(predictions, [e.target for e in split.examples])
        runtime = time.perf_counter() - start
    finally:
        model.train(was_training)
    metrics = {f"{prefix}_loss": loss}
    metrics.update({f"{prefix}_{k}": v for k, v in scores.items() if k != "count"})
    metrics.update({f"{prefix}_samples": len(split), f"{prefix}_runtime": runtime,
                    f"{prefix}_samples_per_second": len(split) / runtime})
    return (metrics, predictions) if with_predictions else metrics


# -- state and checkpoints -----------------------------------------------------------------------------

@dataclass
class TrainState:
    """Where the run is; saved in trainer_state.json with the RNG state."""
    step: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch
    batch_index: int = 0  # micro-batches of `epoch` already consumed
    best_rouge_l: Optional[float] = None
    best_eval_loss: Optional[float] = None
    best_step: Optional[int] = None
    train_runtime: float = 0.0  # seconds in the training loop (evaluations excluded), over all resumes
    samples_seen: int = 0
    tokens_seen: int = 0  # non-padding source + target tokens
    loss_sum: float = 0.0  # summed token losses, for the run's mean train loss
    loss_tokens: int = 0
    world_size: int = 1  # data-parallel ranks (mlx.launch); a resume needs the same number

    def better(self, rouge_l: float, loss: float) -> bool:
        return is_better(rouge_l, loss, self.best_rouge_l, self.best_eval_loss)


def adapter_meta(cfg: TrainConfig, base: Optional[str]) -> dict:
    """adapter_config.json extras: the base and, for QLoRA, how to quantize it before loading the adapters."""
    meta = {"base_model": base, "lora_parameters": {"targets": cfg.lora_targets}}
    if cfg.quantize_base:
        meta["base_quantization"] = {"bits": cfg.quantize_base, "group_size": GROUP_SIZE}
    return meta


def save_checkpoint(folder: Path, model: Model, optimizer: optim.Optimizer, state: TrainState, cfg: TrainConfig,
                    total_steps: int, base: Optional[str], tokenizer=None):
    """Everything a resume needs, written to a temp folder and renamed over `folder` (never half-written)."""
    key = mx.random.state[0].tolist()
    trainer_state = asdict(state) | {
        "total_steps": total_steps,
        "rng": {"mlx_key": key, "numpy_data_order": {"seed": cfg.seed, "epoch": state.epoch,
                                                     "generator": "np.random.default_rng([seed, epoch])"}},
        "schedule": {"optimizer_step": state.step, "learning_rate": _learning_rate(optimizer)},
    }
    with atomic_dir(folder) as tmp:
        if cfg.lora:
            mx.save_safetensors(str(tmp / ADAPTER_FILE), adapter_weights(model), metadata={"format": "mlx"})
            atomic_write_json(tmp / ADAPTER_CONFIG, adapter_config(model, adapter_meta(cfg, base)))
        else:
            mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                                metadata={"format": "pt"})
            atomic_write_json(tmp / "config.json", model_config(model))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if cfg.tokenizer_vocab_size:  # a trained vocabulary: the resumed run must use the same one
            tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        cfg.save(tmp / "config.yaml")


def restore_checkpoint(folder: Path, model: Model, optimizer: optim.Optimizer, cfg: TrainConfig) -> TrainState:
    """Load weights, optimizer state, RNG and position from `folder` into the freshly built model/optimizer."""
    saved = read_json_object(folder / "trainer_state.json", "a checkpoint folder", TrainError)
    try:
        if cfg.lora:
            load_adapters(model, folder)
        else:
            weights = mx.load(str(folder / "model.safetensors"))
            model.load_weights(list(weights.items()))
        opt_state = mx.load(str(folder / "optimizer.safetensors"))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise TrainError(f"{folder}: cannot restore the checkpoint ({err})") from None

    def restored(path, value):
        if path not in opt_state:
            raise TrainError(f"{folder / 'optimizer.safetensors'}: no state for {path} (optimizer or "
                             "trainable parameters differ from the checkpoint's)")
        return opt_state[path]

    optimizer.state = tree_map_with_path(restored, optimizer.state)
    hi, lo = saved["rng"]["mlx_key"]
    mx.random.seed((int(hi) << 32) | int(lo))
    mx.eval(model.parameters(), optimizer.state)
    names = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in saved.items() if k in names})


def _learning_rate(optimizer) -> float:
    return float(optimizer.learning_rate.item() if isinstance(optimizer.learning_rate, mx.array)
                 else optimizer.learning_rate)


def resume_folder(path) -> Path:
    """The checkpoint folder: `path` itself or `path/checkpoint` (a run's output folder)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    if (path / "checkpoint" / "trainer_state.json").is_file():
        return path / "checkpoint"
    raise TrainError(f"{path}: no checkpoint (expected trainer_state.json in it or in {path / 'checkpoint'})")


def check_resume_config(cfg: TrainConfig, folder: Path):
    """Refuse a resume whose config would change the data order or the model (exactness)."""
    saved_file = folder / "config.yaml"
    if not saved_file.is_file():
        return
    saved = _read_saved_config(saved_file)
    diffs = [f"{k}: checkpoint {saved[k]!r}, now {getattr(cfg, k)!r}" for k in RESUME_KEYS
             if k in saved and saved[k] != getattr(cfg, k)]
    if diffs:
        raise TrainError(f"cannot resume {folder} exactly with a different " + "; ".join(diffs))


def _read_saved_config(path: Path) -> dict:
    import yaml

    return TrainConfig.from_dict(yaml.safe_load(path.read_text()) or {}, str(path)).to_dict()


# -- the job -------------------------------------------------------------------------------------------

class Trainer:
    """One training job: `Trainer(cfg, console).train()` returns the summary dict.

    Output folder (cfg.output_dir): final/ (HF layout model + tokenizer, or LoRA adapters), best/ (best
    eval ROUGE-L, ties by eval loss), fused/ (LoRA with fuse), checkpoint/ (resume state), config.yaml,
    metrics.jsonl, curves.png, summary.json.
    """

    def __init__(self, cfg: TrainConfig, console=None, stop_after: Optional[int] = None):
        from rich.console import Console

        self.cfg = cfg
        self.console = console or Console()
        self.out = Path(cfg.output_dir)
        self.stop_after = stop_after  # tests: behave as if killed right after this step
        self._stop_signal = None
        self.world = World()

    # setup -----------------------------------------------------------------------------------------

    def _load_splits(self) -> Splits:
        cfg = self.cfg
        with warnings.catch_warnings(record=True) as caught:  # duplicate rows: a note, not a warning trace
            warnings.simplefilter("always", DuplicateRowsWarning)
            examples = load_examples(cfg.data, normalize=cfg.normalize)
        for w in caught:
            self.console.print(f"[yellow]note:[/] {w.message}", highlight=False, soft_wrap=True)
        splits = make_splits(examples, cfg.split, cfg.split_fractions, cfg.sample_fraction, cfg.seed)
        if not splits.train:
            raise TrainError(f"the train split is empty ({len(examples)} examples, split {cfg.split}, "
                             f"sample_fraction {cfg.sample_fraction})")
        return splits

    def _tokenize_splits(self, tokenizer, splits: Splits):
        cfg = self.cfg
        train = tokenize_split(tokenizer, training_examples(cfg, splits.train), cfg)
        valid = tokenize_split(tokenizer, splits.valid, cfg)
        test = tokenize_split(tokenizer, splits.test, cfg)
        if cfg.eval_samples and len(valid) > cfg.eval_samples:  # the run contract's rows, the same at every eval
            valid = valid.subset(np.array(eval_indices(len(valid), cfg.eval_samples)))
        return train, valid, test

    def _steps(self, n_train: int) -> tuple[int, int]:
        cfg = self.cfg
        batches = math.ceil(n_train / cfg.batch_size)
        per_epoch = math.ceil(batches / cfg.grad_accum)
        total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
        return per_epoch, total

    # main ------------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.cfg
        world = self.world = World.init(cfg.distributed_timeout)
        if not world.is_main:  # rank 0 alone prints, evaluates and writes
            from rich.console import Console

            self.console = Console(quiet=True)
        console = self.console
        compute_dtype = DTYPES[cfg.dtype]
        if cfg.resume == "auto":  # the run contract: this output folder's checkpoint, or a fresh start
            saved = self.out / "checkpoint"
            resume = saved if (saved / "trainer_state.json").is_file() else None
            console.print(f"resume: {resume or 'no checkpoint in ' + str(self.out) + ', starting fresh'}",
                          highlight=False)
        else:
            resume = resume_folder(cfg.resume) if cfg.resume else None
        if resume is not None:
            check_resume_config(cfg, resume)

        mx.random.seed(cfg.seed)
        with console.status("loading data and model"):
            splits = self._load_splits()
            model, tokenizer, base = build_model(cfg, console, task_tokenizer(cfg, splits.train, resume))
            train, valid, test = self._tokenize_splits(tokenizer, splits)
        if cfg.lora:
            targets = prepare_lora(model, cfg)
            if compute_dtype != mx.float32:
                cast_frozen(model, compute_dtype)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()

        per_epoch, total_steps = self._steps(len(train))
        optimizer = build_optimizer(cfg, total_steps)
        optimizer.init(model.trainable_parameters())
        state = TrainState(world_size=world.size)
        if resume is not None:
            state = restore_checkpoint(resume, model, optimizer, cfg)
        if resume is not None and state.world_size != world.size:
            raise TrainError(f"{resume} was written by a run of {state.world_size} rank(s); resume it with the same "
                             f"number (mlx.launch -n {state.world_size}), not {world.size}")
        if world.size > 1:
            self._join_world(state, tokenizer, resume)
        step_fn, micro_fn, apply_fn = make_step(model, optimizer, cfg.max_grad_norm, compute_dtype)

        trainable, total_params = (sum(v.size for _, v in tree_flatten(p))
                                   for p in (model.trainable_parameters(), model.parameters()))
        augmented = len(train) - len(splits.train)
        console.print(f"[bold]data[/]  train {len(splits.train):,}" + (f" + {augmented:,} entity-swapped" if augmented else "")
                      + f" | valid {len(splits.valid):,} (eval on {len(valid):,}) | test {len(test):,} ({cfg.split} split)"
                      + (f" | task tokenizer: {len(tokenizer):,} pieces" if cfg.tokenizer_vocab_size else ""),
                      soft_wrap=True)
        console.print(
            f"[bold]model[/] {cfg.model or cfg.init}: {total_params / 1e6:,.1f}M parameters, "
            f"{trainable / 1e6:,.2f}M trainable"
            + (f" (LoRA r={cfg.lora_rank} on {len(targets)} layers"
               + (f", {cfg.quantize_base}-bit base)" if cfg.quantize_base else ")") if cfg.lora else "")
            + f"   [bold]steps[/] {total_steps:,} ({per_epoch:,}/epoch, batch {cfg.batch_size} x {cfg.grad_accum})",
            soft_wrap=True)
        if resume is not None:
            console.print(f"[bold]resuming[/] {resume} at step {state.step:,} (epoch {state.epoch}, "
                          f"batch {state.batch_index})")

        metrics_path = self.out / "metrics.jsonl" if world.is_main else Path(os.devnull)
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            self._truncate_metrics(metrics_path, state.step if resume is not None else 0)

        ctx = dict(model=model, tokenizer=tokenizer, optimizer=optimizer, train=train, valid=valid,
                   total_steps=total_steps, per_epoch=per_epoch, base=base)
        self._install_signals()
        try:
            with MetricsLog(metrics_path) as log:
                stopped = self._loop(ctx, state, log, step_fn, micro_fn, apply_fn)
                if stopped == "killed":  # tests: as if the process died here
                    return {"stopped": "killed", "step": state.step}
                if stopped == "signal":
                    if world.is_main:
                        self._save_resume(ctx, state)
                    raise KeyboardInterrupt(f"stopped by {self._stop_signal or 'another rank’s signal'} at step {state.step}: checkpoint "
                                            f"saved to {self.out / 'checkpoint'}; continue with --resume "
                                            f"{self.out / 'checkpoint'}")
                if not world.is_main:  # rank 0 evaluates, saves and scores the test split alone
                    return {"rank": world.rank, "total_steps": state.step}
                final_eval = self._final_eval(ctx, state, log)
                self._save_resume(ctx, state)
                summary = self._finish(ctx, state, final_eval, test, stopped, log)
        finally:
            self._restore_signals()
        return summary

    def _truncate_metrics(self, path: Path, step: int):
        """A fresh run starts a new log; a resume drops what the interrupted run logged after its checkpoint."""
        if not path.exists():
            return
        import json

        records = [r for r in read_metrics(path) if r.get("step", 0) <= step] if step else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))

    # signals: finish the current step, checkpoint, exit ---------------------------------------------

    def _install_signals(self):
        self._old_handlers = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            self.console.print(f"[yellow]{self._stop_signal}: finishing this step and saving a checkpoint "
                               "(again to stop at once)[/]")

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers
            self._old_handlers = {}

    def _restore_signals(self):
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)

    # the loop --------------------------------------------------------------------------------------

    def _loop(self, ctx, state: TrainState, log: MetricsLog, step_fn, micro_fn, apply_fn) -> Optional[str]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.progress import TimeRemainingColumn

        cfg, console = self.cfg, self.console
        model, optimizer, train = ctx["model"], ctx["optimizer"], ctx["train"]
        total_steps = ctx["total_steps"]
        deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes else None
        save_every = cfg.save_every or cfg.eval_every

        window = {"loss": mx.array(0.0), "tokens": mx.array(0), "samples": 0, "real_tokens": 0, "steps": 0,
                  "time": 0.0}
        epoch_order = None
        progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                            console=console, transient=False, disable=not console.is_terminal)
        live_log = not console.is_terminal  # plain lines for log files (nohup), a bar for terminals
        with progress:
            task = progress.add_task("train", total=total_steps, completed=state.step, info="")
            while state.step < total_steps:
                if epoch_order is None or state.batch_index >= len(epoch_order):
                    if epoch_order is not None:
                        state.epoch, state.batch_index = state.epoch + 1, 0
                    epoch_order = epoch_batches(train.lengths, cfg.batch_size, cfg.seed, state.epoch)
                group = epoch_order[state.batch_index: state.batch_index + cfg.grad_accum]
                start = time.perf_counter()
                votes = (self._stop_signal is not None, deadline is not None and time.perf_counter() > deadline)
                loss_sum, ntoks, grad_norm, votes = self._step(ctx, group, votes, step_fn, micro_fn, apply_fn)
                elapsed = time.perf_counter() - start

                state.step += 1
                state.batch_index += len(group)
                n_samples = sum(len(idx) for idx in group)
                n_tokens = int(sum(train.lengths[idx].sum() for idx in group))
                state.samples_seen += n_samples
                state.tokens_seen += n_tokens
                state.train_runtime += elapsed
                state.loss_sum += loss_sum.item()
                state.loss_tokens += ntoks.item()
                window["loss"] += loss_sum
                window["tokens"] += ntoks
                window["samples"] += n_samples
                window["real_tokens"] += n_tokens
                window["steps"] += 1
                window["time"] += elapsed

                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    record = {
                        "step": state.step,
                        "epoch": round(state.epoch + state.batch_index / max(len(epoch_order), 1), 4),
                        "loss": (window["loss"] / window["tokens"]).item(),
                        "learning_rate": _learning_rate(optimizer),
                        "grad_norm": grad_norm.item(),
                        "samples_per_second": window["samples"] / window["time"],
                        "tokens_per_second": window["real_tokens"] / window["time"],
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    }
                    log.log(record)
                    info = (f"epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                            f"{record['samples_per_second']:.1f} samples/s  {record['tokens_per_second']:,.0f} tok/s  "
                            f"peak {record['peak_memory_gb']:.2f} GB")
                    progress.update(task, info=info)
                    if live_log:
                        console.print(f"step {state.step}/{total_steps}  {info}", highlight=False, soft_wrap=True)
                    window = {"loss": mx.array(0.0), "tokens": mx.array(0), "samples": 0, "real_tokens": 0,
                              "steps": 0, "time": 0.0}
                progress.update(task, completed=state.step)

                last = state.step == total_steps
                if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
                    if self.world.is_main:
                        self._evaluate_and_keep_best(ctx, state, log, progress)
                    self.world.barrier("rank 0's evaluation")
                if save_every and state.step % save_every == 0 and not last and self.world.is_main:
                    self._save_resume(ctx, state)
                if self.stop_after is not None and state.step >= self.stop_after:
                    return "killed"
                if self._stop_signal is not None if votes is None else votes[0]:
                    return "signal"
                if (deadline is not None and time.perf_counter() > deadline if votes is None else votes[1]) and not last:
                    console.print(f"[yellow]time budget of {cfg.max_minutes:g} min spent at step "
                                  f"{state.step:,}/{total_steps:,}: stopping[/]", soft_wrap=True)
                    return "time"
        return None

    def _step(self, ctx, group: list, votes: tuple, step_fn, micro_fn, apply_fn):
        """One optimizer step on the global batch `group` (its micro-batches); each data-parallel rank takes
        its shard of every micro-batch, and the ranks' stop votes (signal, time) are summed with the step.
        Returns (loss_sum, ntoks, grad_norm, votes); votes is None on a single process."""
        model, optimizer, train, world = ctx["model"], ctx["optimizer"], ctx["train"], self.world
        if world.size == 1 and len(group) == 1:
            loss_sum, ntoks, grad_norm = step_fn(to_mx(train.batch(group[0], model.args)))
            mx.eval(loss_sum, ntoks, grad_norm, model.state, optimizer.state)
            return loss_sum, ntoks, grad_norm, None
        grads, loss_sum, ntoks = None, mx.array(0.0), mx.array(0)
        for idx in group:
            ls, nt, g = micro_fn(to_mx(self._shard_batch(train, idx, model.args)))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_sum, ntoks = loss_sum + ls, ntoks + nt
            mx.eval(grads, loss_sum, ntoks)
        if world.size > 1:  # averaged gradients over the ranks' mean token count: the 1-rank update
            loss_sum, ntoks, grads, votes = world.reduce_step(loss_sum, ntoks, grads, votes)
            grad_norm = apply_fn(grads, ntoks / world.size)
        else:
            votes, grad_norm = None, apply_fn(grads, ntoks)
        mx.eval(grad_norm, model.state, optimizer.state)
        return loss_sum, ntoks, grad_norm, votes

    def _shard_batch(self, train: TokenizedSplit, idx, args) -> dict:
        """This rank's rows of a micro-batch; a rank left without rows gets one row whose labels are all
        padding (no tokens, zero gradients), so every rank joins the all-reduce."""
        rows = self.world.shard(idx)
        if len(rows):
            return train.batch(rows, args)
        batch = train.batch(idx[:1], args)
        batch["labels"][:] = -100
        return batch

    def _join_world(self, state: TrainState, tokenizer, resume: Optional[Path]):
        """Data-parallel checks before the first step: the same number of ranks as the checkpoint, the same
        job on every rank (config, data files, vocabulary, checkpoint), then per-rank dropout streams."""
        world, cfg = self.world, self.cfg
        facts = {f"config {k}": repr(v) for k, v in cfg.to_dict().items()}
        facts |= {f"data file {i}": f"{path} (sha256 {file_digest(path)})" for i, path in enumerate(cfg.data, 1)}
        facts["vocabulary"] = str(sorted(tokenizer.get_vocab().items()))
        facts["checkpoint step"] = str(state.step if resume is not None else None)
        world.agree(facts)
        hi, lo = mx.random.state[0].tolist()  # rank 0 keeps the single-process stream; the others branch off it
        mx.random.seed((((int(hi) << 32) | int(lo)) ^ (world.rank * 0x9E3779B97F4A7C15)) % 2**64)

    def _evaluate_and_keep_best(self, ctx, state: TrainState, log: MetricsLog, progress=None) -> dict:
        if not len(ctx["valid"]):
            return {}
        model, valid = ctx["model"], ctx["valid"]
        bar = progress if progress is not None and progress.console.is_terminal else None
        task = bar.add_task("eval", total=len(valid), info="evaluating") if bar else None
        metrics = evaluate(model, ctx["tokenizer"], valid, self.cfg,
                           progress=(lambda n: bar.advance(task, n)) if bar else None)
        if bar:
            bar.remove_task(task)
        log.log({"step": state.step, **metrics})
        improved = state.better(metrics["eval_rouge_l"], metrics["eval_loss"])
        self.console.print(
            f"[bold]eval[/] step {state.step:,}: loss {metrics['eval_loss']:.4f}  rouge_l {metrics['eval_rouge_l']:.4f}  "
            f"exact {metrics['eval_exact_match']:.4f}  subquery_f1 {metrics['eval_subquery_f1']:.4f}  "
            f"({metrics['eval_runtime']:.1f} s)" + ("  [green]best[/]" if improved else ""), highlight=False,
            soft_wrap=True)
        if improved:
            state.best_rouge_l, state.best_eval_loss = metrics["eval_rouge_l"], metrics["eval_loss"]
            state.best_step = state.step
            self._save_model(ctx, self.out / BEST_DIR)
        return metrics

    def _final_eval(self, ctx, state, log) -> dict:
        return self._evaluate_and_keep_best(ctx, state, log)

    def _save_model(self, ctx, folder: Path):
        """A usable model: HF layout (full fine-tuning) or adapters + adapter_config.json (LoRA)."""
        model = ctx["model"]
        if self.cfg.lora:
            from .lora import save_adapters

            save_adapters(model, folder, adapter_meta(self.cfg, self._lora_base(ctx)))
        else:
            save(model, ctx["tokenizer"], folder)

    def _lora_base(self, ctx) -> Optional[str]:
        """Where the adapters' base lives; a random-init base is saved once beside them."""
        if ctx["base"] is not None:
            return ctx["base"]
        base_dir = self.out / "base"
        if not base_dir.exists():
            base, _, _ = build_model(self.cfg, tokenizer=ctx["tokenizer"])
            save(base, ctx["tokenizer"], base_dir)
        ctx["base"] = str(base_dir.resolve())
        return ctx["base"]

    def _save_resume(self, ctx, state: TrainState):
        save_checkpoint(self.out / "checkpoint", ctx["model"], ctx["optimizer"], state, self.cfg,
                        ctx["total_steps"], ctx["base"], ctx["tokenizer"])

    def _finish(self, ctx, state: TrainState, final_eval: dict, test: TokenizedSplit, stopped, log) -> dict:
        cfg, console, model = self.cfg, self.console, ctx["model"]
        self._save_model(ctx, self.out / FINAL_DIR)
        if cfg.lora and cfg.fuse:
            fused, _, _ = build_model(cfg, tokenizer=ctx["tokenizer"])  # same base, then the trained adapters
            if cfg.quantize_base:
                quantize_model(fused, bits=cfg.quantize_base, group_size=GROUP_SIZE)
            load_adapters(fused, self.out / FINAL_DIR)
            save(fuse_lora(fused, dequantize=True), ctx["tokenizer"], self.out / "fused")
        summary = {
            "train_runtime": state.train_runtime,
            "train_samples_per_second": state.samples_seen / max(state.train_runtime, 1e-9),
            "train_steps_per_second": state.step / max(state.train_runtime, 1e-9),
            "train_tokens_per_second": state.tokens_seen / max(state.train_runtime, 1e-9),
            "train_loss": state.loss_sum / max(state.loss_tokens, 1),
            "total_steps": state.step,
            "epochs": round(state.samples_seen / len(ctx["train"]), 3),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        if stopped == "time":
            summary["stopped"] = f"time budget ({cfg.max_minutes:g} min)"
        summary.update({k: v for k, v in final_eval.items() if k in (
            "eval_loss", "eval_rouge_l", "eval_exact_match", "eval_subquery_f1", "eval_runtime",
            "eval_samples_per_second", "eval_samples")})
        if len(test):
            if state.best_step is not None and state.best_step != state.step:  # score the kept model
                self._load_best(ctx)
            summary["test_model_step"] = state.best_step if state.best_step is not None else state.step
            message = f"scoring the test split ({len(test):,} examples) with the model of step {summary['test_model_step']}"
            if not console.is_terminal:
                console.print(message, highlight=False, soft_wrap=True)
            with console.status(message):
                test_metrics, predictions = evaluate(model, ctx["tokenizer"], test, cfg, prefix="test",
                                                     with_predictions=True)
            log.log({"step": state.step, **test_metrics})
            summary.update({k: v for k, v in test_metrics.items() if k in (
                "test_loss", "test_rouge_l", "test_exact_match", "test_subquery_f1", "test_samples")})
        atomic_write_json(self.out / "summary.json", summary)
        try:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", title=self.out.name)
        except Exception as err:  # noqa: BLE001 - a missing plot must not lose a finished run
            console.print(f"[yellow]warning:[/] no curves.png ({type(err).__name__}: {err})")
        console.print(summary_table(summary))
        if len(test):
            console.print(examples_table(test.examples, predictions, seed=cfg.seed))
        parts = ["final/"] + ([f"best/ (step {state.best_step})"] if state.best_step is not None else [])
        parts += ["fused/"] if cfg.lora and cfg.fuse else []
        parts += ["checkpoint/", "metrics.jsonl", "curves.png", "summary.json"]
        console.print(f"[green]saved[/] {self.out}/: {', '.join(parts)}", highlight=False)
        return summary

    def _load_best(self, ctx):
        model, best = ctx["model"], self.out / BEST_DIR
        if self.cfg.lora:
            model.load_weights(list(mx.load(str(best / ADAPTER_FILE)).items()), strict=False)
        else:
            model.load_weights(list(mx.load(str(best / "model.safetensors")).items()))
        mx.eval(model.parameters())


def train(cfg: TrainConfig, console=None) -> dict:
    """Run the job described by `cfg` (validated); return the summary dict."""
    return Trainer(cfg, console).train()


__all__ = ["TrainError", "Trainer", "TrainState", "build_model", "build_optimizer", "build_schedule", "bucket",
           "collate", "epoch_batches", "evaluate", "make_step", "predict", "save_checkpoint", "restore_checkpoint",
           "train"]
