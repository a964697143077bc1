"""Sweeps that stream their frames to disk (``results=dir``): the same frames as a sweep held in
memory, written as Parquet parts while it runs, read lazily, sliced with filters, and queryable
with DuckDB. Real server app, real client, real cache; faults through httpx.MockTransport."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pyarrow.dataset as ds
import pytest
from helpers import mock_client

from nbcompletions import Client, SweepWarning, load_sweep, sweep
from nbcompletions._errors import RequestError
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"
GRID: dict[str, Any] = {
    # "hamlet" and "again" are the same prompt: sent once, rows for both.
    "prompt": {"hamlet": "To be, or not", "king": "My lord,", "again": "To be, or not"},
    "temperature": [0.0, 1.0],
    "max_tokens": 4,
    "logprobs": 3,
    "seed": 7,
    "repeats": 3,
}


def _client(app: Any) -> Client:
    return Client(
        "http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app), max_retries=0
    )


def _same(streamed: pd.DataFrame, memory: pd.DataFrame) -> None:
    assert list(streamed.columns) == list(memory.columns)
    pd.testing.assert_frame_equal(
        streamed.reset_index(drop=True), memory.reset_index(drop=True), check_dtype=False
    )


@pytest.mark.slow
def test_streamed_frames_equal_the_in_memory_ones(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbcompletions.sweeps.dataset as results_module

    monkeypatch.setattr(results_module, "FLUSH_EVERY", 4)  # several parts from a small grid
    client = _client(app)
    memory = sweep(client, **GRID, progress=False, probe=False)
    study = tmp_path / "study"
    streamed = sweep(client, **GRID, progress=False, probe=False, results=study)
    client.close()
    assert streamed.dataset == study
    assert streamed._frames is None  # nothing read until asked
    assert repr(streamed) == repr(memory)  # counts come from usage: still nothing read
    assert streamed._requests is None
    parts = sorted((study / "tokens").glob("part-*.parquet"))
    assert len(parts) == 5  # 18 points (6 of them copies) in batches of 4 finished requests
    assert streamed.usage["sent"] == memory.usage["sent"] == 12
    assert streamed.usage["requests"] == 18
    varying = ["latency", "response_id"]  # differ between any two runs
    _same(streamed.requests.drop(columns=varying), memory.requests.drop(columns=varying))
    _same(streamed.choices, memory.choices)
    _same(streamed.tokens, memory.tokens)
    _same(streamed.alternatives, memory.alternatives)
    assert streamed.tokens.attrs["vocab_size"] == memory.tokens.attrs["vocab_size"]

    again = load_sweep(study)
    assert again.usage == json.loads(json.dumps(streamed.usage, default=str))
    _same(again.tokens, memory.tokens)
    hot = again.read(
        "tokens",
        columns=["prompt_id", "temperature", "logprob"],
        filter=ds.field("temperature") > 0,
    )
    expected = memory.tokens[memory.tokens["temperature"] > 0]
    assert list(hot.columns) == ["prompt_id", "temperature", "logprob"]
    # The engine batches differently run to run: float32 noise, hence the tolerance.
    pd.testing.assert_series_equal(
        hot["logprob"].reset_index(drop=True), expected["logprob"].reset_index(drop=True)
    )


def test_rerun_into_the_same_directory_is_free_and_identical(app: Any, tmp_path: Path) -> None:
    client = _client(app)
    cache, study = tmp_path / "c.sqlite", tmp_path / "study"
    first = sweep(client, **GRID, cache=cache, progress=False, probe=False, results=study)
    tokens = first.tokens.drop(columns="cached")
    second = sweep(client, **GRID, cache=cache, progress=False, probe=False, results=study)
    client.close()
    assert second.usage["sent"] == 0
    assert second.usage["cached_requests"] == 18
    assert second.requests["cached"].all()
    _same(second.tokens.drop(columns="cached"), tokens)


def test_failed_requests_stream_as_error_rows(app: Any, tmp_path: Path) -> None:
    real = StreamingASGITransport(app)

    async def faults(request: httpx.Request) -> httpx.Response:
        if request.content and json.loads(request.content).get("prompt") == "My lord,":
            return httpx.Response(500, json={"error": {"message": "fire", "type": "server_error"}})
        return await real.handle_async_request(request)

    client = mock_client(faults, base_url="http://embedded/v1", model=MODEL, max_retries=0)
    with pytest.warns(SweepWarning, match="6 of 18 sweep requests failed"):
        result = sweep(client, **GRID, progress=False, probe=False, results=tmp_path / "s")
    client.close()
    failed = result.requests[result.requests["prompt_id"] == "king"]
    assert (failed["status"] == "error").all()
    assert failed["error"].str.contains("fire").all()
    assert result.usage["failed_requests"] == 6
    assert set(result.tokens["prompt_id"]) == {"hamlet", "again"}


def test_duckdb_reads_the_same_study(app: Any, tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    client = _client(app)
    study = tmp_path / "study"
    result = sweep(client, **GRID, progress=False, probe=False, results=study)
    client.close()
    by_pandas = result.tokens.groupby(["prompt_id", "temperature"])["logprob"].mean().reset_index()
    by_duckdb = duckdb.sql(
        f"SELECT prompt_id, temperature, avg(logprob) AS logprob "
        f"FROM read_parquet('{study}/tokens/*.parquet') GROUP BY ALL ORDER BY ALL"
    ).df()
    pd.testing.assert_frame_equal(by_duckdb, by_pandas, check_dtype=False)


def test_results_must_be_a_directory(app: Any, tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    client = _client(app)
    with pytest.raises(RequestError, match="results must be a directory"):
        sweep(client, prompt="x", progress=False, probe=False, results=file)
    with pytest.raises(RequestError, match="results must be a directory"):
        sweep(client, prompt="x", progress=False, probe=False, results=3)  # type: ignore[arg-type]
    client.close()


# -- saving a streamed result ---------------------------------------------------------------------
def test_to_parquet_copies_a_streamed_result_row_group_by_row_group(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import nbcompletions.sweeps.dataset as results_module

    monkeypatch.setattr(results_module, "FLUSH_EVERY", 4)  # several parts from a small grid
    monkeypatch.setattr(results_module, "SAVE_BATCH_ROWS", 5)
    monkeypatch.setattr(results_module, "SAVE_ROW_GROUP_ROWS", 16)
    client = _client(app)
    memory = sweep(client, **GRID, progress=False, probe=False)
    streamed = sweep(client, **GRID, progress=False, probe=False, results=tmp_path / "study")
    client.close()

    def whole_frame(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("to_parquet read a whole frame into memory")

    monkeypatch.setattr(results_module, "read_frame", whole_frame)
    saved = streamed.to_parquet(tmp_path / "saved")
    assert streamed._frames is None  # still unread
    assert streamed._requests is None
    monkeypatch.undo()
    for name in ("tokens", "alternatives"):
        metadata = pq.ParquetFile(saved / f"{name}.parquet").metadata
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert len(groups) > 2, name  # written as the merge went, not at the end
        assert max(groups) < 16 + 5, name  # a group, and at most one slice of a part past it
        assert sum(groups) == len(getattr(memory, name)), name
    loaded = load_sweep(saved)
    varying = ["latency", "response_id"]
    _same(loaded.requests.drop(columns=varying), memory.requests.drop(columns=varying))
    _same(loaded.choices, memory.choices)
    _same(loaded.tokens, memory.tokens)
    _same(loaded.alternatives, memory.alternatives)


def _write_part(path: Path, ids: list[int], note: list[str | None]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(i, k) for i in ids for k in range(3)]  # three rows per request, in grid order
    table = pa.table(
        {
            "request_id": [i for i, _ in rows],
            "position": [k for _, k in rows],
            "note": [note[i % len(note)] for i, _ in rows],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.mark.parametrize(
    ("parts", "most_open"),
    [
        # Finished in grid order: one part open at a time.
        ([[0, 1, 2], [3, 4, 5], [6, 7, 8]], 1),
        # Interleaved: every part takes part in the merge at once.
        ([[0, 3, 6], [1, 4, 7], [2, 5, 8]], 3),
        # A straggler (request 0 finished last) keeps its part open; the others pass one by one.
        ([[1, 2, 3], [4, 5, 6], [7, 8], [0, 9]], 2),
    ],
)
def test_write_frame_file_merges_parts_into_grid_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: list[list[int]], most_open: int
) -> None:
    import pyarrow.parquet as pq

    import nbcompletions.sweeps.dataset as results_module

    notes: list[list[str | None]] = [[None], ["a", None, "b"]]  # the first part: an all-null column
    for n, ids in enumerate(parts):
        _write_part(tmp_path / "tokens" / f"part-{n:06d}.parquet", ids, notes[min(n, 1)])
    open_now, most = 0, 0

    class Counted(results_module._Part):
        def __init__(self, *args: Any) -> None:
            nonlocal open_now, most
            open_now += 1
            most = max(most, open_now)
            super().__init__(*args)

        def _next(self) -> None:
            nonlocal open_now
            super()._next()
            if self.batch is None:
                open_now -= 1

    monkeypatch.setattr(results_module, "_Part", Counted)
    target = tmp_path / "tokens.parquet"
    n_ids = sum(len(ids) for ids in parts)
    written = results_module.write_frame_file(
        tmp_path, "tokens", target, batch_rows=2, row_group_rows=4
    )
    assert written == 3 * n_ids
    assert most == most_open
    table = pq.read_table(target)
    assert table.column("request_id").to_pylist() == [i for i in range(n_ids) for _ in range(3)]
    assert table.column("position").to_pylist() == [0, 1, 2] * n_ids
    assert str(table.schema.field("note").type) == "string"
    assert pq.ParquetFile(target).metadata.num_row_groups > 1
    assert not list(tmp_path.glob("*.tmp"))


def test_half_an_emoji_from_a_server_streams_to_parquet_as_a_replacement_character(
    tmp_path: Path,
) -> None:
    """A server counting in UTF-16 escapes each half of a split emoji alone (``"\\ud83d"``). The
    stdlib reads that as a lone surrogate, which Parquet cannot encode: the sweep died at its
    first write, and again on every rerun. Lone halves now read as U+FFFD, pairs as the emoji."""
    body = json.dumps(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "text": "a\ud83d\ude00b\ud83d",
                    "index": 0,
                    "logprobs": {
                        "tokens": ["a", "\ud83d", "\ude00", "b"],
                        "token_logprobs": [-0.1, -0.2, -0.3, -0.4],
                        "top_logprobs": None,
                        "text_offset": [0, 1, 2, 3],
                    },
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
        }
    )  # ensure_ascii: every half is written as its own \u escape
    assert "\\ud83d\\ude00" in body
    client = mock_client(lambda request: httpx.Response(200, text=body), max_retries=0)
    result = sweep(client, prompt=["x", "y"], max_tokens=4, logprobs=1, results=tmp_path / "r")
    client.close()
    assert result.n_failed == 0
    on_disk = load_sweep(tmp_path / "r")
    assert on_disk.choices["text"].tolist() == ["a\U0001f600b\ufffd"] * 2
    assert on_disk.tokens["token"].tolist()[:4] == ["a", "\ufffd", "\ufffd", "b"]
