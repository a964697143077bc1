"""The client end to end: the embedded model in-process, and `nbcompletions serve` over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nbcompletions import APIError, AsyncClient, Client, Completion, RequestError
from nbcompletions._endpoint import Target

MODEL = "nbc-shakespeare"


def _comparable(completion: Completion) -> dict[str, Any]:
    # id and created differ between two requests; everything else must match.
    raw = dict(completion.raw)
    raw.pop("id", None)
    raw.pop("created", None)
    return raw


@pytest.fixture(scope="module")
def live_client(live_server: str) -> Any:
    client = Client(live_server)
    yield client
    client.close()


@pytest.fixture(params=["embedded", "live"])
def client(request: pytest.FixtureRequest) -> Client:
    name = "embedded_client" if request.param == "embedded" else "live_client"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]  # pytest types it Any


def test_embedded_client_needs_no_configuration(embedded_client: Client) -> None:
    assert embedded_client.embedded
    assert embedded_client.endpoint == "http://embedded/v1"
    assert embedded_client.model == MODEL
    assert repr(embedded_client) == "Client(endpoint='http://embedded/v1', model='nbc-shakespeare')"


def test_vocab_size_is_the_embedded_models(embedded_client: Client, embedded_engine: Any) -> None:
    assert embedded_client.vocab_size == embedded_engine.vocab_size


def test_models(client: Client) -> None:
    assert client.models() == [MODEL]


def test_complete(client: Client) -> None:
    completion = client.complete("ROMEO:", max_tokens=5, seed=1)
    assert isinstance(completion, Completion)
    assert completion.model == MODEL
    assert completion.raw["object"] == "text_completion"
    assert completion.finish_reason in ("stop", "length")
    assert completion.text == completion.raw["choices"][0]["text"]
    usage = completion.usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 5


def test_logprobs_and_frames(client: Client) -> None:
    completion = client.complete("ROMEO:", max_tokens=6, logprobs=3, seed=2)
    logprobs = completion.raw["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == completion.usage["completion_tokens"]
    assert all(len(top) >= 3 for top in logprobs["top_logprobs"])
    tokens = completion.tokens
    assert list(tokens["token"]) == logprobs["tokens"]
    assert not tokens["echo"].any()
    assert len(completion.alternatives) >= 3 * len(tokens)
    assert completion.choices.loc[0, "text"] == completion.text
    assert completion.frames() is completion.frames()  # built once


def test_echo_scores_the_prompt(client: Client) -> None:
    completion = client.complete("To be, or not to be", max_tokens=0, echo=True, logprobs=1)
    logprobs = completion.raw["choices"][0]["logprobs"]
    assert completion.text == "To be, or not to be"
    assert logprobs["token_logprobs"][0] is None
    assert all(isinstance(v, float) for v in logprobs["token_logprobs"][1:])
    assert completion.tokens["echo"].all()


def test_n_and_several_prompts(client: Client) -> None:
    completion = client.complete(["ROMEO:", "JULIET:"], n=3, max_tokens=3, seed=3)
    assert [c["index"] for c in completion.raw["choices"]] == list(range(6))
    choices = completion.choices
    assert list(choices["prompt_index"]) == [0, 0, 0, 1, 1, 1]
    assert list(choices["choice"]) == [0, 1, 2, 0, 1, 2]


def test_same_seed_same_completion(client: Client) -> None:
    first = client.complete("ROMEO:", max_tokens=8, seed=11, temperature=1.0)
    second = client.complete("ROMEO:", max_tokens=8, seed=11, temperature=1.0)
    assert first.text == second.text
    # An engine that ignored the seed (or always said the same) would pass the lines above.
    others = {
        client.complete("ROMEO:", max_tokens=8, seed=s, temperature=1.0).text for s in (12, 13)
    }
    assert others - {first.text}, "different seeds gave the same text"


def test_stream_pieces_add_up_to_the_merged_completion(client: Client) -> None:
    stream = client.stream("ROMEO:", max_tokens=12, n=2, seed=5)
    pieces = list(stream)
    assert {piece.index for piece in pieces} == {0, 1}
    merged = stream.completion()
    for index in (0, 1):
        text = "".join(p.text for p in pieces if p.index == index)
        assert text == merged.raw["choices"][index]["text"]
    finals = [p for p in pieces if p.finish_reason is not None]
    assert sorted(p.index for p in finals) == [0, 1]


def test_stream_merge_equals_non_stream_with_the_same_seed(client: Client) -> None:
    fields: dict[str, Any] = {"max_tokens": 10, "n": 2, "seed": 9, "logprobs": 2}
    plain = client.complete("ROMEO:", **fields)
    streamed = client.complete(
        "ROMEO:", stream=True, stream_options={"include_usage": True}, **fields
    )
    assert _comparable(streamed) == _comparable(plain)
    assert streamed.usage == plain.usage


def test_stream_merge_equals_non_stream_with_echo(client: Client) -> None:
    fields: dict[str, Any] = {"max_tokens": 6, "seed": 4, "logprobs": 2, "echo": True}
    plain = client.complete("ROMEO:", **fields)
    streamed = client.complete("ROMEO:", stream=True, **fields)
    assert streamed.raw["choices"] == plain.raw["choices"]


def test_server_side_errors_are_api_errors(client: Client) -> None:
    with pytest.raises(APIError) as info:
        client.complete("ROMEO:", max_tokens=100_000)
    assert (info.value.status, info.value.param) == (400, "max_tokens")
    with pytest.raises(APIError) as info:
        client.complete("ROMEO:", model="no-such-model", max_tokens=1)
    assert info.value.status == 404
    with pytest.raises(APIError) as info:
        list(client.stream("ROMEO:", max_tokens=100_000))
    assert info.value.param == "max_tokens"


def test_client_side_validation_happens_first(client: Client) -> None:
    with pytest.raises(RequestError, match="top_p"):
        client.complete("ROMEO:", top_p=1.5)


def test_sync_call_inside_a_running_loop(embedded_client: Client) -> None:
    async def cell() -> str:
        return embedded_client.complete("ROMEO:", max_tokens=3, seed=1).text

    assert asyncio.run(cell()) == embedded_client.complete("ROMEO:", max_tokens=3, seed=1).text


async def test_async_client_embedded_and_live(live_server: str) -> None:
    needs = []
    async with AsyncClient() as embedded, AsyncClient(live_server) as live:
        for client in (embedded, live):
            completions = await asyncio.gather(
                *(client.complete("ROMEO:", max_tokens=4, seed=i) for i in range(4))
            )
            needs.append([c.text for c in completions])
            pieces = [p.text async for p in client.stream("ROMEO:", max_tokens=4, seed=0)]
            assert "".join(pieces) == completions[0].text
    assert needs[0] == needs[1]  # the same model in-process and over HTTP


def test_replicas_over_real_http(live_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two base URLs naming the same server (as two replicas would); both are used and agree.
    replica = live_server.replace("127.0.0.1", "localhost")
    pick = Target.pick
    used: list[str] = []

    def recording_pick(*args: Any, **kwargs: Any) -> Any:
        endpoint = pick(*args, **kwargs)
        used.append(endpoint.url)
        return endpoint

    # Wrap the real picker to record which endpoint each request went to.
    monkeypatch.setattr(Target, "pick", recording_pick)
    with Client([live_server, replica]) as client:
        assert client.endpoints == [live_server, replica]
        texts = {client.complete("ROMEO:", max_tokens=4, seed=3).text for _ in range(4)}
    assert len(texts) == 1
    # Five picks: GET /models (the model is discovered, as none was given), then four completions.
    assert len(used) == 5
    assert abs(used.count(live_server) - used.count(replica)) == 1
