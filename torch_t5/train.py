"""Fine-tune (Flan-)T5 for query reformulation with transformers' Seq2SeqTrainer.

    python -m torch_t5.train --model google/flan-t5-base --output-dir runs/base   # preset detected from the GPU
    python -m torch_t5.train --model google/flan-t5-large --lora --lora-targets all --fuse --preset l4
    python -m torch_t5.train --config runs/base/config.yaml --resume auto        # continue after a disconnect
    torchrun --nproc_per_node 4 -m torch_t5.train --config my-run.yaml           # DDP, see docs/torch.md

Same config file and flags as the MLX trainer (reformulation.config). Writes to ``output_dir``:
``final/`` (HF folder: model.safetensors, config.json, tokenizer), ``adapter/`` for LoRA (PEFT
folder; ``final/`` then holds the fused model only with ``fuse: true``), ``checkpoint-N/``
(trainer state, for ``--resume``), ``metrics.jsonl``, ``curves.png``, ``config.yaml`` and
``summary.json``.
"""

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from reformulation.config import ConfigError, TrainConfig, add_config_args, config_from_args, print_config
from reformulation.data import DataError, Splits, load_examples, make_splits, tokenize
from reformulation.constants import FLAN_T5_SHAPES, decoder_output_scale
from reformulation.io import atomic_dir, atomic_write_json, read_json_object
from reformulation.metrics import score
from reformulation.recipe import phrasebook, task_tokenizer, training_examples
from reformulation.reporting import MetricsLog, examples_table, plot_curves, summary_table
from reformulation.run import ADAPTER_DIR, BEST_DIR, FINAL_DIR, auto_resume, drop_metrics_after, eval_indices, is_better
from reformulation.run import mlx_checkpoint

from .infer import quiet_transformers
from .presets import check_dtype, detect_preset

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = _REPO.parent / "shared" / "tokenizers" / "flan-t5-small"

SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_loss", "eval_loss", "eval_rouge_l",
                "eval_exact_match", "eval_subquery_f1", "eval_runtime", "eval_samples_per_second")


def default_tokenizer() -> str:
    return str(DEFAULT_TOKENIZER) if DEFAULT_TOKENIZER.is_dir() else "google/flan-t5-small"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# -- model -------------------------------------------------------------------------------------

def _mark_tying(model) -> None:
    # transformers 5 forces T5Config.tie_word_embeddings=True; say what the weights really are, so a
    # saved config.json is read right by transformers (no re-tie) and by mlx_t5 (no v1.0 scaling).
    model.config.tie_word_embeddings = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()


def init_model(init: str, dropout: float | None, vocab_size: int | None = None):
    """A randomly initialised T5: a Flan-T5 size name or a config.json path (vocab_size: a task tokenizer's)."""
    from transformers import T5Config, T5ForConditionalGeneration

    if init in FLAN_T5_SHAPES:
        config = T5Config(**FLAN_T5_SHAPES[init])
    else:
        raw = read_json_object(init, "an init config folder", ConfigError)
        try:
            config = T5Config.from_dict(raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"init: {init} is not a readable T5 config.json ({e})") from None
    tie = decoder_output_scale(config) is not None  # T5 v1.0: the head is the (rescaled) embedding
    if dropout is not None:
        config.dropout_rate = dropout
    if vocab_size is not None:
        config.vocab_size = vocab_size
    model = T5ForConditionalGeneration(config)
    if not tie:  # its own head, drawn like transformers initialises an untied T5 head
        head = torch.empty_like(model.lm_head.weight).normal_(0.0, config.initializer_factor)
        model.lm_head.weight = torch.nn.Parameter(head)
    _mark_tying(model)
    return model


