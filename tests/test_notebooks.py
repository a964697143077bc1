"""The notebooks in notebooks/ are executed here, so none can rot, and checked to be saved small."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_OUTPUT_BYTES = 50_000
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# Per cell; the sweeps are the slow cells (seconds on a laptop, more on a loaded CI machine).
CELL_TIMEOUT_S = 600

sys.path.insert(0, str(ROOT / "scripts"))
import strip_notebooks  # noqa: E402 - a script, importable once scripts/ is on the path


def test_the_five_notebooks_are_there() -> None:
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_token_probabilities.ipynb",
        "03_temperature_sweep.ipynb",
        "04_penalty_sweep.ipynb",
        "05_playground.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_notebook_is_small(path: Path) -> None:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    # Saved widget state would replay stale widgets (and can be megabytes).
    assert "widgets" not in notebook["metadata"]
    for number, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            size = len(json.dumps(output))
            assert size <= MAX_OUTPUT_BYTES, (
                f"{path.name} cell {number} has a {size:,}-byte output; run "
                "`python scripts/strip_notebooks.py` before committing"
            )


def test_strip_removes_outputs_and_run_metadata() -> None:
    notebook: dict[str, Any] = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3"},
            "widgets": {"state": {}},
            "language_info": {"name": "python", "version": "3.11.9"},
        },
        "cells": [
            {
                "cell_type": "code",
                "id": "a",
                "execution_count": 3,
                "source": "1 + 1",
                "metadata": {"tags": ["keep"], "execution": {"iopub.status.idle": "2026"}},
                "outputs": [
                    {
                        "output_type": "execute_result",
                        "data": {"text/plain": "2"},
                        "metadata": {},
                        "execution_count": 3,
                    }
                ],
            },
            {"cell_type": "markdown", "id": "b", "source": "# title", "metadata": {}},
        ],
    }
    stripped = strip_notebooks.strip(notebook)
    assert stripped["metadata"] == {
        "kernelspec": {"name": "python3"},
        "language_info": {"name": "python"},
    }
    code = stripped["cells"][0]
    assert (code["outputs"], code["execution_count"], code["metadata"]) == (
        [],
        None,
        {"tags": ["keep"]},
    )
    assert stripped["cells"][1] == notebook["cells"][1]
    assert notebook["cells"][0]["outputs"]  # the input is not mutated
    assert strip_notebooks.strip(stripped) == stripped


def test_committed_notebooks_are_stripped() -> None:
    assert strip_notebooks.main(["--check", *map(str, NOTEBOOKS)]) == 0


def _outputs(notebook: Any) -> list[Any]:
    return [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # The kernel is this interpreter's python3 kernel (jupyter_client runs the native "python3"
    # kernelspec with sys.executable), so it sees the package under test. It runs in a temporary
    # folder, where the sweeps' cache files go.
    os.environ.pop("OPENAI_API_KEY", None)
    os.environ.pop("OPENAI_BASE_URL", None)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.output_type == "error"]
    mimes = {mime for o in outputs for mime in o.get("data", {})}
    assert PLOTLY_MIME in mimes, f"{path.name} drew no plotly figure"
    if path.name == "05_playground.ipynb":
        assert WIDGET_MIME in mimes
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Traceback" not in stderr
    assert "Warning" not in stderr.replace("TqdmWarning", ""), stderr
