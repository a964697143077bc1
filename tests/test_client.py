"""The client against injected faults (httpx.MockTransport): retries, errors, limits, secrets."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import inspect
import json
import logging
import pickle
import time
from typing import Any

import httpx
import pytest
from helpers import mock_client
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcompletions import (
    APIError,
    AsyncClient,
    Client,
    Completion,
    CompletionRequest,
    Limits,
    NBCompletionsError,
    RequestError,
    _retry,
)

KEY = "sk-test-0123456789abcdefSECRET"


def completion_body(text: str = "ok", model: str = "m", n: int = 1) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": model,
        "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": "stop"} for i in range(n)
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class Script:
    """A handler that answers with the given responses in turn and records the requests."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses[min(len(self.requests), len(self.responses)) - 1]
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Replace the retry sleep: tests run instantly and can assert on the computed delays."""
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(_retry, "sleep", fake_sleep)
    return recorded


# -- the main path ---------------------------------------------------------------------------------
def test_complete_sends_the_validated_body_and_returns_a_completion() -> None:
    script = Script(httpx.Response(200, json=completion_body("hi", n=2)))
    with mock_client(script) as client:
        completion = client.complete(
            "Hello", max_tokens=3, n=2, temperature=0.5, extra={"top_k": 4}
        )
    assert isinstance(completion, Completion)
    assert completion.text == "hi"
    assert completion.usage == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert completion.request == CompletionRequest(
        prompt="Hello", model="m", max_tokens=3, n=2, temperature=0.5, extra={"top_k": 4}
    )
    sent = script.requests[0]
    assert sent.method == "POST"
    assert str(sent.url) == "http://test/v1/completions"
    assert json.loads(sent.content) == {
        "model": "m",
        "prompt": "Hello",
        "max_tokens": 3,
        "n": 2,
        "temperature": 0.5,
        "top_k": 4,
    }
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers  # a base URL without a key is fine


def test_model_given_per_call_overrides_the_client_model() -> None:
    script = Script(httpx.Response(200, json=completion_body()))
    with mock_client(script) as client:
        client.complete("x", model="other")
    assert json.loads(script.requests[0].content)["model"] == "other"


def test_invalid_fields_fail_before_any_network_io() -> None:
    script = Script(httpx.Response(200, json=completion_body()))
    with mock_client(script) as client:
        with pytest.raises(
            RequestError, match=r"temperature must be a number from 0 to 2; got 3\.5"
        ):
            client.complete("x", temperature=3.5)
        with pytest.raises(TypeError, match=r"'temprature' \(did you mean 'temperature'\?\)"):
            client.complete("x", temprature=0.5)  # type: ignore[call-arg]  # the misspelling under test
        with pytest.raises(TypeError, match="extra="):
            # top_k is not a keyword (it goes in extra=): that refusal is under test
            client.complete("x", top_k=3)  # type: ignore[call-arg]
        with pytest.raises(RequestError, match="logprobs"):
            client.complete("x", logprobs=6)
    assert script.requests == []


def test_text_that_is_not_unicode_fails_before_any_network_io() -> None:
    # A lone surrogate cannot be sent as UTF-8: a RequestError naming the field, sync and stream.
    script = Script(httpx.Response(200, json=completion_body()))
    with mock_client(script) as client:
        with pytest.raises(RequestError, match=r"prompt .*surrogate") as info:
            client.complete("To \ud800be")
        assert info.value.param == "prompt"
        with pytest.raises(RequestError, match="surrogate") as info:
            list(client.stream("To be", stop=["\udfff"]))
        assert info.value.param == "stop"
    assert script.requests == []


def test_limits_are_a_client_setting() -> None:
    script = Script(httpx.Response(200, json=completion_body()))
    with mock_client(script, limits=Limits.vllm()) as client:
        client.complete("x", logprobs=20)
    assert json.loads(script.requests[-1].content)["logprobs"] == 20


def test_models_lists_ids() -> None:
    script = Script(
        httpx.Response(
            200,
            json={
                "object": "list",
                "data": [{"id": "a", "object": "model"}, {"id": "b", "object": "model"}],
            },
        )
    )
    with mock_client(script) as client:
        assert client.models() == ["a", "b"]
    assert script.requests[0].method == "GET"
    assert str(script.requests[0].url) == "http://test/v1/models"


def test_model_is_discovered_when_the_server_lists_exactly_one() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "only"}]})
        return httpx.Response(200, json=completion_body(model="only"))

    client = Client("http://test/v1", transport=httpx.MockTransport(handler))
    request = client.complete("x").request
    assert request is not None
    assert request.model == "only"


def test_no_model_and_several_listed_is_a_clear_error() -> None:
    script = Script(httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]}))
    client = Client("http://test/v1", transport=httpx.MockTransport(script))
    with pytest.raises(RequestError, match=r"model must be given.*\['a', 'b'\]"):
        client.complete("x")


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://from-env:1234/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    script = Script(httpx.Response(200, json=completion_body()))
    client = Client(transport=httpx.MockTransport(script), model="m")
    assert client.endpoint == "http://from-env:1234/v1"
    client.complete("x")
    assert str(script.requests[0].url) == "http://from-env:1234/v1/completions"
    assert script.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_default_timeout_is_the_sdks() -> None:
    timeout = mock_client(Script()).timeout
    assert (timeout.read, timeout.connect) == (600.0, 5.0)


def test_embedded_server_missing_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import nbcompletions.model

    monkeypatch.setattr(nbcompletions.model, "FILES_DIR", tmp_path)
    with pytest.raises(NBCompletionsError, match=r"embedded model.*base_url"):
        Client()


@pytest.mark.parametrize(
    "bad",
    [
        {"max_retries": -1},
        {"max_concurrency": 0},
        {"timeout": -5},
        {"vocab_size": 0},
        {"vocab_size": True},
        {"vocab_size": 5.5},
        {"base_url": "ftp://x"},
        {"base_url": []},
        {"base_url": "http://127.0.0.1:99999/v1"},
        {"base_url": "http://[::1/v1"},
        {"base_url": "http:///v1"},
        {"limits": {"max_logprobs": 20}},
    ],
)
def test_bad_client_settings_name_the_setting(bad: dict[str, Any]) -> None:
    name = next(iter(bad))
    kw = {"base_url": "http://test/v1", **bad}
    with pytest.raises(RequestError, match=name):
        Client(**kw)


# -- retries ---------------------------------------------------------------------------------------
def test_429_storm_honours_retry_after_then_gives_up(delays: list[float]) -> None:
    too_many = httpx.Response(
        429,
        headers={"retry-after": "2"},
        json={
            "error": {
                "message": "Rate limit reached",
                "type": "requests",
                "code": "rate_limit_exceeded",
            }
        },
    )
    script = Script(too_many)
    with mock_client(script) as client, pytest.raises(APIError) as info:
        client.complete("x")
    assert len(script.requests) == 3  # max_retries=2 -> three attempts, like the SDK
    assert delays == [2.0, 2.0]
    assert (info.value.status, info.value.code) == (429, "rate_limit_exceeded")


def test_429_then_success(delays: list[float]) -> None:
    script = Script(
        httpx.Response(429, headers={"retry-after-ms": "1500", "retry-after": "9"}),
        httpx.Response(200, json=completion_body("done")),
    )
    with mock_client(script) as client:
        assert client.complete("x").text == "done"
    assert delays == [1.5]  # retry-after-ms wins over retry-after


def test_500_then_success_uses_jittered_backoff(delays: list[float]) -> None:
    script = Script(
        httpx.Response(500, text="oops"),
        httpx.Response(503, text="oops"),
        httpx.Response(200, json=completion_body("fine")),
    )
    with mock_client(script) as client:
        assert client.complete("x").text == "fine"
    assert len(delays) == 2
    assert 0.375 <= delays[0] <= 0.5
    assert 0.75 <= delays[1] <= 1.0


def test_backoff_formula_and_caps() -> None:
    assert _retry.retry_delay(0, rand=0.0) == 0.5
    assert _retry.retry_delay(1, rand=1.0) == 0.75
    assert _retry.retry_delay(10, rand=0.0) == 8.0
    assert _retry.retry_delay(0, {"retry-after": "61"}, rand=0.0) == 0.5  # too long: backoff
    assert _retry.retry_delay(0, {"retry-after": "0"}, rand=0.0) == 0.5
    assert _retry.retry_delay(0, {"retry-after": "soon"}, rand=0.0) == 0.5
    assert _retry.retry_delay(0, {"retry-after": "1.25"}) == 1.25


def test_retry_after_as_an_http_date() -> None:
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    waited = _retry.parse_retry_after({"retry-after": date}, now=now)
    assert waited is not None
    assert 9 <= waited <= 11


def test_x_should_retry_overrides_the_status(delays: list[float]) -> None:
    script = Script(httpx.Response(500, headers={"x-should-retry": "false"}, text="no"))
    with mock_client(script) as client, pytest.raises(APIError):
        client.complete("x")
    assert len(script.requests) == 1
    script = Script(
        httpx.Response(400, headers={"x-should-retry": "true"}, text="again"),
        httpx.Response(200, json=completion_body()),
    )
    with mock_client(script) as client:
        client.complete("x")
    assert len(script.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(status: int, delays: list[float]) -> None:
    script = Script(httpx.Response(status, json={"error": {"message": "no"}}))
    with mock_client(script) as client, pytest.raises(APIError):
        client.complete("x")
    assert len(script.requests) == 1


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int, delays: list[float]) -> None:
    script = Script(httpx.Response(status, text="x"), httpx.Response(200, json=completion_body()))
    with mock_client(script) as client:
        client.complete("x")
    assert len(script.requests) == 2


def test_connection_errors_and_timeouts_are_retried(delays: list[float]) -> None:
    script = Script(
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.Response(200, json=completion_body()),
    )
    with mock_client(script) as client:
        client.complete("x")
    assert len(script.requests) == 3
    script = Script(httpx.ConnectError("refused"))
    with mock_client(script) as client, pytest.raises(APIError) as info:
        client.complete("x")
    assert info.value.type == "connection_error"
    assert info.value.status is None
    assert "http://test/v1" in str(info.value)
    script = Script(httpx.ReadTimeout("slow"))
    with mock_client(script, max_retries=0) as client, pytest.raises(APIError) as info:
        client.complete("x")
    assert info.value.type == "timeout"
    assert len(script.requests) == 1


def test_malformed_json_body_is_an_api_error_and_not_retried(delays: list[float]) -> None:
    script = Script(httpx.Response(200, text='{"choices": [{"te'))
    with mock_client(script) as client, pytest.raises(APIError, match="not JSON") as info:
        client.complete("x")
    assert info.value.type == "invalid_response"
    assert len(script.requests) == 1


def test_html_502_page_becomes_a_readable_message(delays: list[float]) -> None:
    page = (
        "<html><head><title>502 Bad Gateway</title><style>body{color:red}</style></head>"
        "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx/1.25</center>"
        "</body></html>"
    )
    script = Script(httpx.Response(502, text=page, headers={"content-type": "text/html"}))
    with mock_client(script) as client, pytest.raises(APIError) as info:
        client.complete("x")
    assert info.value.status == 502
    assert info.value.message == "502 Bad Gateway 502 Bad Gateway nginx/1.25"
    assert "<" not in str(info.value)
    assert len(script.requests) == 3


# -- error bodies ----------------------------------------------------------------------------------
ERROR_BODIES = {
    "openai": (
        {
            "error": {
                "message": "temperature must be <= 2",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": None,
            }
        },
        ("temperature must be <= 2", "invalid_request_error", "temperature", None),
    ),
    "vllm": (
        {
            "error": {
                "message": "bad logprobs",
                "type": "BadRequestError",
                "param": "logprobs",
                "code": 400,
            }
        },
        ("bad logprobs", "BadRequestError", "logprobs", "400"),
    ),
    "vllm-flat": (
        {
            "object": "error",
            "message": "The model `x` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        },
        ("The model `x` does not exist.", "NotFoundError", None, "404"),
    ),
    "llamacpp": (
        {
            "error": {
                "code": 400,
                "message": "echo is not supported",
                "type": "invalid_request_error",
            }
        },
        ("echo is not supported", "invalid_request_error", None, "400"),
    ),
    "string-error": ({"error": "model overloaded"}, ("model overloaded", None, None, None)),
    "fastapi": ({"detail": "Not Found"}, ("Not Found", None, None, None)),
}


@pytest.mark.parametrize("shape", sorted(ERROR_BODIES))
def test_error_bodies_are_normalised(shape: str) -> None:
    body, (message, type_, param, code) = ERROR_BODIES[shape]
    script = Script(httpx.Response(400, json=body, headers={"x-request-id": "req-9"}))
    with mock_client(script) as client, pytest.raises(APIError) as info:
        client.complete("x")
    error = info.value
    assert (error.status, error.message, error.type, error.param, error.code) == (
        400,
        message,
        type_,
        param,
        code,
    )
    assert error.body == body
    assert error.headers["x-request-id"] == "req-9"


def test_empty_error_body_uses_the_reason_phrase() -> None:
    script = Script(httpx.Response(404))
    with mock_client(script) as client, pytest.raises(APIError) as info:
        client.complete("x")
    assert info.value.message == "Not Found"
    assert str(info.value).startswith("HTTP 404: Not Found [POST http://test/v1/completions]")


# -- concurrency and replicas ----------------------------------------------------------------------
async def test_max_concurrency_caps_requests_in_flight() -> None:
    # Requests are held at a gate, not by a sleep: the count cannot depend on how fast the
    # machine is.
    in_flight = 0
    peak = 0
    gate = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1
        return httpx.Response(200, json=completion_body())

    async def settle() -> None:
        for _ in range(200):  # loop turns for every request that could start to reach the gate
            await asyncio.sleep(0)

    client = AsyncClient(
        "http://test/v1", model="m", max_concurrency=3, transport=httpx.MockTransport(handler)
    )
    async with client:
        batch = asyncio.gather(*(client.complete(f"p{i}") for i in range(12)))
        await settle()
        assert in_flight == 3
        gate.set()
        results = await batch
    assert len(results) == 12
    assert peak == 3


async def test_replicas_share_the_load() -> None:
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        await asyncio.sleep(0.01)
        return httpx.Response(200, json=completion_body())

    client = AsyncClient(
        ["http://a/v1", "http://b/v1", "http://c/v1"],
        model="m",
        transport=httpx.MockTransport(handler),
    )
    async with client:
        await asyncio.gather(*(client.complete("x") for _ in range(9)))
        for _ in range(3):
            await client.complete("x")
    assert sorted(hosts) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert "endpoints=['http://a/v1', 'http://b/v1', 'http://c/v1']" in repr(client)


def test_a_failing_replica_is_avoided_on_retry(delays: list[float]) -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "a":
            raise httpx.ConnectError("down")
        return httpx.Response(200, json=completion_body())

    with mock_client(handler, base_url=["http://a/v1", "http://b/v1"]) as client:
        client.complete("x")
    assert hosts == ["a", "b"]


def test_sync_client_inside_a_running_loop() -> None:
    script = Script(httpx.Response(200, json=completion_body("from a cell")))
    client = mock_client(script)

    async def cell() -> str:
        return client.complete("x").text  # a plain call, no await, as in a notebook cell

    assert asyncio.run(cell()) == "from a cell"
    client.close()


async def test_async_client_on_several_loops() -> None:
    script = Script(httpx.Response(200, json=completion_body()))
    client = AsyncClient("http://test/v1", model="m", transport=httpx.MockTransport(script))
    await client.complete("x")
    sync = Client._wrapping(client)
    assert sync.complete("y").text == "ok"  # the same client on the background loop
    await client.close()


# -- secrets ---------------------------------------------------------------------------------------
def test_the_key_never_shows(caplog: pytest.LogCaptureFixture, delays: list[float]) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "nbcompletions"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    echoed = {
        "error": {
            "message": f"Incorrect API key provided: {KEY}. You can find yours at ...",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    script = Script(httpx.Response(500, text="oops"), httpx.Response(401, json=echoed))
    client = mock_client(script, api_key=KEY, headers={"X-Trace": "1"})
    for text in (
        repr(client),
        str(client),
        repr(client.async_client),
        repr(vars(client)),
        repr(vars(client.async_client)),
    ):
        assert KEY not in text
    with pytest.raises(TypeError) as pickled:
        pickle.dumps(client)
    assert KEY not in str(pickled.value)
    with pytest.raises(TypeError):
        pickle.dumps(client.async_client._settings.key)
    with pytest.raises(APIError) as info:
        client.complete("x")
    error = info.value
    assert error.status == 401
    assert error.code == "invalid_api_key"
    for text in (
        str(error),
        repr(error),
        error.message,
        json.dumps(error.body),
        repr(error.headers),
        repr(error.args),
    ):
        assert KEY not in text
    assert "***" in error.message
    # The key was sent, and nothing logged at DEBUG (ours, httpx's, httpcore's) shows it.
    assert script.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert script.requests[-1].headers["x-trace"] == "1"
    assert caplog.records, "expected debug logging to have been captured"
    assert KEY not in caplog.text
    assert "retrying" in caplog.text
    client.close()


def test_credentials_in_a_url_are_hidden_in_repr() -> None:
    client = Client("http://user:pa55@host/v1", transport=httpx.MockTransport(Script()), model="m")
    assert "pa55" not in repr(client)


def test_credentials_in_a_url_are_sent_as_basic_auth_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # httpx logs every request's URL at INFO: the userinfo must not be part of that URL.
    script = Script(
        httpx.Response(200, json=completion_body()), httpx.Response(200, text="data: [DONE]\n\n")
    )
    caplog.set_level(logging.DEBUG)
    with mock_client(script, base_url="http://user:pa55@host/v1") as client:
        client.complete("x")
        list(client.stream("x"))
        assert "pa55" not in client.endpoint
    basic = "Basic " + base64.b64encode(b"user:pa55").decode()
    assert len(script.requests) == 2
    for request in script.requests:
        assert request.headers["authorization"] == basic
        assert "pa55" not in str(request.url)
    assert caplog.records
    assert "pa55" not in caplog.text


# -- the sync and async APIs are twins -----------------------------------------------------------
def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if not name.startswith("_") and callable(member)
    }


def test_sync_and_async_clients_have_the_same_methods_and_signatures() -> None:
    sync_methods = _public_methods(Client)
    async_methods = _public_methods(AsyncClient)
    async_only = {"aclose"}  # an alias: both twins have close()
    assert set(sync_methods) == set(async_methods) - async_only
    for name, signature in sync_methods.items():
        twin = async_methods[name]
        assert list(signature.parameters) == list(twin.parameters), name
        for param in signature.parameters.values():
            other = twin.parameters[param.name]
            assert (param.kind, param.default) == (other.kind, other.default), (name, param)
    assert inspect.signature(Client.__init__) == inspect.signature(AsyncClient.__init__)
    # What is awaited on one side is a plain call on the other.
    for name in ("complete", "complete_request", "models", "score", "capabilities", "close"):
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
        assert not inspect.iscoroutinefunction(getattr(Client, name)), name
    properties = {
        name for name, member in vars(AsyncClient).items() if isinstance(member, property)
    }
    assert properties <= {
        name for name, member in vars(Client).items() if isinstance(member, property)
    }


def test_score_and_capabilities_delegate_to_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    import nbcompletions._scoring as scoring

    seen: list[Any] = []

    async def ascore(aclient: AsyncClient, texts: Any, *, context: Any = None) -> str:
        seen.append((aclient, texts, context))
        return "scored"

    async def acapabilities(aclient: AsyncClient) -> dict[str, Any]:
        seen.append(aclient)
        return {"echo": True}

    monkeypatch.setattr(scoring, "ascore", ascore)
    monkeypatch.setattr(scoring, "acapabilities", acapabilities)
    client = mock_client(Script())
    assert client.score(["a"], context="c") == "scored"
    assert client.capabilities() == {"echo": True}
    assert seen == [(client.async_client, ["a"], "c"), client.async_client]


@settings(max_examples=200, deadline=None)
@given(
    retries=st.integers(0, 2000),
    rand=st.floats(0, 1),
    asked=st.one_of(st.none(), st.floats(-100, 200, allow_nan=False)),
)
def test_retry_delay_is_bounded(retries: int, rand: float, asked: float | None) -> None:
    headers = {} if asked is None else {"retry-after": repr(asked)}
    delay = _retry.retry_delay(retries, headers, rand=rand)
    if asked is not None and 0 < asked <= 60:
        assert delay == asked
    else:
        base = min(0.5 * 2 ** min(retries, 1000), 8.0)
        assert 0.75 * base <= delay <= base


def test_an_error_body_with_status_200_is_an_api_error() -> None:
    script = Script(httpx.Response(200, json={"error": {"message": "quota", "type": "billing"}}))
    with mock_client(script) as client, pytest.raises(APIError, match="quota") as info:
        client.complete("x")
    assert (info.value.status, info.value.type) == (200, "billing")


# -- shared settings, the model setter and the typed seams ----------------------------------------
def test_model_setter_validates_and_both_twins_see_it() -> None:
    client = mock_client(Script(httpx.Response(200, json=completion_body())))
    client.model = "other"
    assert client.async_client.model == "other"
    client.async_client.model = "third"
    assert client.model == "third"
    assert client.build_request("x").model == "third"
    # The constructor refused these; the setter let them through, to fail later in a request.
    for bad in ("", 3):
        with pytest.raises(RequestError, match="model must be a non-empty string or None") as info:
            client.model = bad  # type: ignore[assignment]  # ill-typed on purpose: refused
        assert info.value.param == "model"
    assert client.model == "third"
    client.model = None
    assert client.async_client.model is None
    with pytest.raises(RequestError, match="max_retries must be an integer >= 0"):
        client.max_retries = -1
    client.max_retries = 0
    assert client.async_client.max_retries == 0


def test_conformance_follows_the_model() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": []})
        body = json.loads(request.content)
        asked.append(body["model"])
        return httpx.Response(200, json=completion_body(model=body["model"]))

    client = mock_client(handler, model="first", max_retries=0)
    first = client.conformance()
    assert first.model == "first"
    client.model = "second"
    # Measured again for the new model, not the old model's answer.
    second = client.conformance()
    assert second.model == "second"
    assert "second" in asked
    client.model = "first"
    sent = len(asked)
    assert client.conformance() is first
    assert len(asked) == sent  # cached per model: nothing sent again


def test_async_client_of_both_twins() -> None:
    from nbcompletions._types import as_async

    client = mock_client(Script())
    aclient = client.async_client
    assert isinstance(aclient, AsyncClient)
    assert aclient.async_client is aclient
    assert as_async(client) is aclient
    assert as_async(aclient) is aclient
    with pytest.raises(TypeError, match="expected an nbcompletions Client or AsyncClient; got int"):
        as_async(3)  # type: ignore[arg-type]  # the refusal under test


def test_typed_request_fields_are_the_protocols_fields() -> None:
    from nbcompletions._request import FIELDS, CompletionFields

    expected = (set(FIELDS) - {"prompt"}) | {"extra"}
    assert set(CompletionFields.__optional_keys__) == expected
    assert not CompletionFields.__required_keys__


@pytest.mark.parametrize("answer", [{}, {"data": "models"}, [], "oops"])
def test_a_listing_without_a_data_list_is_an_invalid_response(answer: Any) -> None:
    """`models()` (and the batch calls, through the same `answered_field`) name what was missing
    and show what came instead."""
    from nbcompletions._errors import answered_field

    client = mock_client(lambda request: httpx.Response(200, json=answer))
    with pytest.raises(APIError) as info:
        client.models()
    assert info.value.type == "invalid_response"
    assert info.value.status == 200
    assert "GET /models answered without a data list" in str(info.value)
    assert info.value.body == answer
    client.close()
    with pytest.raises(APIError, match="POST /files answered without a file id") as lost:
        answered_field(answer, "id", str, "POST /files", "a file id")
    assert lost.value.status is None
    assert answered_field({"id": "file-1"}, "id", str, "POST /files", "a file id") == "file-1"