def _bnb_config(cfg: TrainConfig):
    if not torch.cuda.is_available():
        raise ConfigError(f"quantize_base: {cfg.quantize_base} needs a CUDA GPU (bitsandbytes); without one, train "
                          "LoRA on the float base (quantize_base: none)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quantize_base: {cfg.quantize_base} needs bitsandbytes: pip install "
                          "'query-reformulation[torch,cuda]' (or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    if cfg.quantize_base == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def model_source(cfg: TrainConfig) -> str | None:
    """The folder or hub id to load (None for a random init)."""
    if cfg.model is None and cfg.init is None:  # resuming a full fine-tune: the checkpoint is the model
        resume = resolve_resume(cfg)
        if resume is None:
            raise ConfigError(f"nothing to train: set model or init (resume: auto found no checkpoint in "
                              f"{cfg.output_dir})")
        return resume
    return cfg.model


def check_hardware(cfg: TrainConfig) -> None:
    """Refuse, before any loading, what this machine cannot run."""
    why = check_dtype(cfg.dtype)
    if why:
        raise ConfigError(why)
    if cfg.lora and not cfg.model:
        raise ConfigError("lora trains adapters on a frozen pretrained base: set model (an HF folder or hub id); "
                          "a random init base learns nothing")
    if cfg.quantize_base:
        _bnb_config(cfg)


def load_tokenizer(cfg: TrainConfig, override: str | None = None):
    from transformers import AutoTokenizer

    source = override
    if source is None:
        model = model_source(cfg)
        has_tokenizer = model is not None and (not Path(model).is_dir() or any(Path(model).glob("tokenizer*")))
        source = model if has_tokenizer else default_tokenizer()
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: cannot load {source!r} ({_first_line(e)})") from None


def load_model(cfg: TrainConfig, tokenizer):
    """The model to train: ``model`` (fine-tune) or random ``init``, with LoRA / a k-bit base on top."""
    from transformers import AutoModelForSeq2SeqLM

    source = model_source(cfg)
    if source is not None:
        kwargs = {"dtype": torch.float32}
        if cfg.dropout is not None:
            kwargs["dropout_rate"] = cfg.dropout
        if cfg.quantize_base:
            kwargs["quantization_config"] = _bnb_config(cfg)
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
        try:
            with quiet_transformers():
                model = AutoModelForSeq2SeqLM.from_pretrained(source, **kwargs)
        except OSError as e:
            raise ConfigError(f"model: cannot load {source!r} ({_first_line(e)})") from None
        _mark_tying(model)
    else:
        model = init_model(cfg.init, cfg.dropout, len(tokenizer) if cfg.tokenizer_vocab_size else None)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the model only "
                          f"{model.config.vocab_size} embedding rows")
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.lora:
        model = apply_lora(model, cfg)
    return model


def apply_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               or type(m).__name__ in ("Linear8bitLt", "Linear4bit")}
    targets = [t for t in cfg.lora_modules() if t in present]
    if not targets:
        raise ConfigError(f"lora_targets {cfg.lora_targets!r}: none of {list(cfg.lora_modules())} is a Linear of "
                          f"this model (it has {sorted(present)})")
    if cfg.quantize_base:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none")
    return get_peft_model(model, lora_config)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# -- data --------------------------------------------------------------------------------------

class Seq2SeqDataset(torch.utils.data.Dataset):
    """Token ids of examples; ``examples`` kept so metrics can score against the real targets."""

    def __init__(self, tokenizer, examples, cfg: TrainConfig):
        self.examples = list(examples)
        ids = tokenize(tokenizer, self.examples, cfg.max_source_length, cfg.max_target_length)
        self.input_ids, self.labels = ids["input_ids"], ids["labels"]
        self.truncated = (ids["truncated_sources"], ids["truncated_targets"])

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def load_splits(cfg: TrainConfig, console=None) -> Splits:
    """The configured splits; DataError / ConfigError on bad or empty data."""
    from rich.markup import escape

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = load_examples(cfg.data, normalize=cfg.normalize)
    if console is not None:
        for w in caught:
            if issubclass(w.category, UserWarning):  # duplicate rows, named by file and line
                console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    splits = make_splits(examples, kind=cfg.split, fractions=cfg.split_fractions,
                         sample_fraction=cfg.sample_fraction, seed=cfg.seed)
    if not splits.train:
        raise ConfigError(f"no training examples: {len(examples)} rows, split {cfg.split}, "
                          f"sample_fraction {cfg.sample_fraction}")
    return splits


def load_data(cfg: TrainConfig, tokenizer, console=None, splits: Splits | None = None):
    """``(train, valid_for_eval, test)`` datasets; the train set holds the augmented rows too."""
    splits = splits if splits is not None else load_splits(cfg, console)
    valid = splits.valid
    valid = [valid[i] for i in eval_indices(len(valid), cfg.eval_samples)]  # the run contract's rows
    train = training_examples(cfg, splits.train)
    datasets = [Seq2SeqDataset(tokenizer, part, cfg) for part in (train, valid, splits.test)]
    if console is not None:
        cut = datasets[0].truncated
        extra = len(train) - len(splits.train)
        console.print(f"data: train {len(splits.train):,}" + (f" + {extra:,} entity-swapped" if extra else "")
                      + f", valid {len(splits.valid):,} (eval on {len(valid):,}), test {len(splits.test):,} "
                      f"({cfg.split} split)" + (f"; task tokenizer: {len(tokenizer):,} pieces"
                                                if cfg.tokenizer_vocab_size else "")
                      + (f"; truncated in train: {cut[0]} sources, {cut[1]} targets" if any(cut) else ""),
                      highlight=False)
    return datasets


