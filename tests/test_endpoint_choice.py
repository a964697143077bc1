"""Which endpoint a client talks to, and errors that say where it came from and what to try.

An exported ``OPENAI_API_KEY`` must not silently turn the offline path into OpenAI:
``embedded=True`` asks for the embedded model whatever the environment holds, and every connection
or 404 error names the URL tried and where its base URL came from (issue 10, points 1 and 2).
"""

from __future__ import annotations

import httpx
import pytest
from conftest import needs_weights
from helpers import free_port

from nbcompletions import APIError, AsyncClient, Client, RequestError

KEY = "sk-env-0123456789abcdefSECRET"


@pytest.fixture
def env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture
def env_both(monkeypatch: pytest.MonkeyPatch) -> str:
    base = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", base)
    return base


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


# -- embedded=True -----------------------------------------------------------------------------
def test_embedded_true_wins_over_the_environment(env_both: str) -> None:
    needs_weights()
    with Client(embedded=True) as client:
        assert client.embedded
        assert client.model == "nbc-shakespeare"
        completion = client.complete("ROMEO:", max_tokens=2, seed=1)
        assert completion.request.model == "nbc-shakespeare"  # type: ignore[union-attr]
    # The environment alone still chooses its server, as documented.
    plain = Client(max_retries=0)
    assert not plain.embedded
    assert plain.endpoint == env_both


async def test_async_client_embedded_true_wins_over_the_environment(env_both: str) -> None:
    needs_weights()
    async with AsyncClient(embedded=True) as client:
        assert client.embedded
        completion = await client.complete("ROMEO:", max_tokens=2, seed=1)
        assert completion.model == "nbc-shakespeare"


def test_embedded_false_never_loads_the_model() -> None:
    client = Client(embedded=False)
    assert not client.embedded
    assert client.endpoint == "https://api.openai.com/v1"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"base_url": "http://127.0.0.1:1/v1"}, "base_url"),
        ({"api_key": KEY}, "api_key"),
        ({"transport": httpx.MockTransport(refuse)}, "transport"),
    ],
)
def test_embedded_true_with_a_conflicting_argument_names_it(
    extra: dict[str, object], named: str
) -> None:
    with pytest.raises(RequestError, match=rf"embedded=True.*{named}") as info:
        Client(embedded=True, **extra)  # type: ignore[arg-type]
    assert info.value.param == named
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value.value)


def test_embedded_true_with_two_conflicts_names_both() -> None:
    with pytest.raises(RequestError, match="base_url and api_key"):
        AsyncClient("http://127.0.0.1:1/v1", KEY, embedded=True)


def test_embedded_must_be_a_bool() -> None:
    with pytest.raises(RequestError, match=r"embedded must be True, False or None; got 'yes'"):
        Client(embedded="yes")  # type: ignore[arg-type]


# -- where the endpoint came from ----------------------------------------------------------------
def test_env_key_choosing_openai_says_so_on_a_connection_error(env_key: None) -> None:
    client = Client(transport=httpx.MockTransport(refuse), model="m", max_retries=0)
    with pytest.raises(APIError) as info:
        client.complete("x")
    text = str(info.value)
    assert info.value.type == "connection_error"
    assert "POST https://api.openai.com/v1/completions" in text
    assert "OPENAI_API_KEY is set in the environment" in text
    assert "Client(embedded=True)" in text
    assert KEY not in text


def test_env_key_choosing_openai_says_so_when_no_model_is_given(env_key: None) -> None:
    def listing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"id": "gpt-a"}, {"id": "gpt-b"}]})

    client = Client(transport=httpx.MockTransport(listing))
    with pytest.raises(RequestError, match=r"model must be given.*OPENAI_API_KEY.*embedded=True"):
        client.complete("x")


def test_openai_base_url_from_the_environment_is_named_with_the_url(env_both: str) -> None:
    # A real refused connection: nothing listens on that port.
    with Client(max_retries=0, model="m") as client, pytest.raises(APIError) as info:
        client.complete("x")
    text = str(info.value)
    assert f"POST {env_both}/completions" in text
    assert "OPENAI_BASE_URL in the environment" in text
    assert info.value.url == f"POST {env_both}/completions"


def test_base_url_argument_is_named_on_a_404() -> None:
    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "no such route"}})

    client = Client("http://test/v1", model="m", transport=httpx.MockTransport(not_found))
    with pytest.raises(APIError) as info:
        client.complete("x")
    assert "[POST http://test/v1/completions]" in str(info.value)
    assert "base URL from the base_url argument" in str(info.value)
    assert "did you mean" not in str(info.value)


# -- a base URL without /v1 ------------------------------------------------------------------------
def test_base_url_without_v1_against_the_real_server_suggests_v1() -> None:
    needs_weights()
    from nbcompletions.server import StreamingASGITransport, create_app

    transport = StreamingASGITransport(create_app())
    with Client("http://embedded", transport=transport) as client, pytest.raises(APIError) as info:
        client.complete("ROMEO:", max_tokens=1)  # GET /models first: no model was given
    text = str(info.value)
    assert info.value.status == 404
    assert "did you mean http://embedded/v1?" in text
    assert "[GET http://embedded/models]" in text


def test_model_not_found_is_not_blamed_on_the_path() -> None:
    def unknown_model(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "no model x", "code": "model_not_found"}}
        return httpx.Response(404, json=body)

    client = Client("http://test/api", model="x", transport=httpx.MockTransport(unknown_model))
    with pytest.raises(APIError) as info:
        client.complete("a")
    assert "did you mean" not in str(info.value)
    assert "[POST http://test/api/completions]" in str(info.value)


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
def test_every_http_error_names_the_url_with_credentials_redacted(status: int) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "nope"}})

    client = Client(
        "http://user:pw-SECRET@test/v1",
        model="m",
        max_retries=0,
        transport=httpx.MockTransport(fail),
    )
    with pytest.raises(APIError) as info:
        client.complete("x")
    text = str(info.value)
    assert "[POST http://test/v1/completions]" in text
    assert "pw-SECRET" not in text


def test_readme_and_notebooks_ask_for_the_embedded_model_explicitly() -> None:
    # With OPENAI_API_KEY exported, a bare Client() would target OpenAI: the offline examples must
    # not depend on the environment.
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = {"README.md": (root / "README.md").read_text()}
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        sources[path.name] = "\n".join(
            "".join(c["source"]) for c in cells if c["cell_type"] == "code"
        )
    assert len(sources) > 1
    for name, text in sources.items():
        assert re.search(r"\bClient\(embedded=True\)", text), name
        assert not re.search(r"^\s*\w+ = (nbc\.)?Client\(\)", text, re.M), name
