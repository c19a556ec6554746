"""torch_t5/colab.ipynb: valid, clean, and runs end to end headless (tiny model, CPU, no install)."""

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "torch_t5" / "colab.ipynb"


def read_notebook():
    nbformat = pytest.importorskip("nbformat")
    return nbformat, nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    return tagged[0]


def test_notebook_is_valid_and_clean():
    nbformat, nb = read_notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    params = nb.cells[parameters_index(nb)].source
    for name in ("MODEL_SIZE", "PRESET", "DATA", "STEPS", "REPO_URL", "INSTALL", "TINY = False"):
        assert name in params, name
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit the notebook without outputs"
    sources = "\n".join(cell.source for cell in nb.cells)
    for step in ("pip", "install", "datasets/fetch.py", "torch_t5.train", "convert", "hf-to-mlx", "quantize_checkpoint",
                 "zipfile"):
        assert step in sources, step


def test_notebook_runs_end_to_end(tmp_path, full_jsonl, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel and its subprocesses: tiny model, busy CI box
    nbformat, nb = read_notebook()
    nbclient = pytest.importorskip("nbclient")
    convert = importlib.util.find_spec("convert") is not None and importlib.util.find_spec("mlx") is not None
    out = tmp_path / "run"
    overrides = dict(INSTALL=False, TINY=True, STEPS=2, DATA=str(full_jsonl), OUTPUT_DIR=str(out),
                     CONVERT_TO_MLX=convert, QUANTIZE_INT8=True)
    # what papermill does: a cell right after the parameters cell that overrides them
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    nb.cells.insert(parameters_index(nb) + 1, injected)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()

    assert (out / "final" / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert "test_rouge_l" in summary and "train_runtime" in summary
    assert (out / "int8" / "quantization.json").is_file()
    if convert:
        assert (out / "mlx" / "config.json").is_file()
    archive = out.with_name("run-export.zip")
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert "run/final/model.safetensors" in names and "run/summary.json" in names
    assert not any("checkpoint-" in n for n in names)  # trainer state stays out of the download

    printed = "\n".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "stream")
    assert "Training config" in printed and "-> " in printed  # the config table and the sample predictions