# -- trainer -----------------------------------------------------------------------------------

class GenerationMetrics:
    """compute_metrics for predict_with_generate: decode, then score against the real targets.

    ``dataset`` is the one being evaluated (set before ``trainer.predict(test)``); its stored
    targets are scored, not the truncated label ids.
    """

    def __init__(self, tokenizer, dataset: Seq2SeqDataset):
        self.tokenizer, self.dataset = tokenizer, dataset
        self.predictions: list[str] = []  # of the last call, to show a few

    def __call__(self, eval_pred) -> dict:
        import numpy as np

        pad = self.tokenizer.pad_token_id
        preds = np.asarray(eval_pred.predictions)
        preds = np.where(preds < 0, pad, preds)  # -100: padding between batches
        predictions = [p.strip() for p in self.tokenizer.batch_decode(preds, skip_special_tokens=True)]
        self.predictions = predictions
        if len(predictions) == len(self.dataset):
            references = [e.target for e in self.dataset.examples]
        else:  # not the dataset we were told about: fall back to the label ids
            labels = np.where(eval_pred.label_ids < 0, pad, eval_pred.label_ids)
            references = self.tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {k: v for k, v in score(predictions, references).items() if k != "count"}


def token_mean_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over label tokens, divided by the label tokens of the whole optimizer step.

    The trainer passes ``num_items_in_batch``: non-padding labels over all gradient-accumulation
    micro-batches and all processes. T5's own loss is a per-micro-batch mean that ignores it, yet
    the trainer treats it as normalized, so with ``grad_accum`` > 1 or several GPUs the gradients
    and the logged loss came out that many times too large.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    labels = labels.to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum()
    return total / count


def training_arguments(cfg: TrainConfig, has_eval: bool):
    from transformers import Seq2SeqTrainingArguments

    schedule = cfg.lr_schedule
    if schedule == "constant" and cfg.warmup_steps:
        schedule = "constant_with_warmup"
    eval_steps = cfg.eval_every if cfg.eval_every and has_eval else None
    return Seq2SeqTrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=schedule,
        warmup_steps=cfg.warmup_steps,
        optim="adafactor" if cfg.optimizer == "adafactor" else "adamw_torch",
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0,
        bf16=cfg.dtype == "bfloat16",
        seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",  # the trainer also saves at the last step
        save_steps=cfg.save_every or cfg.eval_every or 10**9,  # 10**9: only at the end
        save_total_limit=2,
        logging_steps=cfg.log_every,
        predict_with_generate=True,
        report_to="none",
        disable_tqdm=True,  # RichProgress below
        remove_unused_columns=False,
        # no GPU: say so, or a torchrun launch on CPUs trains N independent copies instead of DDP over gloo
        use_cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )


def unwrap(model):
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_generation_config(model, cfg: TrainConfig) -> None:
    """Eval decoding settings, on the underlying model (PeftModel forwards generate() to it)."""
    from transformers import GenerationConfig

    base = unwrap(model)
    base.generation_config = GenerationConfig(
        decoder_start_token_id=base.config.decoder_start_token_id, pad_token_id=base.config.pad_token_id,
        eos_token_id=base.config.eos_token_id, num_beams=cfg.eval_num_beams, do_sample=False,
        # max_length, not max_new_tokens: the trainer fills in max_length=20 after the first eval, and
        # generate() then warns that both are set. Decoder length = start token + new tokens.
        max_length=cfg.eval_max_new_tokens + 1)


def _trainer_class():
    from transformers import Seq2SeqTrainer

    class Trainer(Seq2SeqTrainer):
        """Seq2SeqTrainer whose evaluation and prediction keep the dataset's order.

        transformers 5 applies `train_sampling_strategy="group_by_length"` to evaluation too: predictions came back
        length-shuffled and `GenerationMetrics` scored each against another row's reference (ROUGE-L ~0.02 for a
        model that scores 0.2). Sequential on one process; with several, None is what transformers gives without
        length grouping: accelerate shards in order and gathers in order."""

        def _get_eval_sampler(self, eval_dataset):
            if eval_dataset is None or self.args.world_size > 1:
                return None
            return torch.utils.data.SequentialSampler(eval_dataset)

    return Trainer


