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


def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs_weights()
    monkeypatch.chdir(tmp_path)  # the sweep example writes its cache file here
    namespace: dict[str, object] = {"__name__": "readme"}
    for number, code in enumerate(_blocks()):
        compiled = compile(code, f"README.md python block {number}", "exec")
        if code.startswith("# needs"):
            continue
        exec(compiled, namespace)
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
