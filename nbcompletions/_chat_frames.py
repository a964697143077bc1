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

A Responses API answer comes here as `nbcompletions._parse.responses_as_chat` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ._frames import to_frames
from ._gc_pause import paused_gc
from ._parse import NEG_INF_LOGPROB, sorted_choices

__all__ = ["CHAT_COLUMNS", "chat_frames"]

#: The columns chat adds to each frame of a completion (tokens and alternatives: and below_cap).
CHAT_COLUMNS: tuple[str, ...] = ("role", "refusal", "api")


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
    with paused_gc():  # to_frames pauses too: this keeps the collector off until the end
        choices, tokens, alternatives = to_frames(
            with_refusals, info, vocab_size=vocab_size, below_cap=NEG_INF_LOGPROB
        )
        _add_chat_columns(choices, tokens, alternatives, sorted_choices(body), added, api)
    return choices, tokens, alternatives


def _add_chat_columns(
    choices: pd.DataFrame,
    tokens: pd.DataFrame,
    alternatives: pd.DataFrame,
    raw_choices: list[Mapping[str, Any]],
    added: list[int],
    api: str,
) -> None:
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
