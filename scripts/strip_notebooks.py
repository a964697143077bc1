"""Strip outputs from the notebooks before they are committed.

``python scripts/strip_notebooks.py [PATHS...]`` clears every code cell's outputs and execution
count, and drops saved widget state and other per-run metadata, so the saved notebooks stay small
and diff cleanly (CI executes them anyway). ``--check`` changes nothing and exits 1 if any
notebook would change. With no paths it strips ``notebooks/*.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Notebook-level metadata worth keeping; everything else (widget state, execution timings, the
# editor's own keys) is per-run noise.
KEEP_METADATA = ("kernelspec", "language_info")
KEEP_CELL_METADATA = ("tags",)


def strip(notebook: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``notebook`` (nbformat 4 JSON) without outputs or per-run metadata."""
    out = dict(notebook)
    out["metadata"] = {k: v for k, v in notebook.get("metadata", {}).items() if k in KEEP_METADATA}
    if "language_info" in out["metadata"]:
        # Only the language name is stable; the version differs between machines.
        out["metadata"]["language_info"] = {
            "name": out["metadata"]["language_info"].get("name", "python")
        }
    cells = []
    for cell in notebook.get("cells", []):
        cell = dict(cell)
        cell["metadata"] = {
            k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_METADATA
        }
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cells.append(cell)
    out["cells"] = cells
    return out


def dumps(notebook: dict[str, Any]) -> str:
    # The layout Jupyter itself writes (indent 1, sorted keys, trailing newline).
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 if a notebook has outputs or run metadata",
    )
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        stripped = dumps(strip(json.loads(text)))
        if stripped != text:
            dirty.append(path)
            if not args.check:
                path.write_text(stripped, encoding="utf-8")
    for path in dirty:
        print(f"{'would strip' if args.check else 'stripped'} {path}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
