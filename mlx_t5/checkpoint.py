"""The MLX trainer's resume checkpoint: where a run is (`TrainState`), saving it atomically, restoring it exactly.

A checkpoint (OUTPUT_DIR/checkpoint/, reformulation.run) holds the trainable weights (the full model, or the LoRA
adapters), the optimizer state, the RNG key, the position in the data order and the config; a task tokenizer too.
Restoring it into a freshly built model and optimizer continues the run bit for bit (tests/test_train.py).
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from reformulation.config import TrainConfig
from reformulation.constants import GROUP_SIZE
from reformulation.io import atomic_dir, atomic_write_json, read_json_object
from reformulation.run import STATE_FILE, auto_resume, is_better, mlx_checkpoint

from .lora import CONFIG_FILE as ADAPTER_CONFIG, ADAPTER_FILE, adapter_config, adapter_weights, load_adapters
from .model import Model
from .utils import model_config

# changing these between a checkpoint and its resume would change the data order or the model
RESUME_KEYS = ("model", "init", "data", "split", "split_fractions", "sample_fraction", "normalize",
               "max_source_length", "max_target_length", "batch_size", "grad_accum", "seed", "optimizer",
               "lora", "lora_rank", "lora_alpha", "lora_targets", "quantize_base", "tokenizer_vocab_size",
               "augment_copies", "augment_invented", "augment_names")


class TrainError(RuntimeError):
    """A training job that cannot run as configured; the message says why."""


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


def learning_rate(optimizer) -> float:
    return float(optimizer.learning_rate.item() if isinstance(optimizer.learning_rate, mx.array)
                 else optimizer.learning_rate)


def save_checkpoint(folder: Path, model: Model, optimizer: optim.Optimizer, state: TrainState, cfg: TrainConfig,
                    total_steps: int, base: Optional[str], tokenizer=None):
    """Everything a resume needs, written to a temp folder and renamed over `folder` (never half-written)."""
    key = mx.random.state[0].tolist()
    trainer_state = asdict(state) | {
        "total_steps": total_steps,
        "rng": {"mlx_key": key, "numpy_data_order": {"seed": cfg.seed, "epoch": state.epoch,
                                                     "generator": "np.random.default_rng([seed, epoch])"}},
        "schedule": {"optimizer_step": state.step, "learning_rate": learning_rate(optimizer)},
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
        atomic_write_json(tmp / STATE_FILE, trainer_state)
        cfg.save(tmp / "config.yaml")


def restore_checkpoint(folder: Path, model: Model, optimizer: optim.Optimizer, cfg: TrainConfig) -> TrainState:
    """Load weights, optimizer state, RNG and position from `folder` into the freshly built model/optimizer."""
    saved = read_json_object(folder / STATE_FILE, "a checkpoint folder", TrainError)
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


def resume_folder(path) -> Path:
    """The checkpoint folder: `path` itself or `path/checkpoint` (a run's output folder); torch's is refused."""
    path = Path(path)
    for folder in (path, mlx_checkpoint(path)):
        if folder is not None and (folder / STATE_FILE).is_file():
            if not (folder / "optimizer.safetensors").is_file():
                raise TrainError(f"{folder} is not an MLX checkpoint (a torch one? resume it with python -m "
                                 "torch_t5.train)")
            return folder
    raise TrainError(f"{path}: no checkpoint (expected {STATE_FILE} in it or in {path / 'checkpoint'})")


def find_resume(cfg: TrainConfig, console) -> Optional[Path]:
    """The checkpoint this run continues from: `resume`'s folder, or for "auto" the output folder's (if any)."""
    if cfg.resume == "auto":  # the run contract: this output folder's checkpoint, or a fresh start
        out = Path(cfg.output_dir)
        resume = auto_resume(out, "mlx", TrainError)
        console.print(f"resume: {resume or 'no checkpoint in ' + str(out) + ', starting fresh'}", highlight=False)
    else:
        resume = resume_folder(cfg.resume) if cfg.resume else None
    if resume is not None:
        check_resume_config(cfg, resume)
    return resume


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
