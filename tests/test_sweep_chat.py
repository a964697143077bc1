"""Chat sweeps (issue 17): ``sweep(client, messages=[conversation, ...], ...)`` through the real
embedded server's ``/v1/chat/completions``, the real client and the real cache.

A greedy chat sweep is checked against the completions sweep of the same rendered prompts (the
model's chat template), so the chat path is held to the completion path's answers.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from nbcompletions import BudgetError, Client, RequestError, load_sweep, sweep
from nbcompletions._cache import Cache, cache_key
from nbcompletions._chat import ChatRequest
from nbcompletions._request import CompletionRequest
from nbcompletions.model import render_chat
from nbcompletions.server import StreamingASGITransport
from nbcompletions.sweeps.outcome import Outcome

MODEL = "nbc-shakespeare"

CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "greet": [{"role": "user", "content": "Good morrow, my lord."}],
    "news": [
        {"role": "system", "content": "You speak as a Shakespearean player."},
        {"role": "user", "content": "What news, good sir?"},
    ],
}

CHAT_GRID: dict[str, Any] = {
    "messages": CONVERSATIONS,
    "temperature": [0.0, 1.0],
    "max_completion_tokens": 4,
    "logprobs": True,
    "top_logprobs": 2,
    "seed": 7,
    "repeats": 2,
}


class Counting(httpx.AsyncBaseTransport):
    """The real in-process transport, counting the requests sent to each path."""

    def __init__(self, app: Any) -> None:
        self.inner = StreamingASGITransport(app)
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions"):
            self.paths.append(request.url.path)
        return await self.inner.handle_async_request(request)


def _client(app: Any) -> tuple[Client, Counting]:
    transport = Counting(app)
    return Client("http://embedded/v1", model=MODEL, transport=transport, max_retries=0), transport


def test_chat_sweep_frames_have_chat_columns_and_conversations(app: Any) -> None:
    client, transport = _client(app)
    with client:
        result = sweep(client, **CHAT_GRID, progress=False, probe=False)
    assert transport.paths == ["/v1/chat/completions"] * 8
    requests = result.requests
    assert requests["status"].tolist() == ["ok"] * 8
    assert requests["prompt_id"].tolist() == ["greet"] * 4 + ["news"] * 4
    assert "prompt" not in requests.columns
    # The conversation is canonical JSON text: one hashable value per conversation.
    assert json.loads(requests["messages"].iloc[-1]) == CONVERSATIONS["news"]
    assert requests.groupby("messages").size().tolist() == [4, 4]
    for frame in (result.choices, result.tokens, result.alternatives):
        for column in ("messages", "temperature", "role", "refusal", "api", "cached", "error"):
            assert column in frame.columns, column
        assert set(frame["api"]) == {"chat"}
        assert set(frame["role"]) == {"assistant"}
    assert (result.choices["n_tokens"] <= 4).all()
    assert (result.alternatives.groupby(["request_id", "position"]).size() == 2).all()
    assert result.usage["total_tokens"] == int(requests["total_tokens"].sum()) > 0
    assert result.usage["estimate"] >= result.usage["total_tokens"]
    # Greedy and seeded: both repeats of a temperature-0 point answer the same.
    greedy = result.choices[result.choices["temperature"] == 0.0]
    assert greedy.groupby("prompt_id")["text"].nunique().eq(1).all()


def test_a_greedy_chat_sweep_equals_the_completions_sweep_of_the_rendered_prompts(
    app: Any,
) -> None:
    client, _ = _client(app)
    fields: dict[str, Any] = {"temperature": 0.0, "seed": 3, "progress": False, "probe": False}
    with client:
        chat = sweep(
            client, messages=CONVERSATIONS, max_completion_tokens=5, logprobs=True, **fields
        )
        rendered = {name: render_chat(turns) for name, turns in CONVERSATIONS.items()}
        plain = sweep(client, prompt=rendered, max_tokens=5, logprobs=1, **fields)
    assert chat.choices["text"].tolist() == plain.choices["text"].tolist()
    assert chat.tokens["token"].tolist() == plain.tokens["token"].tolist()
    np.testing.assert_allclose(chat.tokens["logprob"], plain.tokens["logprob"], atol=1e-4)
    assert set(plain.choices.columns) - set(chat.choices.columns) == {"prompt", "max_tokens"}
    chat_only = {"messages", "max_completion_tokens", "role", "refusal", "api"}
    assert set(chat.choices.columns) - set(plain.choices.columns) == chat_only


def test_chat_sweep_is_validated_before_anything_is_sent(app: Any) -> None:
    client, transport = _client(app)
    turn = [{"role": "user", "content": "Hail"}]
    with client:
        with pytest.raises(RequestError, match="prompt= and messages= are exclusive") as both:
            sweep(client, prompt="Hail", messages=[turn], progress=False)
        assert both.value.param == "messages"
        bad = [turn, [{"role": "king", "content": "Kneel"}]]
        with pytest.raises(RequestError, match=r"messages_id=1") as wrong:
            sweep(client, messages=bad, max_completion_tokens=2, progress=False)
        assert wrong.value.param == "messages"
        assert "king" in str(wrong.value)
        with pytest.raises(RequestError, match="top_logprobs needs logprobs=True"):
            sweep(client, messages=turn, top_logprobs=[1, 3], progress=False)
        with pytest.raises(RequestError, match="not a Chat Completions request field") as field:
            sweep(client, messages=turn, echo=True, progress=False)
        assert field.value.param == "echo"
        with pytest.raises(RequestError, match="budget= needs max_completion_tokens") as budget:
            sweep(client, messages=turn, budget=1000, progress=False)
        assert budget.value.param == "max_completion_tokens"
        with pytest.raises(RequestError, match="a list of conversations"):
            sweep(client, messages=turn[0], progress=False)
        with pytest.raises(BudgetError):
            sweep(client, messages=turn, max_completion_tokens=50, budget=10, progress=False)
    assert transport.paths == []


def test_chat_and_completion_requests_never_share_a_cache_key() -> None:
    turn = [{"role": "user", "content": "Hail"}]
    chat = ChatRequest(messages=turn, max_tokens=2)
    completion = CompletionRequest(prompt="Hail", max_tokens=2)
    endpoint = "http://embedded/v1"
    # A completion's key is the hash it always was (no api field), a chat key names its API.
    payload = {"body": {**completion.to_body(), "model": MODEL}, "endpoint": endpoint, "repeat": 0}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    import hashlib

    assert cache_key(endpoint, MODEL, completion, 0) == hashlib.sha256(text.encode()).hexdigest()
    # The same body sent to the other API is another request.
    body = chat.to_body()
    assert cache_key(endpoint, MODEL, chat, 0) != cache_key(endpoint, MODEL, body, 0)


def test_chat_sweep_resumes_from_the_cache_and_round_trips_parquet(
    app: Any, tmp_path: Path
) -> None:
    client, transport = _client(app)
    cache_path, study = tmp_path / "chat.sqlite", tmp_path / "study"
    with client:
        first = sweep(client, **CHAT_GRID, cache=cache_path, progress=False, probe=False)
        assert len(transport.paths) == 8
        again = sweep(
            client,
            **CHAT_GRID,
            cache=cache_path,
            results=study,
            budget=0,
            progress=False,
            probe=False,
        )
        # The same prompts as completions are other requests: nothing is read for them.
        rendered = {name: render_chat(turns) for name, turns in CONVERSATIONS.items()}
        plain = sweep(
            client, prompt=rendered, max_tokens=4, cache=cache_path, progress=False, probe=False
        )
    assert len(transport.paths) == 8 + 2
    assert not plain.requests["cached"].any()
    with Cache(cache_path) as cache:
        assert len(cache) == 10
    assert again.usage["sent"] == 0
    assert again.requests["status"].tolist() == ["cached"] * 8
    pd.testing.assert_frame_equal(
        first.tokens.drop(columns="cached"), again.tokens.drop(columns="cached")
    )
    loaded = load_sweep(study)
    for name in ("choices", "tokens", "alternatives"):
        pd.testing.assert_frame_equal(getattr(again, name), getattr(loaded, name))
    assert set(loaded.tokens["api"]) == {"chat"}


def test_chat_sweep_shards_cover_the_grid_once(app: Any, tmp_path: Path) -> None:
    client, transport = _client(app)
    grid = {**CHAT_GRID, "progress": False, "probe": False}
    with client:
        whole = sweep(client, **grid)
        parts = [sweep(client, **grid, shard=(i, 2), results=tmp_path / f"s{i}") for i in (0, 1)]
    assert sum(len(part.requests) for part in parts) == 8
    merged = load_sweep([tmp_path / "s0", tmp_path / "s1"])
    assert sorted(merged.requests["cache_key"]) == sorted(whole.requests["cache_key"])
    assert len(transport.paths) == 16


async def test_asweep_sends_a_chat_grid_and_probing_does_not_refuse_it(app: Any) -> None:
    from nbcompletions import AsyncClient, asweep

    transport = Counting(app)
    async with AsyncClient("http://embedded/v1", model=MODEL, transport=transport) as aclient:
        # probe=True measures /v1/completions; its report does not judge a chat grid.
        result = await asweep(
            aclient,
            messages=list(CONVERSATIONS.values()),
            n=[1, 2],
            max_completion_tokens=2,
            progress=False,
        )
    assert result.capabilities
    assert transport.paths.count("/v1/chat/completions") == 4
    assert result.requests["prompt_id"].tolist() == [0, 0, 1, 1]
    assert result.choices.groupby("request_id").size().tolist() == [1, 2, 1, 2]
    assert set(result.choices["api"]) == {"chat"}


def _tracked(root: object) -> int:
    """How many objects the garbage collector tracks among those ``root``'s fields reach (the
    classes and modules they lead to left out)."""
    seen: set[int] = set()
    todo = list(vars(root).values())
    while todo:
        each = todo.pop()
        if id(each) in seen or not gc.is_tracked(each) or isinstance(each, type):
            continue
        seen.add(id(each))
        todo.extend(gc.get_referents(each))
    return len(seen)


def test_a_kept_chat_answer_is_its_bytes_and_reads_as_the_parsed_answer(app: Any) -> None:
    # A sweep keeps every answer until its frames are built; a parsed chat answer with logprobs
    # holds ~100 tracked objects, which every full garbage collection walks (issue 17's sweep).
    client, _ = _client(app)
    with client:
        answer = client.chat(
            CONVERSATIONS["news"], max_completion_tokens=8, logprobs=True, top_logprobs=5, seed=1
        )
    body = answer._body
    assert body is not None
    kept = Outcome.received(answer.raw, 0.5, body)
    assert kept.raw == answer.raw
    assert kept.usage == Outcome(response=answer.raw).usage
    assert kept.usage["total_tokens"] == answer.raw["usage"]["total_tokens"] > 0
    assert kept.response_id == answer.raw["id"] is not None
    assert kept.copy().raw == answer.raw
    assert _tracked(kept) < 10 < 50 < _tracked(Outcome(response=answer.raw))
    # A client that keeps no body: the parsed answer is kept.
    assert Outcome.received(answer.raw, 0.5, None).response is answer.raw
