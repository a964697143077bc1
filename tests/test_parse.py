"""The response side's one parser: choices, logprobs in both shapes, finished streams."""

from __future__ import annotations

from typing import Any

import pytest

from nbcompletions._parse import (
    FinishedChoices,
    choice_index,
    first_choice,
    parse_logprobs,
    prompt_tokens,
    sorted_choices,
    top_items,
)


def test_completions_shape_is_padded_and_nulls_kept() -> None:
    tokens, logprobs, tops, offsets = parse_logprobs(
        {"tokens": ["a", "b"], "token_logprobs": [None], "top_logprobs": [None, {"b": None}]}
    )
    assert tokens == ["a", "b"]
    assert logprobs == [None, None]
    assert tops == [None, {"b": None}]
    assert offsets is None  # unsent, not zeros


def test_chat_shape_keeps_duplicate_tokens_and_null_logprobs() -> None:
    content = [
        {
            "token": "",
            "logprob": -0.5,
            "top_logprobs": [
                {"token": "", "logprob": -0.5},
                {"token": "", "logprob": None},
            ],
        }
    ]
    tokens, logprobs, tops, offsets = parse_logprobs({"content": content})
    assert (tokens, logprobs, offsets) == ([""], [-0.5], None)
    assert top_items(tops[0]) == [("", -0.5), ("", None)]


def test_missing_logprob_fields_give_empty_columns() -> None:
    assert parse_logprobs({}) == ([], [], [], None)
    assert parse_logprobs({"content": None}) == ([], [], [], None)


@pytest.mark.parametrize(
    ("logprobs", "message"),
    [
        ({"tokens": 5}, r"logprobs\.tokens must be a list or null; got int"),
        ({"content": ["x"]}, r"logprobs\.content\[0\] must be an object"),
    ],
)
def test_wrong_kinds_name_the_field(logprobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_logprobs(logprobs)


def test_top_items_of_each_entry_shape() -> None:
    assert top_items(None) == []
    assert top_items({"a": -1.0, "b": -2.0}) == [("a", -1.0), ("b", -2.0)]
    with pytest.raises(ValueError, match="list entries must be objects"):
        top_items([3])
    with pytest.raises(ValueError, match="got str"):
        top_items("a")


def test_choices_are_read_in_index_order() -> None:
    response = {
        "choices": [{"index": 2, "text": "c"}, "junk", {"index": 0, "text": "a"}],
        "usage": {"prompt_tokens": 4},
    }
    assert [c["text"] for c in sorted_choices(response)] == ["a", "c"]
    assert first_choice(response) == {"index": 0, "text": "a"}
    assert first_choice({"choices": None}) is None
    assert prompt_tokens(response) == 4
    assert prompt_tokens({"usage": {"prompt_tokens": True}}) is None
    assert choice_index({"index": True}, 7) == 7


def test_finished_choices() -> None:
    finished = FinishedChoices()
    assert finished.unfinished  # nothing seen
    finished.add({"choices": [{"index": 0, "text": "a"}, {"index": 1, "finish_reason": "stop"}]})
    assert finished.unfinished
    finished.add({"choices": [{"index": 0, "finish_reason": "length"}]})
    finished.add({"choices": [], "usage": {}})
    assert not finished.unfinished


def test_loads_reads_what_the_stdlib_reads() -> None:
    from nbcompletions._parse import loads

    assert loads(b'{"a": [1, 2.5, null, "\\u00e9"]}') == {"a": [1, 2.5, None, "\u00e9"]}
    # Servers write a -inf logprob as -Infinity; orjson refuses it, the stdlib fallback reads it.
    assert loads(b'{"x": -Infinity}') == {"x": float("-inf")}
    assert loads(str(2**70)) == 2**70
    with pytest.raises(ValueError, match="Expecting property name"):
        loads(b"{not json")


def test_a_body_nested_past_any_parser_is_a_value_error() -> None:
    # orjson refuses it (depth 1024) and hands it to the stdlib, whose RecursionError is not what
    # callers catch: a hostile server must get the client's usual "not JSON" error.
    from nbcompletions._parse import loads

    with pytest.raises(ValueError, match="nested"):
        loads(b"[" * 100_000 + b"]" * 100_000)


def test_the_client_reports_a_too_deep_body_as_an_invalid_response() -> None:
    import httpx
    from helpers import mock_client

    from nbcompletions import APIError

    body = b'{"choices":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    client = mock_client(lambda request: httpx.Response(200, content=body), max_retries=0)
    with client, pytest.raises(APIError) as info:
        client.complete("x")
    assert info.value.type == "invalid_response"


def test_escaped_surrogates_parse_to_encodable_text() -> None:
    """A pair is joined, a lone half becomes U+FFFD (keys too); valid text is untouched."""
    from nbcompletions._parse import loads

    assert loads(b'{"t": "\\ud83d\\ude00"}') == {"t": "\U0001f600"}
    assert loads('{"t": ["\\ud83d", "x\\ude00y"], "\\udc00": 1}') == {
        "t": ["\ufffd", "x\ufffdy"],
        "\ufffd": 1,
    }
    assert loads(b'{"t": "\\\\ud800 is how you write it", "v": -Infinity}') == {
        "t": "\\ud800 is how you write it",
        "v": float("-inf"),
    }
    for value in loads(b'["\\ud800", "\\u00e9"]'):
        value.encode("utf-8")


def test_chat_shaped_byte_tokens_are_read_from_bytes() -> None:
    """Issue 16 case 13: llama-server and llama-cpp-python send byte-level tokens as "" with a
    ``bytes`` list; read from it they stay apart (and whole characters read as text)."""
    from nbcompletions._frames import to_frames

    def entry(raw: bytes, logprob: float) -> dict[str, Any]:
        text = raw.decode("utf-8", "ignore")
        return {"id": 1, "token": text, "bytes": list(raw), "logprob": logprob}

    content = [
        {
            **entry(b"\xe2\x80", -0.5),
            "top_logprobs": [entry(b"\xe2\x80", -0.5), entry(b"\xe2\x81", -1.5), entry(b"a", -2)],
        },
        {**entry("é".encode(), -0.1), "top_logprobs": [entry("é".encode(), -0.1)]},
    ]
    tokens, _, tops, _ = parse_logprobs({"content": content})
    assert tokens == ["bytes:\\xe2\\x80", "é"]
    assert top_items(tops[0]) == [("bytes:\\xe2\\x80", -0.5), ("bytes:\\xe2\\x81", -1.5), ("a", -2)]
    body = {"choices": [{"index": 0, "text": "é", "logprobs": {"content": content}}]}
    _, token_frame, alternatives = to_frames(body)
    assert token_frame["token_display"].tolist() == ["<0xE2><0x80>", "é"]
    assert token_frame["rank"].tolist() == [1, 1]
    assert alternatives["chosen"].tolist() == [True, False, False, True]


@pytest.mark.parametrize(
    "raw", [b"\xe2\x80", b"a\\\xe2", "é".encode(), b" x", b"\x00\x7f", bytes(range(256))]
)
def test_bytes_token_round_trips(raw: bytes) -> None:
    from nbcompletions._parse import bytes_token, token_bytes

    assert token_bytes(bytes_token(raw)) == raw


def test_junk_bytes_fall_back_to_the_token() -> None:
    tokens, _, _, _ = parse_logprobs(
        {"content": [{"token": "x", "bytes": [300], "logprob": -1}, {"token": "y", "bytes": "z"}]}
    )
    assert tokens == ["x", "y"]
