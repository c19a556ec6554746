"""The MLX fine-tuning loop: batching, optimizer and schedule, compiled step, evaluation, checkpoints, resume.

`train(cfg)` runs a whole job from a validated `reformulation.config.TrainConfig`; `python -m mlx_t5.train`
is its command line. Read it top to bottom, as a recipe: batches, optimizer and schedule, model, the
compiled step, evaluation, then the job: `build_run` (data, model, optimizer, restored state) gives a
`Run`; `train_loop` steps it and calls its side jobs (`maybe_log`, `maybe_eval`, `maybe_save`,
`should_stop`); `finish` saves, scores the test split and reports. Checkpoints and resume live in
`mlx_t5.checkpoint`, data parallelism in `mlx_t5.distributed`, the output layout in `reformulation.run`.

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
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from reformulation.config import TrainConfig
from reformulation.constants import GROUP_SIZE
from reformulation.data import DuplicateRowsWarning, Splits, load_examples, make_splits, shift_right, tokenize
from reformulation.io import atomic_write_json
from reformulation.metrics import score
from reformulation.reporting import MetricsLog, examples_table, plot_curves, summary_table
from reformulation.recipe import phrasebook, task_tokenizer, training_examples
from reformulation.run import ADAPTER_DIR, BEST_DIR, CHECKPOINT_DIR, FINAL_DIR, drop_metrics_after, eval_indices

from .checkpoint import TrainError, TrainState, adapter_meta, find_resume, learning_rate, restore_checkpoint
from .checkpoint import save_checkpoint
from .distributed import World, file_digest
from .generation import generate
from .init import init_model
from .lora import ADAPTER_FILE, apply_lora, fuse_lora, load_adapters
from .model import Block, Dropout, Model, loss_fn, summed_token_loss
from .quantize import quantize_model
from .utils import DTYPES, load, load_tokenizer, save

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO_ROOT.parent / "shared" / "tokenizers" / "flan-t5-small"
PAD_MULTIPLE = 8  # sequence lengths are padded up to multiples of this: few shapes, so few compilations
SORT_WINDOW = 64  # batches per window sorted by length: little padding, the epoch stays shuffled


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
        return mx.checkpoint(inner)(self.trainable_parameters(), key, x, self_bias, *extra)


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


# -- the job: build the run, loop, side jobs, finish ------------------------------------------------------

class Stop(Enum):
    """Why the loop ended before its last step (None: it ran them all)."""
    SIGNAL = "signal"  # SIGINT/SIGTERM: checkpoint and exit
    TIME = "time"  # max_minutes spent: evaluate, save, score as at the end


@dataclass
class Data:
    splits: Splits  # the examples (train before augmentation)
    train: TokenizedSplit
    valid: TokenizedSplit  # the run contract's evaluation rows
    test: TokenizedSplit


@dataclass
class Window:
    """Train statistics since the last log line (the loss stays an mx.array: no sync per step)."""
    loss: mx.array = field(default_factory=lambda: mx.array(0.0))
    tokens: mx.array = field(default_factory=lambda: mx.array(0))
    samples: int = 0
    real_tokens: int = 0
    time: float = 0.0


@dataclass
class Run:
    """One job's parts, built once by `build_run`, handed to the loop and its side jobs."""
    cfg: TrainConfig
    console: object
    world: World
    model: Model
    tokenizer: object
    base: Optional[str]  # the LoRA base's folder or hub id (None: a random init, saved beside the adapters)
    data: Data
    optimizer: optim.Optimizer
    steps: tuple  # make_step's (step, micro, apply)
    state: TrainState
    total_steps: int
    per_epoch: int
    resume: Optional[Path] = None
    lora_layers: list = field(default_factory=list)
    log: Optional[MetricsLog] = None
    signals: Optional["StopOnSignal"] = None
    deadline: Optional[float] = None
    phrasebook: Optional[object] = None  # speculative.Phrasebook of the train targets, saved with every model

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


class StopOnSignal:
    """SIGINT/SIGTERM set `name`: the loop finishes its step, checkpoints and exits; a second one stops at once."""

    def __init__(self, console):
        self.console, self.name, self._old = console, None, {}

    def _handle(self, signum, frame):
        if self.name is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        self.console.print(f"[yellow]{self.name}: finishing this step and saving a checkpoint (again to stop at "
                           "once)[/]")

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            self._old = {}
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# building ------------------------------------------------------------------------------------------------

