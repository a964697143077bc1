"""Sweep planning without a server: grid expansion, validation before sending, the budget."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcompletions import AsyncClient, BudgetError, Client, CompletionRequest, Limits, RequestError
from nbcompletions._grid import GridPoint, estimate_tokens, expand_grid
from nbcompletions._sweep import sweep


def _req(point: GridPoint) -> CompletionRequest:
    """A completion grid point's request (a grid's requests may be chat requests too)."""
    assert isinstance(point.request, CompletionRequest)
    return point.request


# Nothing listens on port 9 (discard): if a test sent anything it would get error rows, not the
# exceptions these tests expect.
UNREACHABLE = "http://127.0.0.1:9/v1"


@pytest.fixture
def client() -> AsyncClient:
    return AsyncClient(UNREACHABLE, api_key="sk-test", model="m", max_retries=0)


def test_cartesian_product_in_grid_order(client: AsyncClient) -> None:
    plan = expand_grid(client, ["A", "B"], temperature=[0.5, 1.0, 1.5], max_tokens=4, repeats=2)
    assert len(plan.points) == 2 * 3 * 2
    assert [p.request_id for p in plan.points] == list(range(12))
    got = [(p.prompt_id, _req(p).temperature, p.repeat) for p in plan.points[:4]]
    assert got == [(0, 0.5, 0), (0, 0.5, 1), (0, 1.0, 0), (0, 1.0, 1)]
    assert plan.points[6].request.prompt == "B"
    assert all(p.request.max_tokens == 4 for p in plan.points)
    assert plan.columns == ["prompt", "temperature", "max_tokens", "model"]
    assert plan.axes == {"prompt": 2, "temperature": 3, "repeat": 2}
    # Repeats of one grid point are different requests for the cache, same fields on the wire.
    assert plan.points[0].key != plan.points[1].key
    assert plan.points[0].request == plan.points[1].request


def test_prompt_forms(client: AsyncClient) -> None:
    named = expand_grid(client, {"hamlet": "To be", "tale": "Once"})
    assert [(p.prompt_id, _req(p).prompt) for p in named.points] == [
        ("hamlet", "To be"),
        ("tale", "Once"),
    ]
    one = expand_grid(client, "Hello")
    assert [(p.prompt_id, p.values["prompt"]) for p in one.points] == [(0, "Hello")]
    token_prompt = expand_grid(client, [464, 3290, 318])
    assert len(token_prompt.points) == 1
    assert token_prompt.points[0].request.prompt == [464, 3290, 318]
    assert token_prompt.points[0].values["prompt"] == "[464, 3290, 318]"
    token_axis = expand_grid(client, [[1, 2], [3]])
    assert [_req(p).prompt for p in token_axis.points] == [[1, 2], [3]]


def test_stop_is_an_axis_only_of_lists_or_none(client: AsyncClient) -> None:
    fixed = expand_grid(client, "x", stop=["\n", "."])
    assert len(fixed.points) == 1
    assert fixed.points[0].request.stop == ["\n", "."]
    assert fixed.points[0].values["stop"] == '["\\n", "."]'
    axis = expand_grid(client, "x", stop=[None, ["\n"], ["\n", "."]])
    assert [p.request.stop for p in axis.points] == [None, ["\n"], ["\n", "."]]
    assert expand_grid(client, "x", stop="\n").points[0].values["stop"] == "\n"


def test_dict_fields_and_numpy_axes(client: AsyncClient) -> None:
    plan = expand_grid(
        client,
        "x",
        logit_bias=[{"1": 5}, {"2": -100}],
        n=np.arange(1, 3),
        temperature=np.linspace(0.0, 1.0, 3),
        extra={"top_k": 5},
    )
    assert len(plan.points) == 2 * 2 * 3
    first = plan.points[0].request
    assert first.logit_bias == {"1": 5}
    assert type(first.n) is int  # numpy ints became Python ints, so validation accepts them
    assert type(first.temperature) is float
    assert first.extra == {"top_k": 5}
    assert plan.points[0].values["logit_bias"] == '{"1": 5}'
    assert expand_grid(client, "x", extra=[{"top_k": 1}, {"top_k": 2}]).axes["extra"] == 2


def test_invalid_point_fails_before_sending_naming_field_and_value(client: AsyncClient) -> None:
    with pytest.raises(
        RequestError, match=r"temperature must be a number from 0 to 2; got 3\.5"
    ) as info:
        expand_grid(client, ["a", "b"], temperature=[0.5, 3.5])
    assert info.value.param == "temperature"
    assert "sweep grid point" in str(info.value)
    with pytest.raises(RequestError, match="best_of"):
        expand_grid(client, "a", n=[1, 3], best_of=2)
    sync_client = Client(UNREACHABLE, api_key="sk-test", model="m", max_retries=0)
    try:
        with pytest.raises(RequestError, match="top_p"):
            sweep(sync_client, "a", top_p=[0.5, 1.5], progress=False, probe=False)
    finally:
        sync_client.close()


def test_client_limits_apply(client: AsyncClient) -> None:
    with pytest.raises(RequestError, match="logprobs"):
        expand_grid(client, "a", logprobs=[1, 10])
    vllm = AsyncClient(UNREACHABLE, api_key="k", model="m", limits=Limits.vllm())
    assert len(expand_grid(vllm, "a", logprobs=[1, 10]).points) == 2


def test_bad_arguments(client: AsyncClient) -> None:
    with pytest.raises(RequestError, match="'temprature' is not a Completions request field"):
        expand_grid(client, "a", temprature=[1.0])
    with pytest.raises(RequestError, match="temperature was given an empty list"):
        expand_grid(client, "a", temperature=[])
    with pytest.raises(RequestError, match="repeats must be an integer >= 1; got 0"):
        expand_grid(client, "a", repeats=0)
    with pytest.raises(RequestError, match="sweep needs a prompt"):
        expand_grid(client, None)
    with pytest.raises(RequestError, match="prompt must not be an empty dict"):
        expand_grid(client, {})


def test_estimate_counts_prompt_once_and_completions_for_best_of() -> None:
    token_request = CompletionRequest(prompt=[1, 2, 3], max_tokens=10, n=2, best_of=3)
    assert estimate_tokens([token_request]) == (3 + 10 * 3, "characters / 4")
    text_request = CompletionRequest(prompt="abcdefghi")  # 9 chars -> 3 tokens; max_tokens 16
    assert estimate_tokens([text_request, text_request])[0] == 2 * (3 + 16)
    batch = CompletionRequest(prompt=["abcd", "abcd"], max_tokens=1)
    assert estimate_tokens([batch])[0] == 2 * (1 + 1)


def test_budget_refuses_before_sending(client: AsyncClient) -> None:
    sync_client = Client(UNREACHABLE, api_key="sk-test", model="m", max_retries=0)
    try:
        with pytest.raises(BudgetError) as info:
            sweep(
                sync_client,
                ["abcd", "efgh"],
                temperature=[0.5, 1.0],
                max_tokens=100,
                repeats=5,
                budget=1000,
                progress=False,
                probe=False,
            )
    finally:
        sync_client.close()
    # 20 requests x (1 prompt token by chars/4 + 100 completion tokens)
    assert info.value.estimate == 20 * 101
    assert info.value.budget == 1000
    assert "2,020" in str(info.value)
    assert "budget=1,000" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(RequestError, match="budget must be"):
        sweep(client, "a", budget=-1, progress=False)
    with pytest.raises(RequestError, match="max_concurrency must be"):
        sweep(client, "a", max_concurrency=0, progress=False)


@given(
    n_prompts=st.integers(1, 3),
    temperatures=st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0]), min_size=1, max_size=3),
    top_ps=st.one_of(st.none(), st.lists(st.sampled_from([0.1, 0.9, 1.0]), min_size=1, max_size=2)),
    repeats=st.integers(1, 3),
)
@settings(max_examples=40, deadline=None)
def test_grid_is_the_product_in_order(
    n_prompts: int, temperatures: list[float], top_ps: list[float] | None, repeats: int
) -> None:
    client = AsyncClient(UNREACHABLE, api_key="sk-test", model="m")
    prompts = [f"p{i}" for i in range(n_prompts)]
    fields: dict[str, object] = {"temperature": temperatures}
    if top_ps is not None:
        fields["top_p"] = top_ps
    plan = expand_grid(client, prompts, repeats=repeats, **fields)
    expected = [
        (p, t, tp, r)
        for p in prompts
        for t in temperatures
        for tp in (top_ps if top_ps is not None else [None])
        for r in range(repeats)
    ]
    got = [(_req(pt).prompt, _req(pt).temperature, _req(pt).top_p, pt.repeat) for pt in plan.points]
    assert got == expected
    assert [pt.request_id for pt in plan.points] == list(range(len(expected)))
    # Keys identify (request, repeat): equal exactly where both are equal.
    by_key: dict[str, tuple[object, ...]] = {}
    for pt, item in zip(plan.points, expected, strict=True):
        assert by_key.setdefault(pt.key, item) == item


def test_field_named_like_a_frame_column_is_prefixed(client: AsyncClient) -> None:
    plan = expand_grid(client, "x", echo=[True, False], max_tokens=1)
    assert plan.columns == ["prompt", "request_echo", "max_tokens", "model"]
    assert [p.values["request_echo"] for p in plan.points] == [True, False]
    assert [_req(p).echo for p in plan.points] == [True, False]
