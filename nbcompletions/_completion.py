"""`Completion`: one response, with its request, and its token DataFrames built on first access."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._chat import ChatRequest, ResponsesRequest
from ._parse import choice_text, first_choice, sorted_choices
from ._request import CompletionRequest

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["Completion"]

_REPR_TEXT = 60


class Completion:
    """A completion response (``.raw``) with the request that produced it (``.request``).

    ``.choices``, ``.tokens`` and ``.alternatives`` are the frames of `nbcompletions.to_frames`,
    built once, on first access (pandas is imported only then). ``vocab_size`` feeds the entropy
    bounds. An answer of the Chat Completions or Responses API (``request`` a `ChatRequest` or
    `ResponsesRequest`, or a ``chat.completion`` body) has the same frames plus chat's columns
    (`nbcompletions._chat_frames`); a Responses answer's ``raw`` is its chat-shaped reading.
    """

    __slots__ = ("_body", "_frames", "flags", "raw", "request", "vocab_size")

    def __init__(
        self,
        raw: Mapping[str, Any],
        request: CompletionRequest | ChatRequest | ResponsesRequest | None = None,
        *,
        vocab_size: int | None = None,
    ) -> None:
        self.raw: dict[str, Any] = dict(raw)
        self.request = request
        self.vocab_size = vocab_size
        self._frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None
        # The response body as received, when the client has it: what a sweep's cache stores,
        # rather than writing ``raw`` out again.
        self._body: bytes | None = None
        # Checks of the endpoint's conformance report this result depends on and that could be
        # neither corrected nor refused (`nbcompletions._governance`); the frames carry them too,
        # in .attrs["conformance_flags"] (absent: no flags).
        self.flags: tuple[str, ...] = ()

    def corrected(self, raw: Mapping[str, Any]) -> Completion:
        """This completion with ``raw`` (corrected) as its answer; the request and flags kept."""
        fixed = Completion(raw, self.request, vocab_size=self.vocab_size)
        fixed.flags = self.flags
        return fixed

    # -- plain fields -----------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The first choice's text (choices sorted by index); "" when there is none."""
        choice = first_choice(self.raw)
        return (choice_text(choice) if choice else None) or ""

    @property
    def texts(self) -> list[str]:
        """Every choice's text, in index order."""
        return [choice_text(c) or "" for c in sorted_choices(self.raw)]

    @property
    def finish_reason(self) -> str | None:
        choice = first_choice(self.raw)
        reason = choice.get("finish_reason") if choice else None
        return reason if isinstance(reason, str) else None

    @property
    def usage(self) -> dict[str, Any]:
        """``prompt_tokens``, ``completion_tokens``, ``total_tokens`` ({} if none)."""
        usage = self.raw.get("usage")
        return dict(usage) if isinstance(usage, Mapping) else {}

    @property
    def model(self) -> str | None:
        return self.raw.get("model")

    @property
    def id(self) -> str | None:
        return self.raw.get("id")

    # -- frames -----------------------------------------------------------------------------------
    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(choices, tokens, alternatives)``, built on the first call and cached."""
        if self._frames is None:
            if self.api == "completions":
                from ._frames import to_frames

                assert not isinstance(self.request, ChatRequest | ResponsesRequest)
                self._frames = to_frames(self.raw, self.request, vocab_size=self.vocab_size)
            else:
                from ._chat_frames import chat_frames

                self._frames = chat_frames(self.raw, self.request, vocab_size=self.vocab_size)
        if self.flags:  # attached after the response arrived, maybe after the frames were built
            for frame in self._frames:
                frame.attrs["conformance_flags"] = list(self.flags)
        return self._frames

    @property
    def api(self) -> str:
        """Which API answered: ``"completions"``, ``"chat"`` or ``"responses"``."""
        if isinstance(self.request, ChatRequest | ResponsesRequest):
            return self.request.api
        if self.request is None and self.raw.get("object") == "chat.completion":
            return "chat"
        # A completion request answered in chat's shape (a proxy's chunks) is still a completion.
        return "completions"

    @property
    def choices(self) -> pd.DataFrame:
        return self.frames()[0]

    @property
    def tokens(self) -> pd.DataFrame:
        return self.frames()[1]

    @property
    def alternatives(self) -> pd.DataFrame:
        return self.frames()[2]

    # -- display ----------------------------------------------------------------------------------
    def _summary(self) -> tuple[str, str | None, str]:
        text = self.text
        short = text if len(text) <= _REPR_TEXT else text[:_REPR_TEXT] + "…"
        n = len(self.raw.get("choices") or [])
        usage = self.usage
        parts = [f"{n} choice{'s' if n != 1 else ''}"]
        if usage:
            parts.append(f"{usage.get('prompt_tokens')}+{usage.get('completion_tokens')} tokens")
        return short, self.finish_reason, ", ".join(parts)

    def __repr__(self) -> str:
        text, finish, info = self._summary()
        return f"<Completion {text!r} finish_reason={finish!r} ({info})>"

    def _repr_html_(self) -> str:
        text = self.text
        finish = self.finish_reason
        _, _, info = self._summary()
        model = self.model
        return (
            "<div class='nbc-completion'>"
            f"<pre style='white-space:pre-wrap;margin:0'>{html.escape(text)}</pre>"
            f"<small>finish_reason={html.escape(str(finish))} · {html.escape(info)}"
            f"{' · ' + html.escape(str(model)) if model else ''}</small></div>"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Completion):
            return NotImplemented
        return self.raw == other.raw and self.request == other.request

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: equality by content
