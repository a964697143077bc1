"""One rule for values (`nbcompletions._checks`): numpy integers are integers everywhere, bools are
never numbers, and a value read from a response is a finite float or None."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nbcompletions
from nbcompletions import CompletionRequest, RequestError, to_frames
from nbcompletions._checks import (
    check_int,
    check_number,
    check_optional_count,
    finite_float,
    is_int,
    is_number,
    positive_int,
)

PACKAGE = Path(nbcompletions.__file__).parent


@pytest.mark.parametrize("value", [0, 5, -3, np.int64(5), np.int32(-1), np.uint8(7), 10**30])
def test_integers_are_python_and_numpy_ints(value: object) -> None:
    assert is_int(value)
    assert is_number(value)


@pytest.mark.parametrize("value", [True, False, np.True_, 5.0, np.float64(5), "5", None, [5]])
def test_bools_floats_and_text_are_not_integers(value: object) -> None:
    assert not is_int(value)


@pytest.mark.parametrize("value", [True, False, np.True_, "1.5", None, 1j])
def test_bools_are_not_numbers(value: object) -> None:
    assert not is_number(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (-0.5, -0.5), (np.float32(0.25), 0.25), (np.int64(-3), -3.0), (-9999.0, -9999.0)],
)
def test_finite_float_reads_numbers(value: object, expected: float) -> None:
    result = finite_float(value)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    "value", [math.inf, -math.inf, math.nan, np.float64("-inf"), 10**400, True, "0.5", None]
)
def test_finite_float_reads_infinity_nan_and_non_numbers_as_unknown(value: object) -> None:
    # The one decision on infinity: a logprob of -Infinity (only the stdlib reads it; vLLM writes
    # -9999) is unknown, as a null is, everywhere a response is read.
    assert finite_float(value) is None


def test_positive_int() -> None:
    assert positive_int(np.int64(1024)) == 1024
    assert type(positive_int(np.int64(1024))) is int
    assert [positive_int(v) for v in (0, -1, True, 3.0, None)] == [None] * 5


def test_checks_name_the_field_the_range_and_the_value() -> None:
    assert check_int("n", np.int64(3), 1, 5) == 3
    assert type(check_int("n", np.int64(3), 1, 5)) is int
    with pytest.raises(RequestError, match=r"^n must be an integer from 1 to 5; got 6$"):
        check_int("n", 6, 1, 5)
    with pytest.raises(RequestError, match=r"^n must be an integer from 1 to 5; got True$"):
        check_int("n", True, 1, 5)
    with pytest.raises(RequestError, match=r"^top_p must be a number from 0 to 1; got inf$"):
        check_number("top_p", math.inf, 0.0, 1.0)
    with pytest.raises(RequestError, match=r"^top_p must be a number from 0 to 1; got False$"):
        check_number("top_p", False, 0.0, 1.0)
    assert check_optional_count("threads", np.int16(2)) == 2
    with pytest.raises(RequestError, match=r"^threads must be an integer >= 1 or None; got 2.5$"):
        check_optional_count("threads", 2.5)


def test_a_request_takes_numpy_values_and_sends_python_ones() -> None:
    request = CompletionRequest(
        prompt=list(np.array([3, 4])),
        max_tokens=np.int64(5),
        n=np.int32(2),
        logprobs=np.int64(1),
        seed=np.uint32(7),
        temperature=np.float32(0.5),
        logit_bias={np.int64(3): np.float64(-1)},
    )
    assert request == CompletionRequest(
        prompt=[3, 4], max_tokens=5, n=2, logprobs=1, seed=7, temperature=0.5, logit_bias={"3": -1}
    )
    body = request.to_body()
    assert type(body["max_tokens"]) is int
    assert type(body["prompt"][0]) is int
    json.dumps(body)  # no numpy scalar left to refuse


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", True), ("n", False), ("temperature", True), ("max_tokens", np.float64(5))],
)
def test_a_request_refuses_bools_as_numbers(field: str, value: object) -> None:
    fields: dict[str, Any] = {field: value}
    with pytest.raises(RequestError, match=f"^{field} must be"):
        CompletionRequest(prompt="x", **fields)


def test_frames_take_numpy_counts_like_requests() -> None:
    body = {"choices": [{"index": 0, "text": "a", "finish_reason": "length"}]}
    choices, _, _ = to_frames(body, {"n": np.int64(1), "max_tokens": np.int64(1)})
    assert len(choices) == 1
    with pytest.raises(ValueError, match="n must be an integer >= 1; got True"):
        to_frames(body, {"n": True})


def test_one_copy_of_the_rule() -> None:
    # The copies this module replaced must not come back.
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_checks.py" or "plots" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for name in ("def _is_int(", "def _number(", "def _is_number(", "def _int_or_none("):
            assert name not in text, f"{path.name} defines its own {name[4:-1]}"


@pytest.mark.parametrize("threads", [2.5, 0, True, "2"])
def test_the_engine_refuses_bad_threads_before_loading(
    tiny_model_dir: Path, threads: object
) -> None:
    from nbcompletions.model._engine import Engine

    with pytest.raises(RequestError, match=r"^threads must be an integer >= 1 or None; got "):
        Engine.from_dir(tiny_model_dir, threads=threads)  # type: ignore[arg-type]
    # Refused before anything is read: a folder that does not exist says the same.
    with pytest.raises(RequestError, match="threads must be"):
        Engine.from_dir(tiny_model_dir / "missing", threads=threads)  # type: ignore[arg-type]


def test_the_engine_takes_numpy_threads(tiny_model_dir: Path) -> None:
    from nbcompletions.model._engine import Engine

    engine = Engine.from_dir(tiny_model_dir, threads=np.int64(2), compiled=False)
    assert engine.threads == 2
    assert type(engine.threads) is int


def test_scoring_and_endpoint_checks_read_a_response_alike() -> None:
    """The two readers that had their own `_number` (one kept infinities, one did not) now read
    the same values: -Infinity and NaN (the stdlib parses both) as unknown, a bool offset as
    none."""
    from nbcompletions._conformance_checks import logprob_rows
    from nbcompletions._parse import loads
    from nbcompletions._scoring import echo_columns

    text = (
        '{"choices": [{"index": 0, "text": "abc", "logprobs": {"tokens": ["a", "b", "c"], '
        '"token_logprobs": [null, -Infinity, NaN], "top_logprobs": null, '
        '"text_offset": [0, 1, true]}}]}'
    )
    raw = loads(text)
    columns = echo_columns(raw)
    rows = logprob_rows(raw["choices"][0])
    assert columns is not None
    assert rows is not None
    assert columns.logprobs == rows.logprobs == [None, None, None]
    assert columns.offsets == rows.offsets == [0, 1, None]
