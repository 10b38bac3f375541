"""notebooks/quickstart.ipynb runs top to bottom (through a real Jupyter kernel, as nbclient executes it),
so the walkthrough never rots: every cell succeeds and the report it builds is there."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    audio = [o for o in outputs if "<audio" in o.get("data", {}).get("text/html", "")]
    assert len(images) >= 2 and len(audio) >= 2  # the corpus waveform and loss curves; corpus and generated audio
    report = json.loads((tmp_path / "notebook-run" / "report" / "report.json").read_text())
    assert {row["suite"] for row in report["numbers"]} == {"wer", "mos", "sim"}
