"""Client.score_reply on our server: the echo way (the chat rendered by the server's
/v1/chat/completions/render, or by a template here) and the prompt_logprobs way (``--compat vllm``:
the server tokenizes the chat), against each other and against the completion and chat answers of
the same text; refusals via httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import mock_client

import nbcompletions as nbc
from nbcompletions import ConformanceError, RequestError
from nbcompletions.model import render_chat
from nbcompletions.server import StreamingASGITransport, create_app

MESSAGES = [
    {"role": "system", "content": "Speak as a guard."},
    {"role": "user", "content": "Who is there?"},
]
REPLY = "Nay, answer me: stand, and unfold yourself."
RENDER = "/v1/chat/completions/render"


@pytest.fixture(scope="module")
def vllm_compat(embedded_engine: Any) -> Iterator[nbc.Client]:
    """The embedded model behind `serve --compat vllm`, in-process."""
    app = create_app(embedded_engine, compat="vllm")
    client = nbc.Client(
        "http://compat/v1",
        transport=StreamingASGITransport(app),
        limits=nbc.Limits.vllm(),
        model="nbc-shakespeare",
    )
    # Measured: on a second engine loaded in one process, the first requests' logprobs came out
    # up to 1.7e-6 off later identical ones (the engine's matter, not scoring's); the conformance
    # report (which the echo way needs anyway) comes first, so the comparison below is of the
    # two ways.
    client.conformance()
    yield client
    client.close()


@pytest.fixture(scope="module")
def by_echo(embedded_client: nbc.Client) -> nbc.ReplyScore:
    return embedded_client.score_reply(MESSAGES, REPLY)


def test_echo_scores_the_reply_tokens_as_score_does(
    embedded_client: nbc.Client, by_echo: nbc.ReplyScore
) -> None:
    assert by_echo.method == "echo"
    assert by_echo.summary["template"] == "render"  # the server rendered and tokenized the chat
    assert by_echo.summary["verified"] is True
    tokens = by_echo.tokens
    assert list(tokens.columns) == ["position", "token", "token_id", "logprob"]
    assert tokens["token_id"].notna().all()
    assert "".join(tokens["token"]) == " " + REPLY  # the template's space rides on the first token
    assert by_echo.summary["n_tokens"] == len(tokens)
    assert by_echo.sum_logprob == pytest.approx(float(tokens["logprob"].sum()))
    assert by_echo.summary["perplexity"] == pytest.approx(
        math.exp(-by_echo.sum_logprob / len(tokens))
    )
    # The same text scored by score() with the generation prompt as the context.
    scored = embedded_client.score(" " + REPLY, context=render_chat(MESSAGES))
    assert scored["sum_logprob"].iloc[0] == pytest.approx(by_echo.sum_logprob, abs=1e-6)
    assert int(scored["n_tokens"].iloc[0]) == len(tokens)


def test_prompt_logprobs_way_equals_the_echo_way(
    vllm_compat: nbc.Client, by_echo: nbc.ReplyScore
) -> None:
    served = vllm_compat.score_reply(MESSAGES, REPLY)
    assert served.method == "prompt_logprobs"
    assert served.summary["template"] == "server"
    assert served.tokens["token_id"].notna().all()
    # The same server, told to echo with the template rendered here: the same tokens and numbers.
    echoed = vllm_compat.score_reply(MESSAGES, REPLY, method="echo")
    assert echoed.method == "echo"
    assert echoed.summary["template"] == "render"
    for other in (echoed, by_echo):
        assert served.tokens["position"].tolist() == other.tokens["position"].tolist()
        assert served.tokens["token"].tolist() == other.tokens["token"].tolist()
        assert served.tokens["token_id"].tolist() == other.tokens["token_id"].tolist()
    assert served.tokens["logprob"].tolist() == pytest.approx(
        echoed.tokens["logprob"].tolist(), abs=1e-6
    )
    assert served.sum_logprob == pytest.approx(echoed.sum_logprob, abs=1e-6)
    # Our default server (another engine in this process) echoes the same numbers to float32's
    # last digits.
    assert served.tokens["logprob"].tolist() == pytest.approx(
        by_echo.tokens["logprob"].tolist(), abs=1e-5
    )


def test_async_twin(vllm_compat: nbc.Client, by_echo: nbc.ReplyScore) -> None:
    async def run() -> nbc.ReplyScore:
        return await vllm_compat.async_client.score_reply(MESSAGES, REPLY)

    assert asyncio.run(run()).sum_logprob == pytest.approx(by_echo.sum_logprob, abs=1e-6)


def test_a_template_unlike_the_servers_is_refused(embedded_client: nbc.Client) -> None:
    def other(messages: list[dict[str, Any]]) -> str:
        return "".join(f"{m['role']}> {m['content']}\n" for m in messages)

    with pytest.raises(ConformanceError, match=r"usage\.prompt_tokens") as caught:
        embedded_client.score_reply(MESSAGES, REPLY, template=other)
    assert caught.value.check == "chat_template"


def test_a_user_template_equal_to_the_servers_is_accepted(
    embedded_client: nbc.Client, by_echo: nbc.ReplyScore
) -> None:
    from nbcompletions.model import CHAT_TEMPLATE

    pytest.importorskip("jinja2")
    scored = embedded_client.score_reply(MESSAGES, REPLY, template=CHAT_TEMPLATE)
    assert scored.summary["template"] == "user"
    assert scored.sum_logprob == pytest.approx(by_echo.sum_logprob, abs=1e-6)


def test_an_unknown_model_without_tokenize_or_template_is_refused() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(404, json={"error": {"message": "not found"}})

    client = mock_client(handler, model="someone-elses-model", max_retries=0)
    with pytest.raises(ConformanceError, match="template=") as caught:
        client.score_reply(MESSAGES, REPLY)
    assert caught.value.check == "chat_template"
    assert seen == ["/tokenize", "/v1/chat/completions/render", "/apply-template"]


def test_prompt_logprobs_asked_of_a_server_without_them_is_refused(
    embedded_client: nbc.Client,
) -> None:
    with pytest.raises(ConformanceError, match="prompt_logprobs"):
        embedded_client.score_reply(MESSAGES, REPLY, method="prompt_logprobs")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((MESSAGES, ""), "reply"),
        ((MESSAGES, 3), "reply"),
        (([], REPLY), "messages"),
        (([{"role": "robot", "content": "x"}], REPLY), "messages"),
    ],
)
def test_bad_input_names_the_field(args: tuple[Any, Any], field: str) -> None:
    client = mock_client(lambda request: httpx.Response(500), max_retries=0)
    with pytest.raises(RequestError) as caught:
        client.score_reply(*args)
    assert str(caught.value.param).startswith(field)


def test_bad_method_and_template_name_the_field(embedded_client: nbc.Client) -> None:
    with pytest.raises(RequestError, match="auto, prompt_logprobs, echo") as caught:
        embedded_client.score_reply(MESSAGES, REPLY, method="guess")
    assert caught.value.param == "method"
    with pytest.raises(RequestError, match="callable") as caught:
        embedded_client.score_reply(MESSAGES, REPLY, template=3)
    assert caught.value.param == "template"


def test_a_vllm_without_chat_template_is_scored_by_echo_unverified(
    embedded_engine: Any, by_echo: nbc.ReplyScore
) -> None:
    # vLLM 0.32 serving a model with no chat template (measured): /tokenize with messages and
    # /v1/chat/completions are 400s ("default chat template is no longer allowed").
    real = StreamingASGITransport(create_app(embedded_engine, compat="vllm"))

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/tokenize", "/v1/chat/completions", RENDER):
            message = "default chat template is no longer allowed"
            return httpx.Response(400, json={"error": {"message": message, "code": 400}})
        return await real.handle_async_request(request)

    client = mock_client(
        handler, base_url="http://compat/v1", model="nbc-shakespeare", max_retries=0
    )
    scored = client.score_reply(MESSAGES, REPLY)
    assert (scored.method, scored.summary["template"]) == ("echo", "embedded")
    assert scored.summary["verified"] is False
    assert scored.tokens["token"].tolist() == by_echo.tokens["token"].tolist()
    assert scored.sum_logprob == pytest.approx(by_echo.sum_logprob, abs=1e-5)


def test_a_vllm_without_scale_out_is_scored_with_the_template_here(
    embedded_engine: Any, by_echo: nbc.ReplyScore
) -> None:
    # vLLM 0.32 mounts the render route only with --enable-scale-out; without it (measured) every
    # scale-out route answers 403 with this message.
    real = StreamingASGITransport(create_app(embedded_engine))

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == RENDER:
            message = (
                "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out "
                "to enable them."
            )
            error = {"message": message, "type": "PermissionDeniedError", "code": 403}
            return httpx.Response(403, json={"error": error})
        return await real.handle_async_request(request)

    client = mock_client(
        handler, base_url="http://embedded/v1", model="nbc-shakespeare", max_retries=0
    )
    scored = client.score_reply(MESSAGES, REPLY)
    assert (scored.method, scored.summary["template"]) == ("echo", "embedded")
    assert scored.summary["verified"] is True  # usage.prompt_tokens of the chat route agreed
    assert scored.tokens["token"].tolist() == by_echo.tokens["token"].tolist()
    assert scored.sum_logprob == pytest.approx(by_echo.sum_logprob, abs=1e-5)


def test_a_render_that_does_not_hold_the_reply_is_refused(embedded_engine: Any) -> None:
    # The render route answers for another reply than the one asked (a server whose rendering
    # rewrites the turn): the echoed span is not the reply, so nothing is scored.
    real = StreamingASGITransport(create_app(embedded_engine))

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == RENDER:
            body = json.loads(request.content)
            last = body["messages"][-1]
            if last["content"]:
                last["content"] = "Long live the king!"
            request = httpx.Request("POST", request.url, json=body)
        return await real.handle_async_request(request)

    client = mock_client(
        handler, base_url="http://embedded/v1", model="nbc-shakespeare", max_retries=0
    )
    with pytest.raises(ConformanceError, match="Long live the king") as caught:
        client.score_reply(MESSAGES, REPLY)
    assert caught.value.check == "reply_span"
