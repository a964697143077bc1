"""Chat sweeps through the Batch API (issue 17): ``/v1/chat/completions`` lines, written by
`Grid.to_batch_file`, sent by ``sweep(..., batch=True)`` and run by ``nbcompletions batch``, on
our server's real Batch surface (``/v1/files``, ``/v1/batches``), compared with a live chat sweep.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

import nbcompletions as nbc
from nbcompletions import Client, sweep
from nbcompletions._cli import main
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"
CHAT_GRID: dict[str, Any] = {
    "messages": {
        "greet": [{"role": "user", "content": "Good morrow, my lord."}],
        "news": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What news?"},
        ],
    },
    "temperature": 0,
    "max_completion_tokens": 5,
    "logprobs": True,
    "top_logprobs": 2,
    "seed": [1, 2],
}
# Response ids, timestamps and the cache flag differ between two runs of the same requests.
_RUN_COLUMNS = {"cached", "id", "created", "response_id", "latency", "status"}


def assert_same_frames(live: nbc.SweepResult, other: nbc.SweepResult) -> None:
    for name in ("choices", "tokens", "alternatives"):
        x, y = getattr(live, name), getattr(other, name)
        assert len(x) > 0
        assert set(x["api"]) == {"chat"}
        columns = [c for c in x.columns if c not in _RUN_COLUMNS]
        pd.testing.assert_frame_equal(x[columns], y[columns])


class Recording(httpx.AsyncBaseTransport):
    """The real in-process app, with a log of (method, path) of every request."""

    def __init__(self, app: Any) -> None:
        self.inner = StreamingASGITransport(app)
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[Any] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        if request.url.path == "/v1/batches" and request.method == "POST":
            self.bodies.append(json.loads(request.content))
        return await self.inner.handle_async_request(request)


@pytest.fixture(scope="module")
def live_chat(embedded_client: Client) -> nbc.SweepResult:
    return sweep(embedded_client, **CHAT_GRID, progress=False, probe=False)


def test_a_chat_batch_sweep_equals_the_live_chat_sweep(
    app: Any, embedded_engine: Any, live_chat: nbc.SweepResult
) -> None:
    transport = Recording(app)
    vocab = int(embedded_engine.vocab_size)
    with Client("http://embedded/v1", model=MODEL, transport=transport, vocab_size=vocab) as client:
        batched = sweep(client, **CHAT_GRID, batch=True, progress=False, probe=False)
    assert batched.n_failed == 0
    assert len(batched) == 4
    assert [body["endpoint"] for body in transport.bodies] == ["/v1/chat/completions"]
    # Nothing went to the live chat route: the batch runner answered every line.
    assert ("POST", "/v1/chat/completions") not in transport.calls
    assert_same_frames(live_chat, batched)
    assert batched.usage["total_tokens"] == live_chat.usage["total_tokens"]


def test_chat_grid_to_batch_file_runs_through_the_cli_and_loads_back(
    embedded_client: Client, live_chat: nbc.SweepResult, tmp_path: Path
) -> None:
    grid = nbc.expand_grid(embedded_client, **CHAT_GRID)
    [path] = grid.to_batch_file(tmp_path / "chat.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4
    assert {line["url"] for line in lines} == {"/v1/chat/completions"}
    assert lines[0]["custom_id"] == grid.points[0].key
    assert lines[0]["body"]["messages"] == CHAT_GRID["messages"]["greet"]
    assert lines[0]["body"]["max_completion_tokens"] == 5
    assert "prompt" not in lines[0]["body"]
    out = tmp_path / "results.jsonl"
    assert main(["batch", "-i", str(path), "-o", str(out), "--quiet"]) == 0
    assert not (tmp_path / "results-errors.jsonl").exists()
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert {a["response"]["body"]["object"] for a in answers} == {"chat.completion"}
    loaded = nbc.load_batch_output(grid, out, vocab_size=embedded_client.vocab_size)
    assert_same_frames(live_chat, loaded)


def test_a_batch_file_mixing_chat_and_completion_lines_is_refused_naming_the_line(
    tmp_path: Path, capsys: Any
) -> None:
    chat = {"messages": [{"role": "user", "content": "Hail"}], "model": MODEL, "max_tokens": 2}
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["batch", "-i", str(source), "-o", str(tmp_path / "o.jsonl"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "line 2" in err
    assert "/v1/chat/completions" in err
