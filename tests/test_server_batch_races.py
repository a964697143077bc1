"""Races on the Batch API: cancel against finalize, download against delete."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from test_server_limits import MODEL, _line, upload, wait_terminal

from nbcompletions.server import StreamingASGITransport, create_app


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded"
    ) as http:
        yield http


async def _create(http: httpx.AsyncClient, file_id: str) -> str:
    created = await http.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    assert created.status_code == 200, created.text[:200]
    batch_id: str = created.json()["id"]
    return batch_id


async def test_a_cancel_while_finalizing_never_relabels_a_completed_batch(
    embedded_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(embedded_engine)
    store = app.state.nbcompletions_batches
    finalizing, release = threading.Event(), threading.Event()
    add_file = store.add_file

    def slow_add_file(*args: Any, **kwargs: Any) -> Any:
        if args[1] == "batch_output":  # the runner storing the output: the batch is finalizing
            finalizing.set()
            release.wait(30)
        return add_file(*args, **kwargs)

    monkeypatch.setattr(store, "add_file", slow_add_file)
    body = json.dumps({"model": MODEL, "prompt": "To be", "max_tokens": 2})
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded"
    ) as http:
        file_id = (await upload(http, _line("a", body))).json()["id"]
        batch_id = await _create(http, file_id)
        assert await asyncio.to_thread(finalizing.wait, 60)
        assert (await http.get(f"/v1/batches/{batch_id}")).json()["status"] == "finalizing"
        refused = await http.post(f"/v1/batches/{batch_id}/cancel")
        release.set()
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "batch_not_cancellable"
        card = await wait_terminal(http, batch_id)
        assert card["status"] == "completed"
        assert card["request_counts"]["completed"] == 1


@pytest.mark.slow
async def test_a_download_racing_a_delete_is_whole_or_a_404(client: httpx.AsyncClient) -> None:
    body = json.dumps({"model": MODEL, "prompt": "x" * 50_000, "max_tokens": 1})
    content = b"".join(_line(f"r{i}", body) for i in range(40))  # 2 MB
    outcomes: dict[int, int] = {}
    for attempt in range(64):
        file_id = (await upload(client, content)).json()["id"]
        download = asyncio.ensure_future(client.get(f"/v1/files/{file_id}/content"))
        await asyncio.sleep((attempt % 8) / 1000)  # the delete lands before, while, after
        deleted = await client.delete(f"/v1/files/{file_id}")
        assert deleted.status_code in (200, 404)
        response = await download
        outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
        assert response.status_code in (200, 404), response.text[:200]
        if response.status_code == 200:
            assert response.content == content
            assert int(response.headers["content-length"]) == len(content)
    assert outcomes.get(200, 0) > 0, outcomes
    assert outcomes.get(404, 0) > 0, outcomes