def _callbacks():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Every log record into metrics.jsonl; curves.png redrawn after each evaluation."""

        def __init__(self, output_dir: Path, enabled: bool = True):
            self.path = Path(output_dir) / "metrics.jsonl"
            self.enabled, self.log = enabled, None

        def write(self, record: dict) -> None:
            if not self.enabled:
                return
            if self.log is None:
                self.log = MetricsLog(self.path)
            self.log.log(record)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            self.write({"step": state.global_step, **logs})
            if "eval_loss" in logs and self.enabled:
                plot_curves(self.path, self.path.with_name("curves.png"))

        def close(self) -> None:
            if self.log is not None:
                self.log.close()
                self.log = None

    class TimeBudget(TrainerCallback):
        """Stop after ``max_minutes`` like at the last step: checkpoint, then evaluate and save."""

        def __init__(self, max_minutes: float | None, console: Console):
            self.max_minutes, self.console, self.deadline = max_minutes, console, None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.max_minutes:
                self.deadline = time.monotonic() + 60 * self.max_minutes

        def on_step_end(self, args, state, control, **kwargs):
            if self.deadline is not None and time.monotonic() > self.deadline and not control.should_training_stop:
                control.should_training_stop = control.should_save = True
                self.console.print(f"[yellow]max_minutes ({self.max_minutes:g}) spent[/]: stopping at step "
                                   f"{state.global_step} of {state.max_steps}", highlight=False)

    class KeepBest(TrainerCallback):
        """best/: the model of the best evaluation so far (reformulation.run.is_better), as the MLX trainer keeps it.
        `save(model)` writes it; only the main process saves."""

        def __init__(self, save, enabled: bool = True):
            self.save, self.enabled = save, enabled
            self.rouge_l = self.loss = self.step = None

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            if not metrics or "eval_rouge_l" not in metrics:
                return
            if is_better(metrics["eval_rouge_l"], metrics["eval_loss"], self.rouge_l, self.loss):
                self.rouge_l, self.loss, self.step = metrics["eval_rouge_l"], metrics["eval_loss"], state.global_step
                if self.enabled:
                    self.save(model)

    class RichProgress(TrainerCallback):
        """A rich progress bar for training and for each evaluation, and one line per log record."""

        def __init__(self, console: Console):
            self.console, self.progress, self.train_task, self.eval_task = console, None, None, None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=False)
            self.progress.start()
            self.train_task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                                     info="")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.train_task, completed=state.global_step)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if self.progress is None or not state.is_world_process_zero:
                return
            if self.eval_task is None:
                total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
                self.eval_task = self.progress.add_task("eval", total=total, info="generating")
            self.progress.advance(self.eval_task)

        def _end_eval(self):
            if self.eval_task is not None:
                self.progress.remove_task(self.eval_task)
                self.eval_task = None

        def on_evaluate(self, args, state, control, **kwargs):
            if self.progress is not None:
                self._end_eval()

        def on_predict(self, args, state, control, **kwargs):
            if self.progress is not None:
                self._end_eval()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is None or not logs:
                return
            if "loss" in logs:
                info = f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
                self.progress.update(self.train_task, info=info)
                self.console.print(f"step {state.global_step:>6}  {info}  grad_norm {logs.get('grad_norm', math.nan):.3f}",
                                   highlight=False)
            elif "eval_loss" in logs:
                shown = "  ".join(f"{k[5:]} {logs[k]:.4f}" for k in ("eval_loss", "eval_rouge_l", "eval_exact_match",
                                                                     "eval_subquery_f1") if k in logs)
                self.console.print(f"[cyan]eval[/] step {state.global_step:>6}  {shown}", highlight=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self._end_eval()
                self.progress.stop()
                self.progress = None

    return MetricsCallback, TimeBudget, KeepBest, RichProgress


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint folder to resume from: ``resume`` itself, or the newest complete one for "auto"."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        if (Path(cfg.resume) / "optimizer.safetensors").is_file() or mlx_checkpoint(cfg.resume):
            raise ConfigError(f"{cfg.resume} is an MLX checkpoint: resume it with python -m mlx_t5.train")
        return cfg.resume
    found = auto_resume(Path(cfg.output_dir), "torch", ConfigError)
    return str(found) if found else None


# -- saving ------------------------------------------------------------------------------------

def save_full(model, tokenizer, path: Path, max_new_tokens: int = 64, drafts=None) -> Path:
    """An HF folder, written atomically, with tie_word_embeddings stated explicitly (and the run's phrasebook for
    speculative decoding: `drafts`)."""
    from transformers import GenerationConfig

    _mark_tying(model)
    # a clean generation config: the trainer's eval one carries a max_length, and generate(max_new_tokens=...)
    # then warns that both are set; without any, generate() would stop at 20 tokens (targets reach 48)
    config, eval_generation = model.config, model.generation_config
    model.generation_config = GenerationConfig(decoder_start_token_id=config.decoder_start_token_id,
                                               pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
                                               max_new_tokens=max_new_tokens)
    try:
        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if drafts is not None:
                drafts.save(tmp)
    finally:
        model.generation_config = eval_generation  # the final evaluation still decodes with the eval settings
    return path


def save_model(model, tokenizer, path: Path, cfg: TrainConfig, drafts=None) -> Path:
    """The trained model as the run keeps it: LoRA adapters, or the full HF folder (+ the phrasebook `drafts`)."""
    if cfg.lora:
        return save_adapter(model, tokenizer, path, drafts)
    return save_full(unwrap(model), tokenizer, path, cfg.eval_max_new_tokens, drafts)


def load_best(model, path: Path, cfg: TrainConfig) -> None:
    """Put the weights saved by `save_model` in `path` back into the model being trained, in place."""
    from safetensors.torch import load_file

    if cfg.lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    base = unwrap(model)
    # from_pretrained resolves the tied / untied head as the folder says; its state dict has every key
    saved = type(base).from_pretrained(str(path), dtype=next(base.parameters()).dtype)
    base.load_state_dict(saved.state_dict())


def save_adapter(peft_model, tokenizer, path: Path, drafts=None) -> Path:
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if drafts is not None:
            drafts.save(tmp)
    return path


def fuse_adapter(cfg: TrainConfig, adapter_dir: Path):
    """The base model in fp32 with the saved adapter merged in.

    Built from the files, not from the trained model: that one stays a usable PeftModel, and a
    k-bit base is never merged into (lossy, and not loadable by mlx_t5).
    """
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "embeddings no longer tied" (they never were; _mark_tying says so)
        base = AutoModelForSeq2SeqLM.from_pretrained(cfg.model, dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


# -- main --------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    summary: dict  # what summary.json holds
    model: object  # the trained model (a PeftModel for LoRA), in memory
    tokenizer: object
    output_dir: Path


def train(cfg: TrainConfig, tokenizer_override: str | None = None, console=None) -> TrainResult:
    """Run one training job from a validated config (see module docstring for what it writes)."""
    from rich.console import Console
    from transformers import DataCollatorForSeq2Seq, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    main = is_main_process()
    console = console or Console(quiet=not main)
    hf_logging.disable_progress_bar()
    # deprecation notices from inside transformers / peft say nothing the user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    check_hardware(cfg)
    out = Path(cfg.output_dir)
    resume = resolve_resume(cfg)
    if cfg.resume == "auto":
        console.print(f"resume: {resume or 'no checkpoint in ' + str(out) + ', starting fresh'}", highlight=False)

    if resume and main:
        drop_metrics_after(out / "metrics.jsonl", int(Path(resume).name.rsplit("-", 1)[-1]))

    splits = load_splits(cfg, console)  # data errors before a slow model load
    tokenizer = task_tokenizer(cfg, splits.train, resume) or load_tokenizer(cfg, tokenizer_override)
    train_set, eval_set, test_set = load_data(cfg, tokenizer, console, splits)
    set_seed(cfg.seed)
    with console.status(f"loading {model_source(cfg) or 'a random ' + str(cfg.init) + ' model'}"):
        model = load_model(cfg, tokenizer)
    drafts = phrasebook(tokenizer, splits.train, unwrap(model).config.decoder_start_token_id) if main else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    if cfg.lora and main:
        trainable, total = model.get_nb_trainable_parameters()
        console.print(f"LoRA: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")

    set_generation_config(model, cfg)
    MetricsCallback, TimeBudget, KeepBest, RichProgress = _callbacks()
    metrics = GenerationMetrics(tokenizer, eval_set)
    metrics_log = MetricsCallback(out, enabled=main)
    keep_best = KeepBest(lambda m: save_model(m, tokenizer, out / BEST_DIR, cfg, drafts), enabled=main)
    trainer = _trainer_class()(
        model=model,
        args=training_arguments(cfg, has_eval=len(eval_set) > 0),
        train_dataset=train_set,
        eval_dataset=eval_set if len(eval_set) else None,
        # with `model`, the collator builds decoder_input_ids: token_mean_loss takes the labels away from the model
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=unwrap(model), label_pad_token_id=-100,
                                             pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        processing_class=tokenizer,
        compute_loss_func=token_mean_loss,
        compute_metrics=metrics,
        callbacks=[metrics_log, TimeBudget(cfg.max_minutes, console), keep_best, RichProgress(console)],
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)

    result = trainer.train(resume_from_checkpoint=resume)
    summary = {k: v for k, v in result.metrics.items() if k in SUMMARY_KEYS}
    summary.update(total_steps=trainer.state.global_step, epochs=round(trainer.state.epoch or 0.0, 3))  # as MLX's

    if trainer.is_world_process_zero():
        with console.status("saving"):
            save_model(trainer.model, tokenizer, out / (ADAPTER_DIR if cfg.lora else FINAL_DIR), cfg, drafts)
    trainer.accelerator.wait_for_everyone()

    if len(eval_set):
        step = trainer.state.global_step
        last = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == step]
        if last:  # the last step already evaluated: no second pass
            evaluation = last[-1]
        else:
            with console.status(f"evaluating on {len(eval_set):,} validation rows"):
                evaluation = trainer.evaluate()
        summary.update({k: v for k, v in evaluation.items() if k in SUMMARY_KEYS})
    if len(test_set):
        trainer.accelerator.wait_for_everyone()  # best/ written by the main process
        summary["test_model_step"] = keep_best.step if keep_best.step is not None else trainer.state.global_step
        if keep_best.step is not None and keep_best.step != trainer.state.global_step:  # score the kept model
            load_best(trainer.model, out / BEST_DIR, cfg)
        metrics.dataset = test_set
        with console.status(f"scoring the test split ({len(test_set):,} rows) with the model of step "
                            f"{summary['test_model_step']}"):
            test = trainer.predict(test_set, metric_key_prefix="test").metrics
        metrics_log.write({"step": trainer.state.global_step, **test})
        summary.update({k: v for k, v in test.items() if k.startswith("test_") and not k.endswith("per_second")})
    metrics_log.close()

    if main:
        if cfg.lora and cfg.fuse:
            with console.status("fusing the adapter into the model"):
                save_full(fuse_adapter(cfg, out / ADAPTER_DIR), tokenizer, out / FINAL_DIR, cfg.eval_max_new_tokens,
                          drafts)
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        summary["output_dir"] = str(out)
        atomic_write_json(out / "summary.json", summary)
        console.print(summary_table(summary, title="Training Log"))
        if len(test_set) and len(metrics.predictions) == len(test_set):
            console.print(examples_table(test_set.examples, metrics.predictions, seed=cfg.seed))
        saved = [d for d in (FINAL_DIR, BEST_DIR, ADAPTER_DIR) if (out / d).is_dir()]
        console.print(f"[green]saved[/] {', '.join(str(out / d) for d in saved)}", highlight=False)
    return TrainResult(summary, trainer.model, tokenizer, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torch_t5.train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None,
                        help=f"tokenizer folder or hub id (default: the model's; for init: {default_tokenizer()})")
    add_config_args(parser)
    return parser


def resolve_config(args, console=None) -> TrainConfig:
    """Config from flags + YAML. Without a config file the hardware preset is detected unless a flag names one.

    A config file is the recipe, read as written by both trainers: a detected preset under it would change the
    data (the cpu preset trains on a tenth of it) and the learning rate on one engine only."""
    cfg = config_from_args(args)
    if cfg.preset is None and getattr(args, "config", None) is None:
        preset, why = detect_preset()
        args.preset = preset
        cfg = config_from_args(args)
        if console is not None:
            console.print(f"preset [bold]{preset}[/] ({why}); override with --preset", highlight=False)
    return cfg


def main(argv=None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(quiet=not is_main_process())
    err = Console(stderr=True)
    try:
        cfg = resolve_config(args, console)
        print_config(cfg, console)
        start = time.perf_counter()
        train(cfg, tokenizer_override=args.tokenizer, console=console)
        console.print(f"done in {time.perf_counter() - start:,.0f} s", highlight=False)
    except (ConfigError, DataError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: continue from the last checkpoint with --resume auto", highlight=False)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
