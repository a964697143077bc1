"""The README's table of what each real server does is the recorded reports, not a copy of them.

scripts/servers_table.py measures ``conformance()`` against each server serving our model, records
the reports in tests/fixtures/servers/ and renders the README's table from them; here the README's
table is rendered again from the recordings alone (no server) and must be the same.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from nbcompletions import ConformanceReport

ROOT = Path(__file__).resolve().parent.parent


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "servers_table", ROOT / "scripts" / "servers_table.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


servers_table = load_script()


def test_every_server_is_recorded_and_reads_back_as_a_report() -> None:
    reports = servers_table.load_reports()
    assert sorted(reports) == sorted(s.name for s in servers_table.SERVERS)
    for name, data in reports.items():
        report = ConformanceReport.from_dict(data)
        assert report is not None, name
        assert report.requests > 0, name
        assert report.checks, name


def test_readme_table_is_rendered_from_the_recorded_reports() -> None:
    readme = (ROOT / "README.md").read_text()
    expected = servers_table.render_table(servers_table.load_reports())
    assert servers_table.table_in_readme(readme) == expected, (
        "README.md's servers table differs from tests/fixtures/servers/: "
        "run `python scripts/servers_table.py --render`"
    )


def report(profile: str, **statuses: str) -> dict[str, Any]:
    checks = {name: {"status": s, "detail": "", "evidence": {}} for name, s in statuses.items()}
    return {
        "profile": profile,
        "context_length": 256,
        "vocab_size": None,
        "requests": 3,
        "seconds": 0.5,
        "checks": checks,
    }


def test_render_marks_failures_and_checks_a_server_did_not_measure() -> None:
    table = servers_table.render_table(
        {"vllm": report("vllm", n="ok", seed="fails"), "nbcompletions": report("x", n="ok")}
    ).splitlines()
    assert table[0] == "| check | nbcompletions serve | vLLM 0.32.0 (CPU) |"
    assert "| `seed` | not measured | **fails** |" in table
    assert "| requests, seconds | 3, 0.50 s | 3, 0.50 s |" in table
    assert "| context length / vocabulary | 256 / - | 256 / - |" in table


def test_replace_table_keeps_the_rest_and_needs_both_markers(tmp_path: Path) -> None:
    text = f"before\n{servers_table.BEGIN}\nold\n{servers_table.END}\nafter\n"
    replaced = servers_table.replace_table(text, "| new |")
    assert replaced == f"before\n{servers_table.BEGIN}\n| new |\n{servers_table.END}\nafter\n"
    assert servers_table.table_in_readme(replaced) == "| new |"
    with pytest.raises(ValueError, match="servers-table:end"):
        servers_table.replace_table("no markers", "| new |")


def test_recordings_hold_no_port_or_address() -> None:
    for path in sorted((ROOT / "tests" / "fixtures" / "servers").glob("*.json")):
        assert json.loads(path.read_text())["endpoint"] is None, path.name
