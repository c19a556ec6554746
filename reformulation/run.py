"""The run contract both trainers follow: which validation rows an evaluation decodes, which model is kept as the
best, and the output folder's model directories. The same config gives the same rows and the same layout on MLX and
on torch, so their scores are comparable and a run folder reads the same whichever engine wrote it."""

from __future__ import annotations

import random
from typing import Optional

FINAL_DIR = "final"  # the model after the last step
BEST_DIR = "best"  # the model of the best evaluation (highest ROUGE-L, then lowest loss); the test split scores it


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
