"""Measure ``conformance()`` against the real servers and our own; write the README's table from it.

Usage (from the repository root, in the dev venv):
    python scripts/servers_table.py              # start each server, measure, record, write README
    python scripts/servers_table.py --only vllm  # measure again only these (the others as recorded)
    python scripts/servers_table.py --render     # rewrite the README's table from the recordings

Each server serves our embedded model, started as the tests start it (tests/peers/): our own
``nbcompletions serve``, vLLM's CPU build (``NBC_VLLM_PYTHON`` or the peer cache), llama-cpp-python
(``NBC_LLAMACPP_PYTHON``) and ggml's llama-server (``NBC_LLAMASERVER_BIN`` or the peer cache; its
GGUF is converted with the llama-cpp-python venv). Each report is written to
tests/fixtures/servers/<name>.json (``ConformanceReport.to_dict``); the README's "Servers differ"
table between the markers below is rendered from those files alone, and
tests/test_servers_table.py checks that it still is, so the table cannot drift from the reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIXTURES = ROOT / "tests" / "fixtures" / "servers"
BEGIN = "<!-- servers-table:begin (scripts/servers_table.py writes this table) -->"
END = "<!-- servers-table:end -->"
#: How each status reads in the table.
MARKS = {"ok": "ok", "fails": "**fails**", "unsupported": "unsupported", "error": "error"}


class Server(NamedTuple):
    """One column of the table: the recording's file stem and the column's heading."""

    name: str
    heading: str


SERVERS = (
    Server("nbcompletions", "nbcompletions serve"),
    Server("vllm", "vLLM 0.32.0 (CPU)"),
    Server("llama-cpp-python", "llama-cpp-python 0.3.36"),
    Server("llama-server", "llama-server (llama.cpp of 0.3.36)"),
)


def load_reports(fixtures: Path = FIXTURES) -> dict[str, dict[str, Any]]:
    """The recorded reports (``to_dict`` form) by server name; a server not recorded is absent."""
    reports = {}
    for server in SERVERS:
        path = fixtures / f"{server.name}.json"
        if path.exists():
            reports[server.name] = json.loads(path.read_text())
    return reports


def render_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table: one row per check (in the order the reports list them), one column per
    server; then the detected profile, the model card's figures, and what the check cost."""
    servers = [s for s in SERVERS if s.name in reports]
    checks: list[str] = []
    for server in servers:
        checks += [c for c in reports[server.name]["checks"] if c not in checks]

    def row(label: str, cell: Callable[[Mapping[str, Any]], str]) -> str:
        return "| " + " | ".join([label, *(cell(reports[s.name]) for s in servers)]) + " |"

    def status(check: str) -> Callable[[Mapping[str, Any]], str]:
        def cell(report: Mapping[str, Any]) -> str:
            item = report["checks"].get(check)
            return "not measured" if item is None else MARKS[item["status"]]

        return cell

    lines = [
        "| check | " + " | ".join(s.heading for s in servers) + " |",
        "|---" * (len(servers) + 1) + "|",
        *(row(f"`{check}`", status(check)) for check in checks),
        row("profile detected", lambda r: f"`{r['profile']}`"),
        row(
            "context length / vocabulary",
            lambda r: f"{known(r['context_length'])} / {known(r['vocab_size'])}",
        ),
        row("requests, seconds", lambda r: f"{r['requests']}, {r['seconds']:.2f} s"),
    ]
    return "\n".join(lines)


def known(value: object) -> str:
    """A figure the server gave, or a dash when it gave none."""
    return "-" if value is None else str(value)


def replace_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the markers {BEGIN!r} and {END!r}, in that order")
    return readme[: start + len(BEGIN)] + "\n" + table + "\n" + readme[end:]


def table_in_readme(readme: str) -> str:
    """The table the README holds between the markers."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the markers {BEGIN!r} and {END!r}, in that order")
    return readme[start + len(BEGIN) : end].strip("\n")


# --- measuring: each server started as the tests start it -----------------------------------


@contextmanager
def running(name: str, work: Path) -> Iterator[str]:
    """Start the server ``name`` serving the embedded model; yield its base URL (…/v1)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import free_port
    from peers import launch, llamacpp, llamaserver, vllm

    log = work / f"{name}.log"
    if name == "nbcompletions":
        port = free_port()
        argv = [sys.executable, "-m", "nbcompletions", "serve", "--port", str(port)]
        argv += ["--host", "127.0.0.1"]
        proc = launch.launch(
            argv,
            name=name,
            log_path=log,
            ready_url=f"http://127.0.0.1:{port}/health",
            timeout_s=120,
        )
        base = f"http://127.0.0.1:{port}/v1"
    elif name == "vllm":
        proc, base = vllm.start_server(need(vllm.peer_python(), vllm.HOW_TO_GET), log)
    else:
        python = need(llamacpp.peer_python(), llamacpp.HOW_TO_GET)
        gguf = llamacpp.convert_model(python, work / "nbc-shakespeare.gguf")
        if name == "llama-server":
            binary = need(llamaserver.server_binary(), llamaserver.HOW_TO_GET)
            proc, base = llamaserver.start_server(binary, gguf, log)
        else:
            proc, base = llamacpp.start_server(python, gguf, log)
    try:
        yield base
    finally:
        launch.stop(proc)


def need(path: Path | None, how_to_get: str) -> Path:
    if path is None or not path.exists():
        raise SystemExit(f"servers_table: missing {how_to_get}")
    return path


def measure(name: str, work: Path) -> dict[str, Any]:
    from nbcompletions import Client

    with (
        running(name, work) as base,
        Client(base, model="nbc-shakespeare", max_retries=0) as client,
    ):
        report = client.conformance(refresh=True)  # measured now, never a report kept on disk
    print(
        f"{name}: {report.requests} requests, {report.seconds:.2f} s, profile {report.profile_name}"
    )
    found: dict[str, Any] = report.to_dict()
    # The port changes with every run; the table needs none of it.
    found["endpoint"] = None
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [s.name for s in SERVERS]
    parser.add_argument("--only", nargs="+", choices=names, help="measure only these servers")
    parser.add_argument("--render", action="store_true", help="only rewrite the README's table")
    args = parser.parse_args(argv)
    if not args.render:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="servers-table-") as tmp:
            for name in args.only or names:
                report = measure(name, Path(tmp))
                path = FIXTURES / f"{name}.json"
                path.write_text(json.dumps(report, indent=1) + "\n")
    README.write_text(replace_table(README.read_text(), render_table(load_reports())))
    print(f"wrote the table in {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
