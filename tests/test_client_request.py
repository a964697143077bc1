"""The public transport, `Client.request` and `Client.open` (and their async twins): any route of
the server with the completion path's auth, retries, redaction and errors. Through our real server
(in-process and `nbcompletions serve`); httpx.MockTransport only to inject faults."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from helpers import mock_client

from nbcompletions import APIError, AsyncClient, Client, RequestError, _retry
from nbcompletions.server import StreamingASGITransport, create_app

MODEL = "nbc-shakespeare"
KEY = "sk-test-0123456789abcdefSECRET"
LINES = [
    json.dumps(
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 1},
        }
    ).encode()
    for i in range(3)
]


@pytest.fixture(scope="module")
def served(live_server: str) -> Iterator[Client]:
    client = Client(live_server, model=MODEL)
    yield client
    client.close()


@pytest.fixture
def in_process(app: Any) -> Iterator[Client]:
    client = Client("http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app))
    yield client
    client.close()


@pytest.fixture(params=["in_process", "served"])
def client(request: pytest.FixtureRequest) -> Client:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]  # pytest: Any


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(_retry, "sleep", fake_sleep)
    return recorded


def _upload(client: Client, content: bytes) -> Any:
    files = {"file": ("in.jsonl", content, "application/jsonl")}
    return client.request("POST", "/files", files=files, data={"purpose": "batch"})


# -- through the real server ---------------------------------------------------------------------
def test_request_returns_the_parsed_answer_of_any_route(client: Client) -> None:
    card = client.request("GET", "/models")
    assert [item["id"] for item in card["data"]] == [MODEL]
    body = client.request(
        "POST", "/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2}
    )
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 2


def test_files_upload_as_multipart_and_download_as_a_stream(client: Client) -> None:
    content = b"\n".join(LINES) + b"\n"
    uploaded = _upload(client, content)
    assert uploaded["bytes"] == len(content)
    assert client.request("GET", f"/files/{uploaded['id']}")["id"] == uploaded["id"]
    with client.open("GET", f"/files/{uploaded['id']}/content") as body:
        assert list(body.iter_lines()) == LINES
    with client.open("GET", f"/files/{uploaded['id']}/content") as body:
        assert b"".join(body.iter_bytes()) == content
        with pytest.raises(RuntimeError, match="already been read"):
            list(body.iter_bytes())
    with pytest.raises(RuntimeError, match="a with block"):
        list(client.open("GET", f"/files/{uploaded['id']}/content").iter_lines())
    client.request("DELETE", f"/files/{uploaded['id']}")
    with pytest.raises(APIError) as info:
        client.request("GET", f"/files/{uploaded['id']}")
    assert info.value.status == 404


def test_params_go_in_the_query_string(client: Client) -> None:
    uploaded = _upload(client, LINES[0] + b"\n")
    for _ in range(2):
        client.request(
            "POST",
            "/batches",
            json={
                "input_file_id": uploaded["id"],
                "endpoint": "/v1/completions",
                "completion_window": "24h",
            },
        )
    page = client.request("GET", "/batches", params={"limit": 1})
    assert len(page["data"]) == 1
    assert page["has_more"] is True


def test_an_error_answer_is_an_api_error_naming_the_route(client: Client) -> None:
    with pytest.raises(APIError) as info:
        client.request("GET", "/files/file-nope")
    assert info.value.status == 404
    assert info.value.url is not None
    assert info.value.url.endswith("/v1/files/file-nope")
    with pytest.raises(APIError) as info, client.open("GET", "/files/file-nope/content"):
        pass
    assert info.value.status == 404


async def test_the_async_twin_reads_the_same(app: Any) -> None:
    async with AsyncClient(
        "http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app)
    ) as aclient:
        assert (await aclient.request("GET", "/models"))["data"][0]["id"] == MODEL
        files = {"file": ("in.jsonl", b"\n".join(LINES), "application/jsonl")}
        uploaded = await aclient.request("POST", "/files", files=files, data={"purpose": "batch"})
        async with aclient.open("GET", f"/files/{uploaded['id']}/content") as body:
            assert [line async for line in body.aiter_lines()] == LINES


async def test_routes_behind_a_key_get_the_clients_key(embedded_engine: Any) -> None:
    keyed = create_app(embedded_engine, api_key=KEY)
    transport = StreamingASGITransport(keyed)
    async with AsyncClient("http://embedded/v1", KEY, model=MODEL, transport=transport) as ok:
        assert (await ok.request("GET", "/batches"))["data"] == []
    async with AsyncClient(
        "http://embedded/v1", "sk-wrong", model=MODEL, transport=transport, max_retries=0
    ) as wrong:
        with pytest.raises(APIError) as info:
            await wrong.request("GET", "/batches")
    assert info.value.status == 401


# -- faults --------------------------------------------------------------------------------------
def test_request_retries_like_a_completion_and_retry_false_tries_once(
    delays: list[float],
) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"id": "batch_1"})

    with mock_client(handler, max_retries=2) as client:
        assert client.request("POST", "/batches", json={"a": 1}) == {"id": "batch_1"}
        assert len(calls) == 3
        assert len(delays) == 2
        assert calls[0].headers["content-type"] == "application/json"
        assert json.loads(calls[0].content) == {"a": 1}
        calls.clear()
        with pytest.raises(APIError) as info:
            client.request("POST", "/batches", json={"a": 1}, retry=False)
        assert info.value.status == 503
        assert len(calls) == 1


def test_a_key_the_server_echoes_is_redacted(delays: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        message = f"Incorrect API key provided: {KEY}"
        return httpx.Response(401, json={"error": {"message": message, "type": "auth"}})

    with mock_client(handler, api_key=KEY) as client, pytest.raises(APIError) as info:
        client.request("GET", "/batches")
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value.body)


def test_an_empty_answer_is_none_and_one_that_is_not_json_an_api_error() -> None:
    answers = iter([httpx.Response(204), httpx.Response(200, text="<html>oops</html>")])
    with mock_client(lambda request: next(answers)) as client:
        assert client.request("DELETE", "/files/f") is None
        with pytest.raises(APIError, match="not JSON") as info:
            client.request("GET", "/files/f")
    assert info.value.type == "invalid_response"


class _Pieces(httpx.AsyncByteStream):
    """A body that yields ``pieces`` and then, if ``then`` is given, raises it."""

    def __init__(self, pieces: list[bytes], then: Exception | None = None) -> None:
        self.pieces, self.then = pieces, then

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
        if self.then is not None:
            raise self.then


def test_open_retries_until_the_first_bytes_and_a_cut_after_them_is_an_error(
    delays: list[float],
) -> None:
    cut = httpx.ReadError("connection reset")
    answers = iter(
        [
            httpx.Response(200, stream=_Pieces([], then=cut)),  # nothing yet: retried
            httpx.Response(200, stream=_Pieces([b'{"a": 1}\n{"b"', b": 2}\r\n{}"])),
            httpx.Response(200, stream=_Pieces([b'{"a": 1}\n'], then=cut)),
        ]
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        return next(answers)

    with mock_client(handler) as client:
        with client.open("GET", "/files/f/content") as body:
            assert list(body.iter_lines()) == [b'{"a": 1}', b'{"b": 2}', b"{}"]
        assert len(delays) == 1
        with client.open("GET", "/files/f/content") as body:
            lines = body.iter_lines()
            assert next(lines) == b'{"a": 1}'
            with pytest.raises(APIError) as info:
                next(lines)
    assert info.value.type == "stream_broken"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ({"method": "GET", "path": "files"}, "path"),
        ({"method": "GET", "path": "https://elsewhere/v1/files"}, "path"),
        ({"method": "GET /x", "path": "/files"}, "method"),
        ({"method": "POST", "path": "/files", "json": {}, "content": b"x"}, "content"),
        ({"method": "POST", "path": "/files", "data": {"purpose": "batch"}}, "data"),
        ({"method": "POST", "path": "/batches", "json": {"x": float("nan")}}, "json"),
        # Text UTF-8 cannot carry (a lone surrogate) names its argument, not httpx's UnicodeError.
        ({"method": "GET", "path": "/fi\ud800les"}, "path"),
        ({"method": "GET", "path": "/files", "params": {"after": "\udc80"}}, "params"),
        ({"method": "POST", "path": "/f", "files": {"file": ("a\ud800.jsonl", b"{}")}}, "files"),
        (
            {
                "method": "POST",
                "path": "/files",
                "files": {"file": ("a.jsonl", b"{}")},
                "data": {"purpose": "\ud800"},
            },
            "data",
        ),
    ],
)
def test_bad_arguments_are_refused_before_sending(call: dict[str, Any], field: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    with mock_client(handler) as client, pytest.raises(RequestError) as info:
        client.request(**call)
    assert info.value.param == field
