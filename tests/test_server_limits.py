"""Limits that hold on every route, live and batch: numbers at the edges of float64, list paging,
malformed batch lines, and batches that always reach a terminal state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from nbcompletions.server import StreamingASGITransport, create_app

MODEL = "nbc-shakespeare"
TERMINAL = ("completed", "failed", "expired", "cancelled")

#: Raw JSON numbers at the edges: subnormal, tiny, the smallest normal, huge, overflowing to
#: infinity when parsed, NaN (not JSON), negative zero, and an integer with 400 digits.
EDGE_NUMBERS = (
    "5e-324",
    "1e-320",
    "2.2e-308",
    "1e-300",
    "1e-101",
    "-1e-320",
    "-0.0",
    "0.0",
    "1e308",
    "-1e308",
    "1e999",
    "-1e999",
    "NaN",
    "1" + "0" * 400,
)
#: Every numeric field of a completion request, and the vLLM sampling fields.
NUMERIC_FIELDS = (
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "max_tokens",
    "n",
    "best_of",
    "logprobs",
    "seed",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
)


@pytest.fixture(scope="module")
def vllm_app(embedded_engine: Any) -> Any:
    return create_app(embedded_engine, compat="vllm")


@pytest.fixture
async def client(vllm_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = StreamingASGITransport(vllm_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as http:
        yield http


def _body_text(field: str, number: str) -> str:
    """A request whose ``field`` holds the raw JSON ``number`` (logit_bias: as a bias value)."""
    value = '{"11": ' + number + "}" if field == "logit_bias" else number
    base = {"model": MODEL, "prompt": "To be, or not", "max_tokens": 4, "seed": 7}
    if field not in ("logprobs",):
        base["logprobs"] = 1
    base.pop(field, None)
    return json.dumps(base)[:-1] + f', "{field}": {value}' + "}"


async def _post(http: httpx.AsyncClient, text: str) -> httpx.Response:
    return await http.post(
        "/v1/completions", content=text, headers={"content-type": "application/json"}
    )


def _neutral(field: str, number: str) -> dict[str, Any] | None:
    """The request a value is indistinguishable from (tiny penalties are 0, a tiny temperature or
    top_p is greedy), to compare answers with; None where there is none."""
    value = float(number) if number != "NaN" else float("nan")
    if not abs(value) < 1e-100:
        return None
    neutral = {
        "temperature": {"temperature": 0},
        "top_p": {"temperature": 0},
        "frequency_penalty": {},
        "presence_penalty": {},
        "min_p": {},
    }
    return neutral.get(field)


@pytest.mark.slow
async def test_edge_numbers_in_every_numeric_field_answer_400_or_a_sane_200(
    client: httpx.AsyncClient, embedded_engine: Any
) -> None:
    last_token = embedded_engine.token_str(embedded_engine.vocab_size - 1)
    outcomes: dict[int, int] = {}
    for field in NUMERIC_FIELDS:
        for number in EDGE_NUMBERS:
            text = _body_text(field, number)
            response = await _post(client, text)
            outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
            where = f"{field}={number[:20]}"
            assert response.status_code in (200, 400), (where, response.text[:300])
            body = response.json()
            if response.status_code == 400:
                if number == "NaN":  # not JSON: the body is refused as a whole
                    assert "NaN" in body["error"]["message"], where
                    continue
                assert body["error"]["param"] in (field, f"{field}.11", "logit_bias"), where
                message = body["error"]["message"]
                # OpenAI's own wording for a completion too long for the context names no field
                # in its text (param does).
                assert field in message or "maximum context length" in message, where
                continue
            tokens = body["choices"][0]["logprobs"]["tokens"]
            # The overflow answered the vocabulary's last token ("bunes") again and again.
            assert tokens, where
            assert not all(t == last_token for t in tokens), (where, tokens)
            neutral = _neutral(field, number)
            if neutral is not None:
                request = json.loads(text)
                request.pop(field)
                request.update(neutral)
                expected = (await _post(client, json.dumps(request))).json()
                assert body["choices"][0]["text"] == expected["choices"][0]["text"], where
    assert outcomes.get(200, 0) > 0, outcomes
    assert outcomes.get(400, 0) > 0, outcomes


async def test_a_tiny_temperature_is_greedy(client: httpx.AsyncClient) -> None:
    greedy = await _post(client, _body_text("temperature", "0"))
    for number in ("5e-324", "2.2e-308", "1e-200"):
        tiny = await _post(client, _body_text("temperature", number))
        assert tiny.status_code == 200
        assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


# -- batches --------------------------------------------------------------------------------------
def _line(custom_id: str, body_text: str) -> bytes:
    """One batch line whose body is raw JSON text (numbers JSON cannot say stay as written)."""
    head = json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions"})
    return (head[:-1] + f', "body": {body_text}' + "}\n").encode()


async def upload(http: httpx.AsyncClient, content: bytes) -> httpx.Response:
    return await http.post(
        "/v1/files",
        files={"file": ("requests.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
    )


async def run_batch(
    http: httpx.AsyncClient, content: bytes, *, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Upload, create, wait for a terminal state; the batch card with its output and error lines."""
    uploaded = await upload(http, content)
    assert uploaded.status_code == 200, uploaded.text[:300]
    created = await http.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    assert created.status_code == 200, created.text[:300]
    card = await wait_terminal(http, created.json()["id"], timeout_s=timeout_s)
    card["lines"] = []
    for key in ("output_file_id", "error_file_id"):
        if card[key] is not None:
            content_response = await http.get(f"/v1/files/{card[key]}/content")
            assert content_response.status_code == 200
            card["lines"] += [json.loads(x) for x in content_response.content.splitlines()]
    return card


