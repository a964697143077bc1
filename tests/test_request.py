"""CompletionRequest validation: each field, its range, and a message naming field, range, value."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcompletions import CompletionRequest, Limits, RequestError
from nbcompletions._request import FIELDS, prompt_count


def _error(**fields: object) -> RequestError:
    with pytest.raises(RequestError) as info:
        # Each test passes a value of the wrong type or range on purpose, to see it refused.
        CompletionRequest(**{"prompt": "x", **fields})  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", 2.5, "from 0 to 2"),
        ("temperature", -0.1, "from 0 to 2"),
        ("temperature", math.nan, "from 0 to 2"),
        ("temperature", "hot", "from 0 to 2"),
        ("top_p", 1.5, "from 0 to 1"),
        ("frequency_penalty", -2.5, "from -2 to 2"),
        ("presence_penalty", 3, "from -2 to 2"),
        ("n", 0, "from 1 to 128"),
        ("n", 129, "from 1 to 128"),
        ("n", 2.0, "from 1 to 128"),
        ("n", True, "from 1 to 128"),
        ("best_of", 21, "from 1 to 20"),
        ("logprobs", 6, "from 0 to 5"),
        ("logprobs", -1, "from 0 to 5"),
        ("max_tokens", -1, ">= 0"),
        ("seed", 1.5, "integer"),
        ("echo", "yes", "true or false"),
        ("stream", 1, "true or false"),
        ("suffix", 3, "a string"),
        ("user", 3, "a string"),
    ],
)
def test_out_of_range_names_field_range_and_value(field: str, value: object, allowed: str) -> None:
    err = _error(**{field: value})
    assert err.param == field
    message = str(err)
    assert message.startswith(field)
    assert allowed in message
    assert repr(value) in message
    assert isinstance(err, ValueError)


def test_best_of_must_cover_n() -> None:
    err = _error(n=3, best_of=2)
    assert err.param == "best_of"
    assert ">= n (3)" in str(err)
    assert "got 2" in str(err)
    CompletionRequest(prompt="x", n=3, best_of=3)


def test_best_of_not_with_stream() -> None:
    err = _error(best_of=2, stream=True)
    assert err.param == "best_of"
    assert "stream" in str(err)
    CompletionRequest(prompt="x", best_of=1, stream=True)


def test_stream_options_only_with_stream() -> None:
    assert _error(stream_options={"include_usage": True}).param == "stream_options"
    CompletionRequest(prompt="x", stream=True, stream_options={"include_usage": True})
    assert (
        _error(stream=True, stream_options={"include_usage": "y"}).param
        == "stream_options.include_usage"
    )


@pytest.mark.parametrize("stop", ["", ["a", "b", "c", "d", "e"], [""], ["a", 1], 5])
def test_bad_stop(stop: object) -> None:
    err = _error(stop=stop)
    assert err.param == "stop"
    assert "up to 4" in str(err)


def test_good_stop_and_tuple_normalised() -> None:
    # A tuple is outside the declared type but accepted at run time: the normalisation under test.
    assert CompletionRequest(prompt="x", stop=("a", "b")).stop == ["a", "b"]  # type: ignore[arg-type]
    assert CompletionRequest(prompt="x", stop="\n").stop == "\n"


@pytest.mark.parametrize(
    ("bias", "needle"),
    [
        ({"abc": 1}, "'abc'"),
        ({"5": 101}, "-100 to 100"),
        ({"5": math.inf}, "-100 to 100"),
        ({"-3": 1}, "'-3'"),
        ("5:1", "token id"),
    ],
)
def test_bad_logit_bias(bias: object, needle: str) -> None:
    err = _error(logit_bias=bias)
    assert err.param == "logit_bias"
    assert needle in str(err)


def test_logit_bias_int_keys_become_strings() -> None:
    # int keys are outside the declared type but accepted at run time: the conversion under test.
    request = CompletionRequest(prompt="x", logit_bias={50256: -100, "13": 5.5})  # type: ignore[dict-item]
    assert request.to_body()["logit_bias"] == {"50256": -100, "13": 5.5}


@pytest.mark.parametrize(
    "prompt", [[], [[]], [1, -2], ["a", 1], [[1, 2], []], {"a": 1}, None, 3, [1.5], [True]]
)
def test_bad_prompt_forms(prompt: object) -> None:
    err = _error(prompt=prompt)
    assert err.param == "prompt"


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("hi", 1), ("", 1), (["a", "b"], 2), ([1, 2, 3], 1), ([[1], [2, 3]], 2), (("a", "b"), 2)],
)
def test_prompt_forms_and_count(prompt: object, count: int) -> None:
    request = CompletionRequest(prompt=prompt)
    assert request.n_prompts == count == prompt_count(request.prompt)


def test_limits_are_a_client_setting() -> None:
    with pytest.raises(RequestError, match="from 0 to 5; got 20"):
        CompletionRequest(prompt="x", logprobs=20)
    assert CompletionRequest(prompt="x", logprobs=20, limits=Limits.vllm()).logprobs == 20
    assert CompletionRequest(prompt="x", logprobs=100, limits=Limits.llamacpp()).logprobs == 100
    with pytest.raises(RequestError, match=r"logprobs must be an integer >= 0; got -1"):
        CompletionRequest(prompt="x", logprobs=-1, limits=Limits.llamacpp())


def test_body_round_trip_and_extra() -> None:
    body = {
        "model": "m",
        "prompt": ["a", "b"],
        "n": 2,
        "best_of": 3,
        "logprobs": 2,
        "echo": True,
        "top_k": 40,
        "temperature": None,
    }
    request = CompletionRequest.from_body(body, require_model=True)
    assert request.extra == {"top_k": 40}
    assert request.temperature is None
    sent = request.to_body()
    assert sent == {
        "model": "m",
        "prompt": ["a", "b"],
        "n": 2,
        "best_of": 3,
        "logprobs": 2,
        "echo": True,
        "top_k": 40,
    }
    assert CompletionRequest.from_body(sent) == request


def test_from_body_requires_model_and_object() -> None:
    with pytest.raises(RequestError) as info:
        CompletionRequest.from_body({"prompt": "x"}, require_model=True)
    assert info.value.param == "model"
    with pytest.raises(RequestError, match="JSON object"):
        CompletionRequest.from_body([1, 2])  # type: ignore[arg-type]  # the refusal under test


def test_extra_cannot_shadow_standard_fields() -> None:
    assert _error(extra={"temperature": 5}).param == "extra"


def test_replace_revalidates() -> None:
    request = CompletionRequest(prompt="x", temperature=1.0)
    assert request.replace(temperature=0.5).temperature == 0.5
    with pytest.raises(RequestError):
        request.replace(temperature=9)


def test_fields_cover_the_reference() -> None:
    assert set(FIELDS) == {
        "model",
        "prompt",
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "suffix",
        "temperature",
        "top_p",
        "user",
    }


# -- properties ------------------------------------------------------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)
# No deadline, as the suite's other property tests: Hypothesis's default (200 ms per example) is a
# wall-clock limit that a loaded machine can overrun, failing a check that is not about speed.
no_deadline = settings(deadline=None)


@no_deadline
@given(temperature=finite, top_p=finite, penalty=finite)
def test_float_ranges_property(temperature: float, top_p: float, penalty: float) -> None:
    ok = 0 <= temperature <= 2 and 0 <= top_p <= 1 and -2 <= penalty <= 2
    if ok:
        CompletionRequest(
            prompt="x", temperature=temperature, top_p=top_p, presence_penalty=penalty
        )
        return
    with pytest.raises(RequestError) as info:
        CompletionRequest(
            prompt="x", temperature=temperature, top_p=top_p, presence_penalty=penalty
        )
    assert info.value.param in {"temperature", "top_p", "presence_penalty"}
    assert repr(info.value.value) in str(info.value)


@no_deadline
@given(
    n=st.integers(-5, 200), best_of=st.one_of(st.none(), st.integers(-5, 40)), stream=st.booleans()
)
def test_n_best_of_property(n: int, best_of: int | None, stream: bool) -> None:
    ok = 1 <= n <= 128 and (
        best_of is None or (1 <= best_of <= 20 and best_of >= n and not (stream and best_of > 1))
    )
    if ok:
        assert CompletionRequest(prompt="x", n=n, best_of=best_of, stream=stream).effective_n == n
        return
    with pytest.raises(RequestError) as info:
        CompletionRequest(prompt="x", n=n, best_of=best_of, stream=stream)
    assert info.value.param in {"n", "best_of"}


@no_deadline
@given(st.dictionaries(st.integers(0, 100_000), st.integers(-150, 150), max_size=5))
def test_logit_bias_property(bias: dict[int, int]) -> None:
    # int keys are outside the declared type but accepted at run time (the ignores below).
    ok = all(-100 <= v <= 100 for v in bias.values())
    if not ok:
        with pytest.raises(RequestError) as info:
            CompletionRequest(prompt="x", logit_bias=bias)  # type: ignore[arg-type]
        assert info.value.param == "logit_bias"
        return
    request = CompletionRequest(prompt="x", logit_bias=bias)  # type: ignore[arg-type]
    assert request.to_body().get("logit_bias", {}) == {str(k): v for k, v in bias.items()}


@no_deadline
@given(
    st.one_of(
        st.text(max_size=20),
        st.lists(st.text(max_size=5), min_size=1, max_size=4),
        st.lists(st.integers(0, 1000), min_size=1, max_size=8),
        st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=4), min_size=1, max_size=3),
    )
)
def test_valid_prompt_forms_property(prompt: object) -> None:
    request = CompletionRequest(prompt=prompt)
    assert CompletionRequest.from_body(request.to_body()) == request


@pytest.mark.parametrize("field", ["prompt", "stop", "suffix", "user"])
def test_lone_surrogates_are_refused_naming_the_field(field: str) -> None:
    err = _error(**{field: "a\ud800b"})
    assert err.param == field
    assert "lone surrogate at character 1" in str(err)
    assert _error(prompt=["ok", "\udfff"]).param == "prompt"
    assert _error(stop=["ok", "\udfff"]).param == "stop"


# -- issue 9: input edge cases -------------------------------------------------------------------
@pytest.mark.parametrize(
    "key", ["\u00b2", "\u0663", "\uff10", "1\u00b2", "\u0661\u0662", "+5", " 5", "5 "]
)
def test_logit_bias_keys_must_be_ascii_decimal_digits(key: str) -> None:
    # "²" passes str.isdigit() but int() fails; "٣" and "０" pass int() and would be read as ids.
    err = _error(logit_bias={key: 1})
    assert err.param == "logit_bias"
    assert repr(key) in str(err)
    assert "ASCII" in str(err)


def test_empty_stop_list_means_no_stop() -> None:
    # vLLM takes [] as "no stop strings"; lm-evaluation-harness sends it.
    request = CompletionRequest(prompt="x", stop=[])
    assert request.stop == []
    assert request.to_body()["stop"] == []


def test_huge_values_are_shortened_in_error_messages() -> None:
    huge = "x" * 600_000
    for fields in ({"prompt": [huge, 3]}, {"stop": [huge] * 5}, {"user": 5, "suffix": huge * 0}):
        err = _error(**fields)
        assert len(str(err)) < 2_000
    err = _error(prompt=[huge, 3])
    assert "600,007 characters" in str(err)  # it says how long the value was
    assert err.value == [huge, 3]  # the attribute keeps the whole value for programs


def test_vllm_limits_lift_the_stop_cap_and_check_its_sampling_fields() -> None:
    vllm = Limits.vllm()
    stops = [str(i) for i in range(10)]
    assert CompletionRequest(prompt="x", stop=stops, limits=vllm).stop == stops
    request = CompletionRequest(
        prompt="x", extra={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3}, limits=vllm
    )
    assert request.to_body()["top_k"] == 5
    assert CompletionRequest(prompt="x", extra={"top_k": -1}, limits=vllm).extra == {"top_k": -1}
    for field, value, allowed in [
        ("top_k", -2, "-1"),
        ("top_k", 1.5, "integer"),
        ("top_k", True, "integer"),
        ("min_p", 1.5, "from 0 to 1"),
        ("min_p", math.nan, "from 0 to 1"),
        ("repetition_penalty", 0, "> 0"),
        ("repetition_penalty", math.inf, "> 0"),
        ("repetition_penalty", "1", "> 0"),
    ]:
        with pytest.raises(RequestError) as info:
            CompletionRequest(prompt="x", extra={field: value}, limits=vllm)
        assert info.value.param == field
        assert allowed in str(info.value)
        assert repr(value) in str(info.value)
    # OpenAI's profile keeps its cap, and leaves extra fields to the server.
    with pytest.raises(RequestError, match="up to 4"):
        CompletionRequest(prompt="x", stop=stops)
    assert CompletionRequest(prompt="x", extra={"top_k": -7}).extra == {"top_k": -7}
