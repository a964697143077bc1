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


def test_the_notebooks_are_there() -> None:
    assert [path.name for path in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_token_probabilities.ipynb",
        "03_temperature_sweep.ipynb",
        "04_penalty_sweep.ipynb",
        "05_playground.ipynb",
        "06_compare.ipynb",
        "07_calibration.ipynb",
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


def _execute(path: Path, folder: Path, extra_cells: tuple[str, ...] = ()) -> Any:
    """``path`` executed in a fresh kernel whose working folder is ``folder``; returns the notebook.

    ``extra_cells`` are appended first (code that checks the notebook's own variables)."""
    import nbformat
    from nbclient import NotebookClient

    folder.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.extend(nbformat.v4.new_code_cell(source) for source in extra_cells)
    # The kernel is this interpreter's python3 kernel (jupyter_client runs the native "python3"
    # kernelspec with sys.executable), so it sees the package under test. It runs in a temporary
    # folder, where the sweeps' cache files go.
    os.environ.pop("OPENAI_API_KEY", None)
    os.environ.pop("OPENAI_BASE_URL", None)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    return notebook


def _shown(notebook: Any) -> list[str]:
    """What a reader sees, less stderr (progress bars carry timings): text, tables and figures."""
    shown = []
    for output in _outputs(notebook):
        if output.get("name") == "stderr":
            continue
        data = output.get("data", {})
        figure = data.get(PLOTLY_MIME, {}).get("data")
        shown.append(output.get("text") or data.get("text/plain") or json.dumps(figure))
    return shown


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    notebook = _execute(path, tmp_path)
    outputs = _outputs(notebook)
    assert not [o for o in outputs if o.output_type == "error"]
    mimes = {mime for o in outputs for mime in o.get("data", {})}
    assert PLOTLY_MIME in mimes, f"{path.name} drew no plotly figure"
    if path.name == "05_playground.ipynb":
        assert WIDGET_MIME in mimes
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Traceback" not in stderr
    assert "Warning" not in stderr.replace("TqdmWarning", ""), stderr


@pytest.mark.slow
def test_penalty_notebook_is_seeded_and_shows_the_cut(tmp_path: Path) -> None:
    """Notebook 04 gives the same outputs twice, and every penalty's effect interval is above 0."""
    path = ROOT / "notebooks" / "04_penalty_sweep.ipynb"
    check = (
        "import json\n"
        "print(json.dumps({'baseline': float(unpenalised.mean()),"
        " 'lowest_ci_low': float(effects['ci_low'].min()), 'cells': len(effects)}))"
    )
    first = _execute(path, tmp_path / "first", (check,))
    second = _execute(path, tmp_path / "second", (check,))
    assert _shown(first) == _shown(second)
    figures = [o for o in _outputs(first) if PLOTLY_MIME in o.get("data", {})]
    assert figures, "notebook 04 drew no figure"
    facts = json.loads(_shown(first)[-1])
    # The model visibly repeats without penalties, and every penalty cuts it, interval above 0.
    assert facts["baseline"] > 0.1, facts
    assert facts["cells"] == 5, facts
    assert facts["lowest_ci_low"] > 0, facts


def test_screenshot_cells_are_tagged_and_drawn_as_pages() -> None:
    import screenshots

    tagged = {
        name: path.name
        for path in NOTEBOOKS
        for name in screenshots.tagged_cells(json.loads(path.read_text(encoding="utf-8")))
    }
    assert tagged == {
        "penalty-repetition": "04_penalty_sweep.ipynb",
        "compare": "06_compare.ipynb",
        "calibration": "07_calibration.ipynb",
    }
    for name in tagged:
        assert (ROOT / "docs" / "images" / f"{name}.png").is_file(), name
    figure = {"data": [{"type": "scatter", "x": [1], "y": [2]}], "layout": {}}
    page = screenshots.page_for({"data": {PLOTLY_MIME: figure}})
    assert page is not None
    assert "plotly-graph-div" in page
    assert "https://" not in page.split("<script", 1)[0]  # plotly.js inlined, nothing fetched
    html = screenshots.page_for({"data": {"text/html": "<span>To</span>"}})
    assert html is not None
    assert '<div id="shot"' in html
    assert screenshots.page_for({"text": "printed"}) is None