async def wait_terminal(
    http: httpx.AsyncClient, batch_id: str, *, timeout_s: float = 120.0
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        card: dict[str, Any] = (await http.get(f"/v1/batches/{batch_id}")).json()
        if card["status"] in TERMINAL:
            return card
        assert loop.time() < deadline, f"batch stuck in {card['status']}"
        await asyncio.sleep(0.02)


async def test_edge_numbers_in_batch_lines_give_400_lines_or_sane_200s(
    client: httpx.AsyncClient, embedded_engine: Any
) -> None:
    last_token = embedded_engine.token_str(embedded_engine.vocab_size - 1)
    lines = [
        _line(f"{field}-{i}", _body_text(field, number))
        for field in NUMERIC_FIELDS
        for i, number in enumerate(EDGE_NUMBERS)
    ]
    card = await run_batch(client, b"".join(lines))
    assert card["status"] == "completed", card
    assert len(card["lines"]) == len(lines)
    for line in card["lines"]:
        response = line["response"]
        assert response["status_code"] in (200, 400), line
        if response["status_code"] == 200:
            tokens = response["body"]["choices"][0]["logprobs"]["tokens"]
            assert not all(t == last_token for t in tokens), line["custom_id"]
        else:
            field = line["custom_id"].rsplit("-", 1)[0]
            message = response["body"]["error"]["message"]
            assert field in message or "maximum context length" in message, line


@pytest.mark.parametrize("limit", ["\u00b2", "1" * 5000, "0", "101", "-1", "1.5", " 3", "\u0663"])
async def test_a_bad_list_limit_is_a_400_naming_limit(
    client: httpx.AsyncClient, limit: str
) -> None:
    for path in ("/v1/batches", "/v1/files"):
        response = await client.get(path, params={"limit": limit})
        if path == "/v1/files" and limit == "101":
            assert response.status_code == 200  # files list up to 10,000 a page, as OpenAI's
            continue
        assert response.status_code == 400, (path, limit, response.text[:200])
        error = response.json()["error"]
        assert error["param"] == "limit"
        assert "limit must be an integer from 1 to" in error["message"]


async def test_files_are_listed_in_pages_like_openai(vllm_app: Any) -> None:
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(vllm_app), base_url="http://embedded"
    ) as http:
        line = _line("a", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}))
        ids = [(await upload(http, line)).json()["id"] for _ in range(7)]
        seen: list[str] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 3, "order": "asc"}
            if after is not None:
                params["after"] = after
            page = (await http.get("/v1/files", params=params)).json()
            assert page["object"] == "list"
            assert len(page["data"]) <= 3
            seen += [card["id"] for card in page["data"]]
            if not page["has_more"]:
                break
            assert page["last_id"] == page["data"][-1]["id"]
            after = page["last_id"]
        assert [i for i in seen if i in ids] == ids
        newest = (await http.get("/v1/files", params={"limit": 2})).json()
        assert [card["id"] for card in newest["data"]] == ids[::-1][:2]
        assert newest["has_more"] is True
        for i in ids:
            await http.delete(f"/v1/files/{i}")
        unknown = await http.get("/v1/files", params={"after": "file-nope"})
        assert unknown.status_code == 400
        assert unknown.json()["error"]["param"] == "after"
        assert (await http.get("/v1/files", params={"order": "up"})).status_code == 400


