"""`python -m pytest` names each skip cause once, with a count, instead of once per skipped test."""

from __future__ import annotations

import pytest
from conftest import skip_causes


def _skipped(nodeid: str, line: int, reason: str) -> pytest.TestReport:
    path = nodeid.split("::")[0]
    return pytest.TestReport(
        nodeid, (path, line, nodeid), {}, "skipped", (path, line, f"Skipped: {reason}"), "setup"
    )


def test_skips_are_grouped_by_cause_most_frequent_first() -> None:
    peer = "the llama.cpp peer needs llama-cpp-python[server] in its own venv"
    reports = [
        _skipped("tests/test_b.py::test_one", 10, "slow"),
        _skipped("tests/test_a.py::test_one", 3, peer),
        _skipped("tests/test_a.py::test_two", 9, peer),
        _skipped("tests/test_c.py::test_three", 4, peer),
    ]
    assert skip_causes(reports) == [
        (peer, 3, ["tests/test_a.py", "tests/test_c.py"]),
        ("slow", 1, ["tests/test_b.py"]),
    ]


def test_the_summary_replaces_the_per_test_lines(pytestconfig: pytest.Config) -> None:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    assert reporter is not None
    assert "s" not in reporter.reportchars
