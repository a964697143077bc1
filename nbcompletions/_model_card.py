"""What ``GET /models`` says of the model: vocabulary size and context length, once per client.

Frames bound each position's entropy with the vocabulary size; without it they assume GPT-2's
50257, a loose bound for a 4096-token model (issue 16, case 6). vLLM's card gives
``max_model_len``; llama-server's ``meta.n_vocab``, ``meta.n_ctx`` and ``meta.n_ctx_train``
(`nbcompletions._corrections.card_limits` reads them); llama-cpp-python's gives neither.

Read lazily and once per client, endpoint and model: `AsyncClient.models` remembers the cards it
lists (model discovery reads them anyway), and the client's request paths (the hook: one line,
``await self._read_model_card(request)`` right after ``_with_model`` in ``complete_request`` and
``_stream_after_model``; sweeps call `AsyncClient.model_card_limits` before sending) read the card
before the first request whose frames need the vocabulary size (logprobs with alternatives), so
at most one ``GET /models`` is sent per client and model, however many requests run at once. A
card that cannot be read (an error answer, no ``data`` list) counts as saying nothing, and is not
asked again; one that failed in passing (no answer, 5xx, 408, 429: one attempt, no retries) is
asked again by the next request that needs it. `known_limits` is the no-I/O lookup the client's
``vocab_size`` and the governing code (the client-side context bound) use; the conformance check
reads the whole card through `read_card`, so it shares the same single ``GET /models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from ._corrections import CardLimits, card_limits
from ._errors import APIError

__all__ = [
    "known_card",
    "known_limits",
    "needs_limits",
    "read_card",
    "read_limits",
    "remember_cards",
]

_Key = tuple[str, str | None]
#: What was read: the card of each (endpoint, model), None where the server lists none for it.
_cards: weakref.WeakKeyDictionary[Any, dict[_Key, Mapping[str, Any] | None]] = (
    weakref.WeakKeyDictionary()
)
_reading: weakref.WeakKeyDictionary[
    Any, dict[tuple[_Key, asyncio.AbstractEventLoop], asyncio.Task[Mapping[str, Any] | None]]
] = weakref.WeakKeyDictionary()
#: `card_limits` of each card in `_cards`, parsed once: a sweep asks for every answer.
_limits: weakref.WeakKeyDictionary[Any, dict[_Key, CardLimits]] = weakref.WeakKeyDictionary()
_UNREAD = object()


def _key(client: Any, model: str | None) -> _Key:
    aclient = getattr(client, "async_client", client)
    model = model or getattr(aclient, "model", None) or getattr(aclient, "_discovered_model", None)
    return (str(getattr(aclient, "endpoint", None)), model)


def _known(client: Any, model: str | None) -> Any:
    aclient = getattr(client, "async_client", client)
    try:
        found = _cards.get(aclient)
    except TypeError:  # not weak-referenceable
        return _UNREAD
    return found.get(_key(aclient, model), _UNREAD) if found is not None else _UNREAD


def known_card(client: Any, model: str | None = None) -> Mapping[str, Any] | None:
    """The card already read for this client and model (default: the client's), or None."""
    card = _known(client, model)
    return None if card is _UNREAD else card


def known_limits(client: Any, model: str | None = None) -> CardLimits | None:
    """What the card already read says (`card_limits`), or None when it was not read yet."""
    aclient = getattr(client, "async_client", client)
    key = _key(aclient, model)
    try:
        parsed = _limits.get(aclient)
        found = _cards.get(aclient)
    except TypeError:  # not weak-referenceable
        return None
    if parsed is not None and key in parsed:
        return parsed[key]
    if found is None or key not in found:
        return None
    limits = _limits.setdefault(aclient, {})[key] = card_limits(found[key])
    return limits


def _card_for(data: Sequence[Any], model: str | None) -> Mapping[str, Any] | None:
    cards = [card for card in data if isinstance(card, Mapping)]
    for card in cards:
        if card.get("id") == model:
            return card
    return cards[0] if len(cards) == 1 else None


def remember_cards(client: Any, data: Sequence[Any], model: str | None = None) -> None:
    """Keep a ``GET /models`` ``data`` list's cards: each listed model's, and the one for
    ``model`` (default: the client's, else none named; when it is not listed by name, the only
    card listed: servers that serve one model under any name, or the one discovery picks)."""
    aclient = getattr(client, "async_client", client)
    with contextlib.suppress(TypeError):
        found = _cards.setdefault(aclient, {})
        _limits.pop(aclient, None)  # parsed again from the cards as they are now
        for card in data:
            if isinstance(card, Mapping) and isinstance(card.get("id"), str):
                found[_key(aclient, card["id"])] = card
        own = _key(aclient, model)
        if own not in found:  # no model named: the only card listed, as discovery would pick
            found[own] = _card_for(data, own[1])


def needs_limits(logprobs: Any) -> bool:
    """Whether a request's frames use the vocabulary size: alternatives were asked for."""
    return isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs > 0


async def read_limits(client: Any, model: str | None = None) -> CardLimits:
    """What the model card says (`card_limits`), read the first time (see `read_card`)."""
    return card_limits(await read_card(client, model))


async def read_card(client: Any, model: str | None = None) -> Mapping[str, Any] | None:
    """The model's ``GET /models`` entry, read with one request the first time (requests that
    ask at once share it); None when the server lists none for it or answers with an error."""
    aclient = getattr(client, "async_client", client)
    known = _known(aclient, model)
    if known is not _UNREAD:
        return known  # type: ignore[no-any-return]  # a card or None, as remembered
    key = (_key(aclient, model), asyncio.get_running_loop())
    try:
        reading = _reading.setdefault(aclient, {})
    except TypeError:  # not weak-referenceable: read every time it is asked
        return await _read(aclient, model)
    task = reading.get(key)
    if task is None:
        task = reading[key] = asyncio.ensure_future(_read(aclient, model))
    try:
        return await asyncio.shield(task)
    finally:
        if task.done():
            reading.pop(key, None)


async def _read(aclient: Any, model: str | None) -> Mapping[str, Any] | None:
    try:
        # One attempt: the card must not delay (or multiply the retries of) a request to a
        # server that is down; a passing failure is asked again next time.
        body = await aclient.request("GET", "/models", retry=False)
    except APIError as exc:
        if exc.status is None or exc.status >= 500 or exc.status in (408, 429):
            return None
        body = None
    found = body.get("data") if isinstance(body, Mapping) else None
    data: list[Any] = found if isinstance(found, list) else []
    remember_cards(aclient, data, model)
    card = _known(aclient, model)
    return None if card is _UNREAD else card
