"""Chat Completions and Responses answers as the frames of a completion (`to_frames`), plus chat's
own columns.

`chat_frames(body, request, *, vocab_size)` gives ``(choices, tokens, alternatives)`` with every
column of `nbcompletions.to_frames` and, in each frame:

- ``role`` (object): the message's role (``"assistant"``);
- ``refusal``: in choices the refusal text (None when the model did not refuse); in tokens and
  alternatives a bool, True for the tokens of the refusal (chat's ``logprobs.refusal``, listed
  after the content's);
- ``api`` (object): which API answered, ``"chat"`` or ``"responses"``;

and, in tokens and alternatives, ``below_cap`` (bool): the server wrote -9999.0, OpenAI's stand-in
for a token outside its top 20, not a probability. Such logprobs are NaN, and the entropy bounds
count those alternatives among the unseen tokens, each at most the smallest listed probability.
Tokens are read from ``bytes`` where the token string lost some (see `chat_token`).

`responses_as_chat(body)` reads a Responses API answer (``output[].content[]`` of type
``output_text``, with ``logprobs``) as a chat completion, so that one code path makes the frames,
and ``Completion.text`` and ``.usage`` work alike for all three APIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ._frames import to_frames
from ._parse import NEG_INF_LOGPROB, sorted_choices

__all__ = ["CHAT_COLUMNS", "chat_frames", "responses_as_chat"]

#: The columns chat adds to each frame of a completion (tokens and alternatives: and below_cap).
CHAT_COLUMNS: tuple[str, ...] = ("role", "refusal", "api")

#: Responses API status -> the finish_reason a chat completion would give.
_FINISH = {"completed": "stop", "incomplete": "length"}


def _output_texts(body: Mapping[str, Any]) -> tuple[str | None, list[Any], str | None, bool]:
    """(text, logprob entries, refusal, has logprobs) of a Responses answer's message outputs."""
    texts: list[str] = []
    entries: list[Any] = []
    refusals: list[str] = []
    has_logprobs = False
    output = body.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, Mapping) or item.get("type") != "message":
            continue  # reasoning items, tool calls
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                logprobs = part.get("logprobs")
                if isinstance(logprobs, list):
                    has_logprobs = True
                    entries.extend(logprobs)
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                refusals.append(part["refusal"])
    text = "".join(texts) if texts or not refusals else None
    return text, entries, "".join(refusals) if refusals else None, has_logprobs


def responses_as_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses API answer shaped as a chat completion (one choice; usage renamed)."""
    text, entries, refusal, has_logprobs = _output_texts(body)
    status = body.get("status")
    details = body.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, Mapping) else None
    finish = "length" if reason == "max_output_tokens" else _FINISH.get(str(status), status)
    usage = body.get("usage")
    counts: dict[str, Any] | None = None
    if isinstance(usage, Mapping):
        counts = {
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "total_tokens": usage.get("total_tokens"),
        }
    return {
        "id": body.get("id"),
        "object": "chat.completion",
        "created": body.get("created_at"),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": refusal},
                "logprobs": {"content": entries, "refusal": None} if has_logprobs else None,
                "finish_reason": finish,
            }
        ],
        "usage": counts,
    }


def _with_refusal_tokens(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[int]]:
    """The body with each choice's refusal logprobs after its content's, and per choice (in
    index order) how many refusal tokens were added. The body is copied only where needed."""
    choices = sorted_choices(body)
    added = []
    changed = []
    for choice in choices:
        logprobs = choice.get("logprobs")
        refusal = logprobs.get("refusal") if isinstance(logprobs, Mapping) else None
        if not isinstance(refusal, list) or not refusal or not isinstance(logprobs, Mapping):
            added.append(0)
            changed.append(choice)
            continue
        content = logprobs.get("content")
        merged = [*(content if isinstance(content, list) else []), *refusal]
        changed.append({**choice, "logprobs": {**logprobs, "content": merged}})
        added.append(len(refusal))
    if not any(added):
        return body, added
    return {**body, "choices": changed}, added


def _message_field(choice: Mapping[str, Any], name: str) -> Any:
    message = choice.get("message")
    if not isinstance(message, Mapping):
        message = choice.get("delta")
    value = message.get(name) if isinstance(message, Mapping) else None
    return value if isinstance(value, str) else None


def _add_columns(frame: pd.DataFrame, columns: dict[str, np.ndarray]) -> None:
    for name, values in columns.items():
        frame[name] = pd.Series(values, index=frame.index, dtype=values.dtype, copy=False)


def chat_frames(
    body: Mapping[str, Any],
    request: Any = None,
    *,
    vocab_size: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(choices, tokens, alternatives)`` of a chat completion (or of `responses_as_chat`'s
    reading of a Responses answer); see the module docstring for the columns chat adds."""
    api = getattr(request, "api", None) or "chat"
    info = {
        "n": getattr(request, "n", None),
        "logprobs": getattr(request, "top_logprobs", None),
    }
    with_refusals, added = _with_refusal_tokens(body)
    choices, tokens, alternatives = to_frames(
        with_refusals, info, vocab_size=vocab_size, below_cap=NEG_INF_LOGPROB
    )
    raw_choices = sorted_choices(body)
    roles = np.array([_message_field(c, "role") for c in raw_choices], dtype=object)
    refusals = np.array([_message_field(c, "refusal") for c in raw_choices], dtype=object)
    _add_columns(
        choices, {"role": roles, "refusal": refusals, "api": np.full(len(roles), api, dtype=object)}
    )
    # Per token row: its choice (rows are in choice order) and whether it is a refusal token.
    lengths = np.bincount(
        np.searchsorted(choices["index"].to_numpy(), tokens["index"].to_numpy()),
        minlength=len(choices),
    )
    row_choice = np.repeat(np.arange(len(choices)), lengths)
    from_end = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(row_choice))
    refusal_rows = from_end <= np.repeat(np.array(added, dtype=np.intp), lengths)
    _add_columns(
        tokens,
        {
            "role": roles[row_choice],
            "refusal": refusal_rows,
            "api": np.full(len(tokens), api, dtype=object),
        },
    )
    starts = np.cumsum(lengths) - lengths
    alt_choice = np.searchsorted(choices["index"].to_numpy(), alternatives["index"].to_numpy())
    alt_row = starts[alt_choice] + alternatives["position"].to_numpy()
    _add_columns(
        alternatives,
        {
            "role": roles[alt_choice],
            "refusal": refusal_rows[alt_row],
            "api": np.full(len(alternatives), api, dtype=object),
        },
    )
    return choices, tokens, alternatives
