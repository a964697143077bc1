"""The README's Python examples run, in order, in one namespace, against the embedded model.

A block whose first line starts with ``# needs`` depends on something outside the test (a running
server) and is only compiled.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, needs_weights

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_examples() -> None:
    assert len(_blocks()) >= 4


def _quick_start() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Quick start", 1)[1]
    return str(BLOCK.findall(section)[0])


@pytest.mark.slow
def test_readme_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    needs_weights()
    monkeypatch.chdir(tmp_path)  # the sweep example writes its cache file here
    namespace: dict[str, object] = {"__name__": "readme"}
    for number, code in enumerate(_blocks()):
        compiled = compile(code, f"README.md python block {number}", "exec")
        if code.startswith("# needs"):
            continue
        exec(compiled, namespace)
        if code == _quick_start():
            _check_quick_start_as_a_script(capsys.readouterr().out, tmp_path)
    import nbcompletions

    done = namespace["done"]
    assert isinstance(done, nbcompletions.Completion)
    assert len(done.tokens) == 24
    report = namespace["report"]
    assert isinstance(report, nbcompletions.ConformanceReport)
    assert report.ok
    assert report.profile.name == "nbcompletions"
    result = namespace["result"]
    assert isinstance(result, nbcompletions.SweepResult)
    assert result.requests["error"].isna().all()
    assert (tmp_path / "study.sqlite").exists()


def test_readme_pictures_exist_and_are_small() -> None:
    """The README shows pictures made by tests/test_browser.py (NBC_SCREENSHOTS), kept small."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    pictures = re.findall(r"!\[[^\]]+\]\((docs/[^)]+)\)", text)
    assert pictures, "the README shows what the instrument draws"
    # The first picture is on the first screen: within the first 20 lines.
    assert pictures[0] in "\n".join(text.splitlines()[:20])
    for picture in pictures:
        path = ROOT / picture
        assert path.is_file(), picture
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
        assert path.stat().st_size < 100_000, (picture, path.stat().st_size)


def _check_quick_start_as_a_script(printed: str, folder: Path) -> None:
    """Run as a script, the Quick start shows both frames and writes the figure and the text."""
    lines = printed.splitlines()
    # The frames' tables, each with its header row and five rows.
    headers = [line for line in lines if "token" in line and "logprob" in line]
    assert len(headers) == 2, printed
    assert "entropy_low" in headers[0], printed
    assert "chosen" in headers[1], printed
    assert "wrote token_probabilities.html and highlight.html" in printed
    assert "plotly" in (folder / "token_probabilities.html").read_text(encoding="utf-8")
    assert "<span" in (folder / "highlight.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_quick_start_pasted_in_a_cell_shows_everything(tmp_path: Path) -> None:
    """Pasted into one notebook cell, the frames, the figure and the coloured text all show."""
    needs_weights()
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_code_cell(_quick_start()))
    NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = notebook.cells[0].outputs
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert sum("<table" in h for h in html) == 2  # both frames, as tables
    assert any("<span" in h and "<table" not in h for h in html)  # the highlighted text
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)


_WITHOUT_WIDGETS = """
import sys
sys.modules["ipywidgets"] = None  # as in `pip install .`: the widgets extra brings these
sys.modules["IPython"] = None
namespace = {"__name__": "quickstart"}
exec(sys.stdin.read(), namespace)
assert len(namespace["done"].tokens) == 24
try:
    import nbcompletions.widgets
except ImportError as error:
    print("widgets:", error)
"""


@pytest.mark.slow
def test_quick_start_runs_without_the_widgets_extra(tmp_path: Path) -> None:
    """`pip install .` has no ipywidgets and no IPython: the Quick start still prints the text,
    the frames and writes both pages, and the widgets say which extra they need."""
    import subprocess
    import sys

    needs_weights()
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_WIDGETS],
        input=_quick_start(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _check_quick_start_as_a_script(done.stdout, tmp_path)
    assert "widgets: nbcompletions.widgets needs ipywidgets" in done.stdout
    assert "pip install 'nbcompletions[widgets]'" in done.stdout
