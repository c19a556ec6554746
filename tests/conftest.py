import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER_DIR = SHARED / "tokenizers" / "flan-t5-small"
FULL_JSONL = SHARED / "datasets" / "full.jsonl"
DEV_JSONL = SHARED / "datasets" / "dev.jsonl"

sys.path.insert(0, str(ROOT / "tests"))
import mlx_t5  # noqa: E402,F401  (loads OpenBLAS before any test imports mlx directly)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: these tests need ../shared beside the checkout")
    return path


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread for a module of tiny matmuls: a second OpenMP thread gains nothing, and on a
    busy 2-core box spinning threads make them several times slower. Restored for whoever runs next."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blas_one_thread():
    """One OpenBLAS thread for a module of tiny MLX models: more threads only add synchronisation (and spin
    when the CPU is shared). Restored for whoever runs next."""
    from mlx_t5 import blas

    before = blas.get_threads()
    if before is None:
        yield
        return
    blas.set_threads(1)
    yield
    blas.set_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return _need(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def full_jsonl() -> Path:
    return _need(FULL_JSONL)


@pytest.fixture(scope="session")
def dev_jsonl() -> Path:
    return _need(DEV_JSONL)