def load_splits(cfg: TrainConfig, console) -> Splits:
    with warnings.catch_warnings(record=True) as caught:  # duplicate rows: a note, not a warning trace
        warnings.simplefilter("always", DuplicateRowsWarning)
        examples = load_examples(cfg.data, normalize=cfg.normalize)
    for w in caught:
        console.print(f"[yellow]note:[/] {w.message}", highlight=False, soft_wrap=True)
    splits = make_splits(examples, cfg.split, cfg.split_fractions, cfg.sample_fraction, cfg.seed)
    if not splits.train:
        raise TrainError(f"the train split is empty ({len(examples)} examples, split {cfg.split}, "
                         f"sample_fraction {cfg.sample_fraction})")
    return splits


def build_data(cfg: TrainConfig, tokenizer, splits: Splits) -> Data:
    """Tokenized splits: train (+ entity-swapped copies), the evaluation rows of the run contract, test."""
    train = tokenize_split(tokenizer, training_examples(cfg, splits.train), cfg)
    valid = tokenize_split(tokenizer, splits.valid, cfg)
    test = tokenize_split(tokenizer, splits.test, cfg)
    if cfg.eval_samples and len(valid) > cfg.eval_samples:  # the same rows at every eval, on both engines
        valid = valid.subset(np.array(eval_indices(len(valid), cfg.eval_samples)))
    return Data(splits, train, valid, test)


