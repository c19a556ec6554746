"""The run contract both trainers follow: which validation rows an evaluation decodes, which model is kept as the
best, the output folder's layout and how a resume finds its checkpoint. The same config gives the same rows and the
same layout on MLX and on torch, so their scores are comparable and a run folder reads the same whichever engine
wrote it.

    OUTPUT_DIR/
      final/        the model after the last step: an HF folder (+ tokenizer, + drafts.json: the train targets'
                    phrasebook for speculative decoding); for LoRA the fused model (fuse: true)
      adapter/      LoRA only: the trained adapters (+ adapter_config.json naming the base)
      best/         the best evaluation's model (adapters for LoRA); the test split scores it
      checkpoint/   MLX: the resume checkpoint, replaced atomically      checkpoint-N/  torch: the HF Trainer's
      config.yaml  metrics.jsonl  curves.png  summary.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from .io import atomic_write_text
from .reporting import read_metrics

FINAL_DIR = "final"  # the model after the last step (for LoRA: the fused model, written with fuse: true)
BEST_DIR = "best"  # the model of the best evaluation (highest ROUGE-L, then lowest loss); the test split scores it
ADAPTER_DIR = "adapter"  # LoRA: the adapters after the last step
STATE_FILE = "trainer_state.json"  # in every resume checkpoint, both engines
CHECKPOINT_DIR = "checkpoint"  # MLX: one checkpoint, replaced atomically at every save
TORCH_CHECKPOINT_PREFIX = "checkpoint-"  # torch: the HF Trainer's checkpoint-<step>
SHARED_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_loss", "total_steps", "epochs", "eval_loss",
                "eval_rouge_l", "eval_exact_match", "eval_subquery_f1", "test_model_step", "test_loss", "test_rouge_l",
                "test_exact_match", "test_subquery_f1")  # what summary.json holds on both engines


def mlx_checkpoint(out: Path) -> Optional[Path]:
    """The MLX trainer's resume checkpoint in run folder `out`, if it holds one."""
    folder = Path(out) / CHECKPOINT_DIR
    return folder if (folder / STATE_FILE).is_file() else None


def torch_checkpoints(out: Path) -> list[Path]:
    """The torch trainer's complete checkpoint-N folders in run folder `out`, oldest first."""
    out = Path(out)
    found = [p for p in out.glob(TORCH_CHECKPOINT_PREFIX + "*") if p.name[len(TORCH_CHECKPOINT_PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()] if out.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(TORCH_CHECKPOINT_PREFIX):]))


def auto_resume(out: Path, engine: str, error: type[Exception] = ValueError) -> Optional[Path]:
    """`resume: auto`: this engine's newest checkpoint in `out`, or None to start fresh. A folder that holds only
    the other engine's checkpoint is refused: its state cannot continue here, and starting fresh would overwrite it."""
    mine, theirs = (mlx_checkpoint(out), torch_checkpoints(out)) if engine == "mlx" else \
        ((torch_checkpoints(out) or [None])[-1], mlx_checkpoint(out))
    if mine is None and theirs:
        other, module = ("torch", "torch_t5.train") if engine == "mlx" else ("MLX", "mlx_t5.train")
        raise error(f"{out} holds a {other} checkpoint, which the {engine if engine == 'torch' else 'MLX'} trainer "
                    f"cannot continue: resume it with python -m {module}, or choose another output_dir")
    return mine


def drop_metrics_after(path: Path, step: int) -> None:
    """A resume from `step` forgets the log records past it (those steps are trained again); step 0 starts a new
    log."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step] if step else []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def eval_indices(count: int, samples: int) -> list[int]:
    """Indices of the validation rows every evaluation decodes: all `count`, or `samples` spread over the split.

    Rows of one target sit together, so the first N would be few targets. The subset does not depend on the seed:
    runs with different seeds are compared on the same rows."""
    if not samples or count <= samples:
        return list(range(count))
    return sorted(random.Random(0).sample(range(count), samples))


def is_better(rouge_l: float, loss: float, best_rouge_l: Optional[float], best_loss: Optional[float]) -> bool:
    """Whether an evaluation beats the best so far: higher ROUGE-L, or the same ROUGE-L at a lower loss."""
    if best_rouge_l is None or rouge_l > best_rouge_l:
        return True
    return rouge_l == best_rouge_l and best_loss is not None and loss < best_loss
