"""The notebooks run top to bottom on CPU, so they cannot rot: any cell error fails the test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "peft-ladder-tests"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this very interpreter (a machine-wide `python3` spec may point at another one)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "peft-ladder tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_both_notebooks_are_committed_with_outputs_stripped():
    names = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["memory.ipynb", "quickstart.ipynb"]
    for name in names:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code, name
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{name} has outputs"


def run(name: str, kernel_name: str, tmp_path: Path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name=kernel_name, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def outputs(notebook, kind: str) -> list:
    return [
        out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == kind
    ]


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(kernel_name, tmp_path):
    notebook = run("quickstart.ipynb", kernel_name, tmp_path)
    text = "".join(out.text for out in outputs(notebook, "stream"))
    assert text.count("trainable params:") == 2  # Ladder and LoRA
    assert "reloaded adapter gives identical logits" in text
    assert "generated:" in text


@pytest.mark.slow
def test_memory_notebook_runs_and_draws_the_plot(kernel_name, tmp_path):
    notebook = run("memory.ipynb", kernel_name, tmp_path)
    images = [out for out in outputs(notebook, "display_data") if "image/png" in out.data]
    assert len(images) == 1