@pytest.mark.parametrize("model", ['["nbc-shakespeare"]', '{"a": 1}', "7", "null"])
async def test_a_line_whose_model_is_no_string_is_a_line_error_and_the_batch_ends(
    client: httpx.AsyncClient, model: str
) -> None:
    good = json.dumps({"model": MODEL, "prompt": "To be", "max_tokens": 2})
    odd = '{"model": ' + model + ', "prompt": "To be", "max_tokens": 2}'
    card = await run_batch(client, _line("good", good) + _line("odd", odd), timeout_s=60)
    assert card["status"] == "completed"
    statuses = {line["custom_id"]: line["response"]["status_code"] for line in card["lines"]}
    assert statuses == {"good": 200, "odd": 400}
    error = next(x for x in card["lines"] if x["custom_id"] == "odd")["response"]["body"]
    assert error["error"]["param"] == "model"


async def test_a_cancelled_batch_of_odd_lines_ends_cancelled(client: httpx.AsyncClient) -> None:
    odd = '{"model": ["x"], "prompt": "To be", "max_tokens": 2}'
    uploaded = (await upload(client, _line("a", odd) + _line("b", odd))).json()
    created = await client.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    batch_id = created.json()["id"]
    await client.post(f"/v1/batches/{batch_id}/cancel")
    card = await wait_terminal(client, batch_id, timeout_s=30)
    assert card["status"] in ("cancelled", "completed")


async def test_a_deeply_nested_line_is_a_400_line_as_the_live_route_answers(
    client: httpx.AsyncClient,
) -> None:
    for depth in (3, 50, 985):
        prompt = "[" * depth + "1" + "]" * depth
        body = '{"model": "' + MODEL + '", "prompt": ' + prompt + ', "max_tokens": 2}'
        live = await _post(client, body)
        assert live.status_code == 400, depth
        card = await run_batch(client, _line("deep", body), timeout_s=60)
        assert card["status"] == "completed"
        (line,) = card["lines"]
        assert line["response"]["status_code"] == 400, line
        if depth < 900:  # deeper, the live route's JSON parser gives up first
            assert line["response"]["body"] == live.json()


# -- what batches may hold: line sizes, disk ------------------------------------------------------
async def test_a_line_longer_than_the_body_limit_is_refused_at_upload(
    embedded_engine: Any,
) -> None:
    app = create_app(embedded_engine, max_body_bytes=10_000)
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded"
    ) as http:
        short = _line("a", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}))
        long = _line("b", json.dumps({"model": MODEL, "prompt": "x" * 20_000, "max_tokens": 1}))
        refused = await upload(http, short + long)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "line_too_large"
        assert "line 2 of the file is longer than 10000 bytes" in error["message"]
        assert (await upload(http, short)).status_code == 200


def _stored(app: Any) -> int:
    return int(app.state.nbcompletions_batches.stored_bytes)


async def test_a_batch_whose_output_would_pass_the_disk_limit_fails_saying_so(
    embedded_engine: Any,
) -> None:
    from nbcompletions.server import BatchLimits

    body = json.dumps({"model": MODEL, "prompt": "To be", "max_tokens": 16, "logprobs": 5})
    content = b"".join(_line(f"r{i}", body) for i in range(30))
    limit = len(content) + 8_000  # room for a few output lines, not 30
    app = create_app(embedded_engine, batch_limits=BatchLimits(max_stored_bytes=limit))
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded"
    ) as http:
        card = await run_batch(http, content)
        assert card["status"] == "failed"
        (error,) = card["errors"]["data"]
        assert error["code"] == "storage_limit_exceeded"
        assert str(limit) in error["message"]
        assert 0 < len(card["lines"]) < 30  # what finished is kept
        listed = (await http.get("/v1/files")).json()["data"]
        assert sum(card["bytes"] for card in listed) == _stored(app) <= limit


async def test_concurrent_uploads_stay_under_the_disk_limit(embedded_engine: Any) -> None:
    from nbcompletions.server import BatchLimits

    body = json.dumps({"model": MODEL, "prompt": "x" * 900, "max_tokens": 1})
    content = b"".join(_line(f"r{i}", body) for i in range(100))  # about 100 KB
    limit = 8 * len(content) + len(content) // 2
    app = create_app(embedded_engine, batch_limits=BatchLimits(max_stored_bytes=limit))
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded"
    ) as http:
        answers = await asyncio.gather(*(upload(http, content) for _ in range(20)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 8 + [400] * 12
    assert all(
        a.json()["error"]["code"] == "storage_limit_exceeded"
        for a in answers
        if a.status_code == 400
    )
    assert _stored(app) == 8 * len(content) <= limit