def count_steps(cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    batches = math.ceil(n_train / cfg.batch_size)
    per_epoch = math.ceil(batches / cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
    return per_epoch, total


def prepare_model(model: Model, cfg: TrainConfig) -> list[str]:
    """LoRA/QLoRA wrapping, the frozen base in the compute dtype, gradient checkpointing; train mode."""
    layers = []
    if cfg.lora:
        layers = prepare_lora(model, cfg)
        if DTYPES[cfg.dtype] != mx.float32:
            cast_frozen(model, DTYPES[cfg.dtype])
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return layers


def build_run(cfg: TrainConfig, console, world: World) -> Run:
    """Data, model, optimizer and state, restored from the checkpoint being resumed (if any)."""
    resume = find_resume(cfg, console)
    mx.random.seed(cfg.seed)
    with console.status("loading data and model"):
        splits = load_splits(cfg, console)
        model, tokenizer, base = build_model(cfg, console, task_tokenizer(cfg, splits.train, resume))
        data = build_data(cfg, tokenizer, splits)
    layers = prepare_model(model, cfg)
    per_epoch, total_steps = count_steps(cfg, len(data.train))
    optimizer = build_optimizer(cfg, total_steps)
    optimizer.init(model.trainable_parameters())
    state = TrainState(world_size=world.size)
    if resume is not None:
        state = restore_checkpoint(resume, model, optimizer, cfg)
        if state.world_size != world.size:
            raise TrainError(f"{resume} was written by a run of {state.world_size} rank(s); resume it with the "
                             f"same number (mlx.launch -n {state.world_size}), not {world.size}")
    if world.size > 1:
        join_world(world, cfg, state, tokenizer, resume)
    steps = make_step(model, optimizer, cfg.max_grad_norm, DTYPES[cfg.dtype])
    return Run(cfg, console, world, model, tokenizer, base, data, optimizer, steps, state, total_steps, per_epoch,
               resume, layers)


def join_world(world: World, cfg: TrainConfig, state: TrainState, tokenizer, resume: Optional[Path]):
    """Data-parallel checks before the first step: the same job on every rank (config, data files, vocabulary,
    checkpoint), then per-rank dropout streams."""
    facts = {f"config {k}": repr(v) for k, v in cfg.to_dict().items()}
    facts |= {f"data file {i}": f"{path} (sha256 {file_digest(path)})" for i, path in enumerate(cfg.data, 1)}
    facts["vocabulary"] = str(sorted(tokenizer.get_vocab().items()))
    facts["checkpoint step"] = str(state.step if resume is not None else None)
    world.agree(facts)
    hi, lo = mx.random.state[0].tolist()  # rank 0 keeps the single-process stream; the others branch off it
    mx.random.seed((((int(hi) << 32) | int(lo)) ^ (world.rank * 0x9E3779B97F4A7C15)) % 2**64)


def describe(run: Run):
    """The data, model and step counts, before the first step."""
    cfg, data, model, state = run.cfg, run.data, run.model, run.state
    trainable, total_params = (sum(v.size for _, v in tree_flatten(p))
                               for p in (model.trainable_parameters(), model.parameters()))
    augmented = len(data.train) - len(data.splits.train)
    run.console.print(
        f"[bold]data[/]  train {len(data.splits.train):,}" + (f" + {augmented:,} entity-swapped" if augmented else "")
        + f" | valid {len(data.splits.valid):,} (eval on {len(data.valid):,}) | test {len(data.test):,} "
        f"({cfg.split} split)" + (f" | task tokenizer: {len(run.tokenizer):,} pieces" if cfg.tokenizer_vocab_size
                                  else ""), soft_wrap=True)
    lora = (f" (LoRA r={cfg.lora_rank} on {len(run.lora_layers)} layers"
            + (f", {cfg.quantize_base}-bit base)" if cfg.quantize_base else ")") if cfg.lora else "")
    run.console.print(
        f"[bold]model[/] {cfg.model or cfg.init}: {total_params / 1e6:,.1f}M parameters, "
        f"{trainable / 1e6:,.2f}M trainable{lora}   [bold]steps[/] {run.total_steps:,} ({run.per_epoch:,}/epoch, "
        f"batch {cfg.batch_size} x {cfg.grad_accum})", soft_wrap=True)
    if run.resume is not None:
        run.console.print(f"[bold]resuming[/] {run.resume} at step {state.step:,} (epoch {state.epoch}, "
                          f"batch {state.batch_index})")


def open_log(run: Run) -> MetricsLog:
    """metrics.jsonl (rank 0): a new log, or for a resume the old one without the steps trained again."""
    if not run.world.is_main:
        return MetricsLog(os.devnull)
    run.out.mkdir(parents=True, exist_ok=True)
    run.cfg.save(run.out / "config.yaml")
    drop_metrics_after(run.out / "metrics.jsonl", run.state.step if run.resume is not None else 0)
    return MetricsLog(run.out / "metrics.jsonl")


# the loop ------------------------------------------------------------------------------------------------

def train_loop(run: Run) -> Optional[Stop]:
    """Optimizer steps until total_steps, a stop signal or the time budget; logs, evaluates and checkpoints."""
    cfg, state = run.cfg, run.state
    run.deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes else None
    window, order = Window(), None
    with progress_bar(run) as progress:
        task = progress.add_task("train", total=run.total_steps, completed=state.step, info="")
        while state.step < run.total_steps:
            order = next_batches(run, order)
            group = order[state.batch_index: state.batch_index + cfg.grad_accum]
            start = time.perf_counter()
            votes = (run.signals.name is not None, run.deadline is not None and time.perf_counter() > run.deadline)
            loss_sum, ntoks, grad_norm, votes = train_step(run, group, votes)
            account(run, window, group, loss_sum, ntoks, time.perf_counter() - start)
            maybe_log(run, window, grad_norm, len(order), progress, task)
            progress.update(task, completed=state.step)
            last = state.step == run.total_steps
            maybe_eval(run, last, progress)
            maybe_save(run, last)
            stop = should_stop(run, votes, last)
            if stop is not None:
                return stop
    return None


def progress_bar(run: Run):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    return Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=run.console, transient=False, disable=not run.console.is_terminal)


def next_batches(run: Run, order: Optional[list]) -> list:
    """The current epoch's batch order; at its end, the next epoch's (a pure function of seed and epoch)."""
    state = run.state
    if order is None or state.batch_index >= len(order):
        if order is not None:
            state.epoch, state.batch_index = state.epoch + 1, 0
        order = epoch_batches(run.data.train.lengths, run.cfg.batch_size, run.cfg.seed, state.epoch)
    return order


def train_step(run: Run, group: list, votes: tuple):
    """One optimizer step on the global batch `group` (its micro-batches); each data-parallel rank takes its
    shard of every micro-batch, and the ranks' stop votes (signal, time) are summed with the step.
    Returns (loss_sum, ntoks, grad_norm, votes); votes is None on a single process."""
    model, optimizer, world, (step_fn, micro_fn, apply_fn) = run.model, run.optimizer, run.world, run.steps
    if world.size == 1 and len(group) == 1:
        loss_sum, ntoks, grad_norm = step_fn(to_mx(run.data.train.batch(group[0], model.args)))
        mx.eval(loss_sum, ntoks, grad_norm, model.state, optimizer.state)
        return loss_sum, ntoks, grad_norm, None
    grads, loss_sum, ntoks = None, mx.array(0.0), mx.array(0)
    for idx in group:
        ls, nt, g = micro_fn(to_mx(shard_batch(run, idx)))
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


def shard_batch(run: Run, idx) -> dict:
    """This rank's rows of a micro-batch; a rank left without rows gets one row whose labels are all padding (no
    tokens, zero gradients), so every rank joins the all-reduce."""
    rows, train = run.world.shard(idx), run.data.train
    if len(rows):
        return train.batch(rows, run.model.args)
    batch = train.batch(idx[:1], run.model.args)
    batch["labels"][:] = -100
    return batch


def account(run: Run, window: Window, group: list, loss_sum, ntoks, elapsed: float):
    """Advance the state past a step and add it to the log window."""
    state, lengths = run.state, run.data.train.lengths
    n_samples = sum(len(idx) for idx in group)
    n_tokens = int(sum(lengths[idx].sum() for idx in group))
    state.step += 1
    state.batch_index += len(group)
    state.samples_seen += n_samples
    state.tokens_seen += n_tokens
    state.train_runtime += elapsed
    state.loss_sum += loss_sum.item()
    state.loss_tokens += ntoks.item()
    window.loss += loss_sum
    window.tokens += ntoks
    window.samples += n_samples
    window.real_tokens += n_tokens
    window.time += elapsed


def maybe_log(run: Run, window: Window, grad_norm, batches: int, progress, task):
    """Every log_every steps (and at the last): a metrics.jsonl record and the progress line; resets the window."""
    state = run.state
    if state.step % run.cfg.log_every and state.step != run.total_steps:
        return
    record = {
        "step": state.step,
        "epoch": round(state.epoch + state.batch_index / max(batches, 1), 4),
        "loss": (window.loss / window.tokens).item(),
        "learning_rate": learning_rate(run.optimizer),
        "grad_norm": grad_norm.item(),
        "samples_per_second": window.samples / window.time,
        "tokens_per_second": window.real_tokens / window.time,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    run.log.log(record)
    info = (f"epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
            f"{record['samples_per_second']:.1f} samples/s  {record['tokens_per_second']:,.0f} tok/s  "
            f"peak {record['peak_memory_gb']:.2f} GB")
    progress.update(task, info=info)
    if not run.console.is_terminal:  # plain lines for log files (nohup), a bar for terminals
        run.console.print(f"step {state.step}/{run.total_steps}  {info}", highlight=False, soft_wrap=True)
    window.__init__()


def maybe_eval(run: Run, last: bool, progress=None):
    """Every eval_every steps (the last step's eval comes with the finish): rank 0 evaluates, the others wait."""
    if not run.cfg.eval_every or run.state.step % run.cfg.eval_every or last:
        return
    if run.world.is_main:
        evaluate_and_keep_best(run, progress)
    run.world.barrier("rank 0's evaluation")


def maybe_save(run: Run, last: bool):
    """Every save_every steps (default: every eval), rank 0 replaces the resume checkpoint."""
    every = run.cfg.save_every or run.cfg.eval_every
    if every and run.state.step % every == 0 and not last and run.world.is_main:
        save_resume(run)


def should_stop(run: Run, votes: Optional[tuple], last: bool) -> Optional[Stop]:
    """A signal or the spent time budget; data-parallel ranks decide on the step's summed votes, together."""
    if (run.signals.name is not None) if votes is None else votes[0]:
        return Stop.SIGNAL
    spent = run.deadline is not None and time.perf_counter() > run.deadline if votes is None else votes[1]
    if spent and not last:
        run.console.print(f"[yellow]time budget of {run.cfg.max_minutes:g} min spent at step "
                          f"{run.state.step:,}/{run.total_steps:,}: stopping[/]", soft_wrap=True)
        return Stop.TIME
    return None


# side jobs: evaluate, save ---------------------------------------------------------------------------------

def evaluate_and_keep_best(run: Run, progress=None) -> dict:
    """Evaluate on the run contract's rows, log it, and save the model to best/ when it beats the best so far."""
    if not len(run.data.valid):
        return {}
    state, valid = run.state, run.data.valid
    bar = progress if progress is not None and progress.console.is_terminal else None
    task = bar.add_task("eval", total=len(valid), info="evaluating") if bar else None
    metrics = evaluate(run.model, run.tokenizer, valid, run.cfg, progress=(lambda n: bar.advance(task, n)) if bar
                       else None)
    if bar:
        bar.remove_task(task)
    run.log.log({"step": state.step, **metrics})
    improved = state.better(metrics["eval_rouge_l"], metrics["eval_loss"])
    run.console.print(
        f"[bold]eval[/] step {state.step:,}: loss {metrics['eval_loss']:.4f}  rouge_l {metrics['eval_rouge_l']:.4f}  "
        f"exact {metrics['eval_exact_match']:.4f}  subquery_f1 {metrics['eval_subquery_f1']:.4f}  "
        f"({metrics['eval_runtime']:.1f} s)" + ("  [green]best[/]" if improved else ""), highlight=False,
        soft_wrap=True)
    if improved:
        state.best_rouge_l, state.best_eval_loss = metrics["eval_rouge_l"], metrics["eval_loss"]
        state.best_step = state.step
        save_model(run, run.out / BEST_DIR)
    return metrics


def save_model(run: Run, folder: Path):
    """A usable model: HF layout (full fine-tuning) or adapters + adapter_config.json (LoRA); with the phrasebook
    for speculative decoding."""
    if run.cfg.lora:
        from .lora import save_adapters

        save_adapters(run.model, folder, adapter_meta(run.cfg, lora_base(run)))
    else:
        save(run.model, run.tokenizer, folder)
    save_phrasebook(run, folder)


def save_phrasebook(run: Run, folder: Path):
    if run.phrasebook is None:
        run.phrasebook = phrasebook(run.tokenizer, run.data.splits.train, run.model.args.decoder_start_token_id)
    run.phrasebook.save(folder)


def lora_base(run: Run) -> Optional[str]:
    """Where the adapters' base lives; a random-init base is saved once beside them."""
    if run.base is not None:
        return run.base
    base_dir = run.out / "base"
    if not base_dir.exists():
        base, _, _ = build_model(run.cfg, tokenizer=run.tokenizer)
        save(base, run.tokenizer, base_dir)
    run.base = str(base_dir.resolve())
    return run.base


def save_resume(run: Run):
    save_checkpoint(run.out / CHECKPOINT_DIR, run.model, run.optimizer, run.state, run.cfg, run.total_steps,
                    run.base, run.tokenizer)


def save_fused(run: Run):
    """LoRA with fuse: the base with the trained adapters merged in, a plain model in final/."""
    fused, _, _ = build_model(run.cfg, tokenizer=run.tokenizer)  # same base, then the trained adapters
    if run.cfg.quantize_base:
        quantize_model(fused, bits=run.cfg.quantize_base, group_size=GROUP_SIZE)
    load_adapters(fused, run.out / ADAPTER_DIR)
    save(fuse_lora(fused, dequantize=True), run.tokenizer, run.out / FINAL_DIR)
    save_phrasebook(run, run.out / FINAL_DIR)


def load_best(run: Run):
    best = run.out / BEST_DIR
    if run.cfg.lora:
        run.model.load_weights(list(mx.load(str(best / ADAPTER_FILE)).items()), strict=False)
    else:
        run.model.load_weights(list(mx.load(str(best / "model.safetensors")).items()))
    mx.eval(run.model.parameters())


# finishing -------------------------------------------------------------------------------------------------

def finish(run: Run, final_eval: dict, stopped: Optional[Stop]) -> dict:
    """Save the final model, score the test split with the best one, write summary.json and curves.png, print."""
    cfg, state = run.cfg, run.state
    save_model(run, run.out / (ADAPTER_DIR if cfg.lora else FINAL_DIR))
    if cfg.lora and cfg.fuse:
        save_fused(run)
    summary = train_summary(run)
    if stopped is Stop.TIME:
        summary["stopped"] = f"time budget ({cfg.max_minutes:g} min)"
    summary.update({k: v for k, v in final_eval.items() if k in (
        "eval_loss", "eval_rouge_l", "eval_exact_match", "eval_subquery_f1", "eval_runtime",
        "eval_samples_per_second", "eval_samples")})
    predictions = score_test(run, summary) if len(run.data.test) else None
    atomic_write_json(run.out / "summary.json", summary)
    try:
        plot_curves(run.out / "metrics.jsonl", run.out / "curves.png", title=run.out.name)
    except Exception as err:  # noqa: BLE001 - a missing plot must not lose a finished run
        run.console.print(f"[yellow]warning:[/] no curves.png ({type(err).__name__}: {err})")
    report(run, summary, predictions)
    return summary


def train_summary(run: Run) -> dict:
    state, runtime = run.state, max(run.state.train_runtime, 1e-9)
    return {
        "train_runtime": state.train_runtime,
        "train_samples_per_second": state.samples_seen / runtime,
        "train_steps_per_second": state.step / runtime,
        "train_tokens_per_second": state.tokens_seen / runtime,
        "train_loss": state.loss_sum / max(state.loss_tokens, 1),
        "total_steps": state.step,
        "epochs": round(state.samples_seen / len(run.data.train), 3),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def score_test(run: Run, summary: dict) -> list[str]:
    """Score the test split with the kept model (best/, else the last); adds test_* to `summary`."""
    state, test, console = run.state, run.data.test, run.console
    if state.best_step is not None and state.best_step != state.step:
        load_best(run)
    summary["test_model_step"] = state.best_step if state.best_step is not None else state.step
    message = f"scoring the test split ({len(test):,} examples) with the model of step {summary['test_model_step']}"
    if not console.is_terminal:
        console.print(message, highlight=False, soft_wrap=True)
    with console.status(message):
        metrics, predictions = evaluate(run.model, run.tokenizer, test, run.cfg, prefix="test", with_predictions=True)
    run.log.log({"step": state.step, **metrics})
    summary.update({k: v for k, v in metrics.items() if k in (
        "test_loss", "test_rouge_l", "test_exact_match", "test_subquery_f1", "test_samples")})
    return predictions


def report(run: Run, summary: dict, predictions: Optional[list]):
    """The summary table, test examples (query -> prediction vs reference) and what was saved where."""
    cfg, console = run.cfg, run.console
    console.print(summary_table(summary))
    if predictions is not None:
        console.print(examples_table(run.data.test.examples, predictions, seed=cfg.seed))
    parts = [f"{ADAPTER_DIR}/" if cfg.lora else f"{FINAL_DIR}/"] + ([f"{FINAL_DIR}/ (fused)"] if cfg.lora and cfg.fuse
                                                                       else [])
    parts += [f"{BEST_DIR}/ (step {run.state.best_step})"] if run.state.best_step is not None else []
    parts += [f"{CHECKPOINT_DIR}/", "metrics.jsonl", "curves.png", "summary.json"]
    console.print(f"[green]saved[/] {run.out}/: {', '.join(parts)}", highlight=False)


def train(cfg: TrainConfig, console=None) -> dict:
    """Run the job described by `cfg` (validated): build, loop, final eval, save, score; return the summary.

    Data-parallel under mlx.launch: every rank trains, rank 0 alone prints, evaluates and writes."""
    from rich.console import Console

    world = World.init(cfg.distributed_timeout)
    console = (console or Console()) if world.is_main else Console(quiet=True)
    run = build_run(cfg, console, world)
    describe(run)
    with StopOnSignal(console) as run.signals, open_log(run) as run.log:
        stopped = train_loop(run)
        if stopped is Stop.SIGNAL:
            if world.is_main:
                save_resume(run)
            raise KeyboardInterrupt(f"stopped by {run.signals.name or 'another rank’s signal'} at step "
                                    f"{run.state.step}: checkpoint saved to {run.out / CHECKPOINT_DIR}; continue "
                                    f"with --resume {run.out / CHECKPOINT_DIR}")
        if not world.is_main:  # rank 0 evaluates, saves and scores the test split alone
            return {"rank": world.rank, "total_steps": run.state.step}
        final_eval = evaluate_and_keep_best(run)
        save_resume(run)
        return finish(run, final_eval, stopped)


__all__ = ["Run", "Stop", "TrainError", "TrainState", "build_data", "build_model", "build_optimizer", "build_run",
           "build_schedule", "bucket", "collate", "epoch_batches", "evaluate", "load_splits", "make_step", "predict",
           "save_checkpoint", "restore_checkpoint", "train", "train_loop"]
