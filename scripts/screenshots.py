"""Regenerate the pictures in docs/images from the notebooks, in headless Chromium.

    python scripts/screenshots.py                    # every notebook with tagged cells
    python scripts/screenshots.py notebooks/06_compare.ipynb --out /tmp/shots

A code cell tagged ``screenshot:NAME`` (cell metadata ``tags``; `strip_notebooks.py` keeps them)
names a picture: the notebook is executed (nbclient, the python3 kernel, in a temporary folder, as
the tests run it), the cell's first figure (plotly) or HTML output is written as a standalone page
(plotly.js inlined: nothing is fetched), and Chromium, driven by Playwright, screenshots it to
``OUT/NAME.png``. Needs the ``browser`` extra and a Chromium (Debian's ``chromium``; or
``NBC_CHROMIUM``). The pictures are reproducible as far as the notebooks are seeded.

The widgets' pictures (``highlight-popup.png``, ``playground.png``) need JupyterLab and a click:
tests/test_browser.py takes them (``NBC_SCREENSHOTS``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLOTLY_MIME = "application/vnd.plotly.v1+json"
TAG = "screenshot:"
WIDTH, HEIGHT = 860, 460


def tagged_cells(notebook: Any) -> dict[str, int]:
    """{picture name: cell index} for the cells tagged ``screenshot:NAME``."""
    found = {}
    for index, cell in enumerate(notebook["cells"]):
        for tag in cell.get("metadata", {}).get("tags", []):
            if tag.startswith(TAG):
                found[tag[len(TAG) :]] = index
    return found


def page_for(output: Any) -> str | None:
    """A standalone HTML page showing one cell output (a plotly figure or HTML); None if neither."""
    data = output.get("data", {})
    if PLOTLY_MIME in data:
        import plotly.io as pio

        figure = pio.from_json(json.dumps(data[PLOTLY_MIME]))
        figure.update_layout(width=WIDTH, height=HEIGHT)
        html: str = pio.to_html(
            figure, full_html=True, include_plotlyjs=True, config={"staticPlot": True}
        )
        return html
    if "text/html" in data:
        body = "".join(data["text/html"])
        return (
            '<!DOCTYPE html><html><head><meta charset="utf-8"></head>'
            f'<body style="margin:0"><div id="shot" style="width:{WIDTH}px;padding:8px">'
            f"{body}</div></body></html>"
        )
    return None


def execute(path: Path, folder: Path) -> Any:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        os.environ.pop(name, None)
    NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(folder)}}
    ).execute()
    return notebook


def shoot(pages: dict[str, Path], out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": WIDTH + 40, "height": HEIGHT + 40})
        for name, html_path in pages.items():
            page.goto(html_path.as_uri())
            element = page.locator(".plotly-graph-div, #shot").first
            element.wait_for(state="visible", timeout=60_000)
            if page.locator(".plotly-graph-div").count():
                page.locator(".main-svg").first.wait_for(timeout=60_000)
            element.screenshot(path=str(out / f"{name}.png"))
            size = (out / f"{name}.png").stat().st_size
            print(f"wrote {out / f'{name}.png'} ({size:,} bytes)")
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    chromium = os.environ.get("NBC_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        print("no Chromium: apt-get install -y chromium, or set NBC_CHROMIUM", file=sys.stderr)
        return 2
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="nbc-shots-") as scratch:
        pages: dict[str, Path] = {}
        for path in paths:
            wanted = tagged_cells(json.loads(path.read_text(encoding="utf-8")))
            if not wanted:
                continue
            print(f"running {path.name} for {', '.join(sorted(wanted))}")
            notebook = execute(path, Path(scratch))
            for name, index in wanted.items():
                outputs = notebook.cells[index].outputs
                html = next((p for p in map(page_for, outputs) if p is not None), None)
                if html is None:
                    print(f"{path.name}: cell {index} ({name}) drew nothing", file=sys.stderr)
                    return 1
                pages[name] = Path(scratch) / f"{name}.html"
                pages[name].write_text(html, encoding="utf-8")
        shoot(pages, args.out, chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
