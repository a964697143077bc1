"""The protocol's response side: how one choice, one chunk, one logprobs object is read.

Parsing is pure and defensive (STYLE.md): every field may be missing or null, unknown fields are
ignored, and the same rule applies wherever a response is read (frames, streams, scoring, sweeps).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def choice_index(choice: Mapping[str, Any], position: int = 0) -> int:
    """The choice's ``index``; `position` (its place in the list) when that is missing or not an
    integer (a bool is not an index)."""
    index = choice.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else position


def choice_text(choice: Mapping[str, Any]) -> str | None:
    """The choice's text: ``text``, else the chat shapes' ``delta.content``/``message.content``
    (chat-shaped chunks come from proxies and the seed document's sample)."""
    text = choice.get("text")
    if text is None:
        for key in (
            "delta",
            "message",
        ):  # chat-shaped chunks and messages (proxies, the seed's sample)
            inner = choice.get(key)
            if isinstance(inner, Mapping) and inner.get("content") is not None:
                text = inner.get("content")
                break
    return text if isinstance(text, str) else None
