"""Corrections for measured server deviations (issue 16): pure functions over a raw choice.

Each function takes one raw Completions choice (``{"text", "logprobs", "finish_reason", ...}``)
and returns a new choice dict (the input is never mutated) whose logprobs mean what OpenAI's mean.
When a correction cannot be made with certainty it raises `UncorrectableError` (a `ValueError`)
saying why: the caller then flags the result instead (never a clean-looking wrong number).

Who calls what (the hook for the governing code, which decides *when* from the conformance
report; these functions only say *how*):

- `unshift_echo(choice, head=...)`: the report's ``echo_alignment`` is ``fails`` with evidence
  ``kind == "shifted"`` (llama-cpp-python). Its echo entry ``i`` holds the distribution of
  position ``i + 1`` (``top_logprobs[i]``: its top k plus token ``i``'s value there), and
  ``token_logprobs[i]`` is token ``i``'s logprob under that next distribution (meaningless). The
  true logprob of token ``i`` is looked up in ``top_logprobs[i - 1]``, so to get every position
  the request must be sent with ``logprobs`` >= the vocabulary size (`UNSHIFT_LOGPROBS` says how
  many the caller should send; 4096 entries per position for our model take ~1 s on that server).
  Position 1's distribution is dropped by that server (it nulls entry 0); send one more request,
  `head_request_fields`, and pass its generated entry's top_logprobs as ``head``. The last
  generated token, missing from that server's echo (case 11), is rebuilt from the text.
- `drop_stop_token(choice, stop)`: ``stop_in_logprobs`` is ``fails`` (llama-cpp-python, vLLM):
  the tokens that start at or after the cut (where the stop string begins in the text) are dropped,
  as OpenAI and our server do; a token that spans the cut stays (part of it is in the text).
- `card_limits(card)`: the vocabulary size and context length a ``GET /models`` entry says
  (vLLM ``max_model_len``; llama-server ``meta.n_vocab``, ``meta.n_ctx``/``meta.n_ctx_train``;
  llama-cpp-python says neither).

- `correct_choices(response, correction)`: either correction over every choice of a response;
  the choices it cannot correct are kept as sent and listed with why, for the caller to flag.

Byte tokens (case 13) are read from the chat shape's ``bytes`` field in `nbcompletions._parse`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ._checks import positive_int
from ._parse import token_bytes, top_items

__all__ = [
    "CardLimits",
    "UncorrectableError",
    "card_limits",
    "correct_choices",
    "drop_stop_token",
    "head_request_fields",
    "unshift_echo",
    "unshift_logprobs",
]


class UncorrectableError(ValueError):
    """A correction that the response does not allow with certainty (flag the result instead)."""


# -- shifted echo (llama-cpp-python) ---------------------------------------------------------------


def unshift_logprobs(vocab_size: int | None, requested: int | None) -> int | None:
    """The ``logprobs`` to send for an echo request to a shifted server so that `unshift_echo`
    finds every token: the vocabulary size (the whole distribution), or None when it is unknown
    (then positions whose token is outside the returned top k come back None and the caller must
    flag the result). Never fewer than ``requested``."""
    if vocab_size is None:
        return None
    return max(vocab_size, requested or 0)


def head_request_fields(choice: Mapping[str, Any], logprobs: int) -> dict[str, Any]:
    """The body fields (besides model) of the request whose answer gives position 1's
    distribution on a shifted server: the first echoed token alone as prompt, one greedy token,
    no echo. Its generated entry's ``top_logprobs[0]`` is `unshift_echo`'s ``head`` (greedy: the
    token the server adds to that entry is its top one, so the entry holds no extra token)."""
    tokens = _logprob_lists(choice)[0]
    first = tokens[0] if tokens else None
    if not isinstance(first, str) or not first or first.startswith("bytes:"):
        raise UncorrectableError(
            f"the first echoed token {first!r} is not text that can be sent as a prompt"
        )
    return {"prompt": first, "max_tokens": 1, "logprobs": logprobs, "echo": False, "temperature": 0}


def unshift_echo(
    choice: Mapping[str, Any],
    *,
    head: Mapping[str, Any] | Sequence[Any] | None = None,
    requested: int | None = None,
) -> dict[str, Any]:
    """``choice`` with a shifted echo's logprobs realigned to OpenAI's meaning.

    - ``tokens`` and ``text_offset`` are kept (they are right); ``token_logprobs[0]`` and
      ``top_logprobs[0]`` are None (the first prompt token has no context);
    - entry ``i >= 2`` gets the server's entry ``i - 1``'s top_logprobs, less the extra entry for
      token ``i - 1`` when there are more than ``requested`` (it is not a top-k entry there), and
      token ``i``'s logprob looked up in it (None when absent, or when the token is ``""``: byte
      tokens decoded with errors ignored collide there);
    - entry 1 gets ``head`` (position 1's distribution, see `head_request_fields`), else None;
    - the last generated token, which the server leaves out, is appended when the text says what
      it is (text = the tokens spelled + one more piece), with the last entry's distribution.
    """
    tokens, _, tops, offsets = _logprob_lists(choice)
    n = len(tokens)
    new_tops: list[Any] = [None] * n
    new_logprobs: list[Any] = [None] * n
    if n > 1 and head is not None:
        new_tops[1] = head
    for i in range(2, n):
        new_tops[i] = _without_extra(tops[i - 1], tokens[i - 1], tokens[i], requested)
    for i in range(1, n):
        new_logprobs[i] = _lookup(new_tops[i] if i > 1 else head, tokens[i])
    new_tokens, new_offsets = list(tokens), None if offsets is None else list(offsets)
    last = _missing_last_token(choice.get("text"), tokens) if n else None
    if last is not None:
        top = _without_extra(tops[n - 1], tokens[n - 1], last, requested)
        new_tokens.append(last)
        new_tops.append(top)
        new_logprobs.append(_lookup(top, last))
        if new_offsets is not None:
            start = new_offsets[-1] if new_offsets else 0
            new_offsets.append(start + len(tokens[-1]) if isinstance(start, int) else None)
    logprobs = {
        "tokens": new_tokens,
        "token_logprobs": new_logprobs,
        "top_logprobs": new_tops,
        "text_offset": new_offsets,
    }
    return {**choice, "logprobs": logprobs}


def _logprob_lists(choice: Mapping[str, Any]) -> tuple[list[Any], list[Any], list[Any], Any]:
    found = choice.get("logprobs")
    logprobs: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    tokens = logprobs.get("tokens")
    if not isinstance(tokens, list):
        raise UncorrectableError("the choice has no logprobs tokens to correct")
    n = len(tokens)

    def column(name: str) -> list[Any]:
        values = logprobs.get(name)
        values = list(values) if isinstance(values, list) else []
        return values[:n] + [None] * (n - len(values))

    offsets = logprobs.get("text_offset")
    return (
        tokens,
        column("token_logprobs"),
        column("top_logprobs"),
        column("text_offset") if isinstance(offsets, list) else None,
    )


def _lookup(entry: Any, token: Any) -> float | None:
    if not isinstance(token, str) or token == "":
        return None
    for alternative, logprob in top_items(entry):
        if alternative == token and isinstance(logprob, int | float):
            return float(logprob)
    return None


def _without_extra(entry: Any, extra: Any, chosen: Any, requested: int | None) -> Any:
    """The entry less the token the server added (``extra``) when it holds more than
    ``requested`` alternatives, unless that token is the chosen one (OpenAI adds the chosen one as
    entry k+1 too). An entry that is not a dict is kept as it is."""
    if not isinstance(entry, Mapping) or requested is None or len(entry) <= requested:
        return entry
    if extra == chosen or extra not in entry:
        return dict(entry)
    return {token: logprob for token, logprob in entry.items() if token != extra}


def _missing_last_token(text: Any, tokens: list[Any]) -> str | None:
    """The text the tokens do not spell (the server's missing last generated token), or None when
    the tokens spell all of it or the text cannot be matched (byte tokens read as "")."""
    if not isinstance(text, str) or not all(isinstance(t, str) and t for t in tokens):
        return None
    spelled = b"".join(token_bytes(t) for t in tokens)
    whole = text.encode("utf-8", "surrogatepass")
    if len(whole) <= len(spelled) or not whole.startswith(spelled):
        return None
    return whole[len(spelled) :].decode("utf-8", "replace")


# -- the stop token kept in the logprobs -----------------------------------------------------------


def drop_stop_token(choice: Mapping[str, Any], stop: str | Sequence[str] | None) -> dict[str, Any]:
    """``choice`` without the trailing tokens that spell the stop string its text was cut at.

    A token is kept when it starts before the end of the text (in UTF-8 bytes, ``bytes:``
    tokens counted as their bytes): a token spanning the cut stays, as on OpenAI and our server.
    Nothing is dropped when the tokens already end with the text. `UncorrectableError` when the
    tokens do not spell the text followed by one of the stop strings (a byte token read as "",
    an end-of-text token, a text the tokens do not spell).
    """
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if isinstance(s, str)]
    tokens, logprobs_, tops, offsets = _logprob_lists(choice)
    text = choice.get("text")
    if not isinstance(text, str) or not all(isinstance(t, str) for t in tokens):
        raise UncorrectableError("the choice's text or tokens are missing")
    pieces = [token_bytes(t) for t in tokens]
    spelled = b"".join(pieces)
    cut = len(text.encode("utf-8", "surrogatepass"))
    if spelled[:cut] != text.encode("utf-8", "surrogatepass"):
        raise UncorrectableError(
            f"the tokens spell {spelled[:80]!r}, which does not start with the text {text[:80]!r}"
        )
    tail = spelled[cut:].decode("utf-8", "replace")
    if not tail:
        return {**choice}
    if not any(stop and tail.startswith(stop) for stop in stops):
        raise UncorrectableError(
            f"the tokens go on past the text with {tail!r}, which starts with none of the "
            f"stop strings {stops!r}"
        )
    keep, start = 0, 0
    for piece in pieces:
        if start >= cut:
            break
        keep, start = keep + 1, start + len(piece)
    logprobs = {
        "tokens": tokens[:keep],
        "token_logprobs": logprobs_[:keep],
        "top_logprobs": tops[:keep],
        "text_offset": None if offsets is None else offsets[:keep],
    }
    return {**choice, "logprobs": logprobs}


def correct_choices(
    response: Mapping[str, Any], correction: Callable[[Mapping[str, Any]], dict[str, Any]]
) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """A copy of ``response`` with ``correction`` applied to each choice object (say
    ``lambda c: drop_stop_token(c, request.stop)``), and the ``(position, why)`` of each choice
    it could not correct (`UncorrectableError`), which stays as sent: flag the result."""
    choices = response.get("choices")
    if not isinstance(choices, list):
        return dict(response), []
    corrected: list[Any] = []
    failed: list[tuple[int, str]] = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, Mapping):
            corrected.append(choice)
            continue
        try:
            corrected.append(correction(choice))
        except UncorrectableError as exc:
            corrected.append(choice)
            failed.append((position, str(exc)))
    return {**response, "choices": corrected}, failed


# -- what the model card says ----------------------------------------------------------------------


class CardLimits(NamedTuple):
    """What a ``GET /models`` entry says of the model: None where it says nothing."""

    vocab_size: int | None
    context_length: int | None


def card_limits(card: Mapping[str, Any] | None) -> CardLimits:
    """The vocabulary size and context length of one ``GET /models`` data entry.

    vLLM: ``max_model_len`` (no vocabulary size); llama-server: ``meta.n_vocab`` and the smaller
    of ``meta.n_ctx`` (a slot's context, what a request may use) and ``meta.n_ctx_train``;
    ``vocab_size`` / ``context_length`` where a server names them so. llama-cpp-python: neither.
    """
    if not isinstance(card, Mapping):
        return CardLimits(None, None)
    found = card.get("meta")
    meta: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    vocab = positive_int(card.get("vocab_size")) or positive_int(meta.get("n_vocab"))
    contexts = [
        positive_int(value)
        for value in (
            card.get("max_model_len"),
            card.get("context_length"),
            meta.get("n_ctx"),
            meta.get("n_ctx_train"),
        )
    ]
    known = [c for c in contexts if c is not None]
    return CardLimits(vocab, min(known) if known else None)
