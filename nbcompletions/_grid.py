"""A sweep's grid: every request it will send, built and validated before any is sent.

``expand_grid(client, prompt=["To be", "Once"], temperature=[0.2, 0.7, 1.2], repeats=20)`` gives
the 2 x 3 x 20 = 120 grid points of that sweep, each with its request, its columns in the frames
and its cache key; ``estimate_tokens`` is the budget check's estimate of what they can consume.

How values become a grid (the cartesian product of every axis, in the order the fields are given;
prompts outermost, repeats innermost):

- ``prompt``: a string is one prompt; a list of strings is an axis of prompts; a dict maps names
  (the ``prompt_id`` column) to prompts; a list of token ids (ints) is ONE token prompt and a list
  of token-id lists is an axis of token prompts. Each request carries exactly one prompt.
- ``stop``: a string or a list of strings is ONE stop setting (as the API reads it). It is an axis
  only when the list holds lists or None: ``stop=[None, ["\\n"], ["\\n", "."]]``.
- ``logit_bias``, ``stream_options`` and ``extra`` (server-specific fields such as vLLM's
  ``top_k``): a dict is one value, a list of dicts an axis.
- Any other field: a list, tuple, range or numpy array is an axis; anything else is fixed.

``repeats`` independent samples of each grid point are sent as separate requests; a fixed ``seed``
makes them identical on deterministic servers (sweep ``seed=[...]`` instead).

Every grid point is built into a validated `CompletionRequest`; a bad value raises `RequestError`
naming the field and the grid point.

A chat sweep gives ``messages=`` instead of ``prompt=`` (the two are exclusive): a conversation (a
list of ``{"role", "content"}`` dicts) is one value; a list of conversations is an axis; a dict
maps names (the ``prompt_id`` column) to conversations. Its points are validated `ChatRequest`
objects (the Chat Completions fields: ``max_completion_tokens``, ``logprobs=True`` with
``top_logprobs``). The frames' ``messages`` column holds each conversation as canonical JSON
text: one string per conversation, so ``groupby("messages")`` works as it does on ``prompt``,
Parquet stores it as one string column, and ``json.loads`` gives the conversation back
(``prompt_id``, the conversation's index or name, is the shorter handle to group by).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._batch_file import batch_lines, check_batch_limits, split_batches
from ._cache import key_state
from ._chat import CHAT_FIELDS, ChatRequest
from ._checks import is_int
from ._errors import RequestError
from ._request import DEFAULT_MAX_TOKENS, FIELDS, CompletionRequest
from ._secrets import redact_url

__all__ = [
    "CHARS_PER_TOKEN",
    "ID_COLUMNS",
    "TAIL_COLUMNS",
    "Grid",
    "GridPoint",
    "GridPoints",
    "completion_budget",
    "estimate_tokens",
    "expand_grid",
]

#: Characters per token for the budget estimate when the endpoint's tokenizer is unknown; the
#: usual rule of thumb for English with GPT-style BPE. Not an upper bound.
CHARS_PER_TOKEN = 4

# Fields whose natural scalar value is itself a list or dict; see the module docstring.
_DICT_FIELDS = ("logit_bias", "stream_options", "extra")
#: The columns every sweep frame starts with, and the two it ends with.
ID_COLUMNS = ("request_id", "prompt_id", "repeat")
TAIL_COLUMNS = ("cached", "error")


@dataclass
class GridPoint:
    """One request of a sweep: its place in the grid, its field values, the request itself."""

    request_id: int
    prompt_id: Any
    repeat: int
    values: dict[str, Any]
    request: CompletionRequest | ChatRequest
    key: str = ""


@dataclass
class _Combo:
    """One distinct setting of every axis but ``repeat``: what its grid points share."""

    prompt_id: Any
    values: dict[str, Any]
    request: CompletionRequest | ChatRequest
    key_state: Any  # `key_state`: the cache key of each repeat is one hash update away
    same_as: int  # the first combo whose requests are the same (itself if none)


class GridPoints(Sequence[GridPoint]):
    """The grid points of a sweep, made on access from one record per combination of axis
    values: memory grows with the number of distinct settings, not with ``repeats``."""

    def __init__(self, combos: list[_Combo], repeats: int) -> None:
        self._combos = combos
        self._repeats = repeats

    def __len__(self) -> int:
        return len(self._combos) * self._repeats

    def distinct_requests(self) -> Iterator[CompletionRequest | ChatRequest]:
        """Each combination's request once (repeats send the same request)."""
        return (combo.request for combo in self._combos)

    def _point(self, i: int) -> GridPoint:
        combo_index, repeat = divmod(i, self._repeats)
        combo = self._combos[combo_index]
        state = combo.key_state.copy()
        state.update(f"{repeat}}}".encode())
        return GridPoint(i, combo.prompt_id, repeat, combo.values, combo.request, state.hexdigest())

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._point(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"grid point {i} out of range ({len(self)} points)")
        return self._point(i)

    def __iter__(self) -> Iterator[GridPoint]:
        return (self._point(i) for i in range(len(self)))

    def original(self, i: int) -> int:
        """The first grid point that sends the same request as point ``i`` (``i`` itself when
        no earlier point does): same prompt and fields, same repeat."""
        combo_index, repeat = divmod(i, self._repeats)
        return self._combos[combo_index].same_as * self._repeats + repeat

    def shard_of(self, i: int, shards: int) -> int:
        """The shard (0 to ``shards - 1``) that sends point ``i``: a hash of its request's body
        (without the endpoint) and its repeat number, taken from the point it copies (`original`),
        so a point and its copies share a shard, and adding repeats or resuming moves no point."""
        combo_index, repeat = divmod(self.original(i), self._repeats)
        digests = self.__dict__.setdefault("_shard_digests", {})
        digest = digests.get(combo_index)
        if digest is None:
            body = self._combos[combo_index].request.to_body()
            text = json.dumps(body, sort_keys=True, ensure_ascii=False, default=str)
            digest = digests[combo_index] = hashlib.sha256(text.encode()).hexdigest()
        mixed = hashlib.sha256(f"{digest}/{repeat}".encode()).digest()
        return int.from_bytes(mixed[:8], "big") % shards

    def copies(self, i: int) -> list[int]:
        """The later grid points that share point ``i``'s request (see `original`)."""
        combo_index, repeat = divmod(i, self._repeats)
        later = self._copies.get(combo_index)
        return [c * self._repeats + repeat for c in later] if later else []

    @property
    def _copies(self) -> dict[int, list[int]]:
        found = self.__dict__.get("_copies_map")
        if found is None:
            found = {}
            for c, combo in enumerate(self._combos):
                if combo.same_as != c:
                    found.setdefault(combo.same_as, []).append(c)
            self.__dict__["_copies_map"] = found
        return found


@dataclass
class Grid:
    """Every request of a sweep, validated, before anything is sent.

    ``points`` in grid order (``request_id`` is the position; a `GridPoints` sequence, made on
    access); ``columns`` the request-field columns the frames get; ``endpoint`` (without
    credentials) and ``model`` as the cache keys saw them; ``axes`` the size of each axis;
    ``api`` which API its requests go to ("completions", or "chat" for a ``messages=`` sweep).
    """

    points: GridPoints
    columns: list[str]
    endpoint: str
    model: str | None
    axes: dict[str, int] = field(default_factory=dict)
    api: str = "completions"

    def to_batch_file(
        self,
        path: str | os.PathLike[str],
        *,
        max_requests: int = 50_000,
        max_bytes: int = 200_000_000,
    ) -> list[Path]:
        """Write the grid as an OpenAI Batch input file (JSONL) for any engine that reads one.

        One line per distinct request: ``{"custom_id": <cache key>, "method": "POST", "url":
        "/v1/completions", "body": {...}}`` (``"/v1/chat/completions"`` for a chat sweep). A grid
        over OpenAI's limits (``max_requests`` lines, ``max_bytes`` bytes per file) is written as
        ``<stem>-001<suffix>``, ``-002``...; the paths written are returned.
        `nbcompletions.load_batch_output` reads the results back.
        """
        check_batch_limits(max_requests, max_bytes)
        # One line per distinct request: a point that copies an earlier one shares its response.
        points = [point for i, point in enumerate(self.points) if self.points.original(i) == i]
        groups = split_batches(batch_lines(points, self.model), max_requests, max_bytes) or [[]]
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if len(groups) == 1:
            paths = [target]
        else:
            paths = [
                target.with_name(f"{target.stem}-{n:03d}{target.suffix}")
                for n in range(1, len(groups) + 1)
            ]
        for where, group in zip(paths, groups, strict=True):
            with where.open("wb") as handle:
                for _, line in group:
                    handle.write(line)
        return paths


def _plain(value: Any) -> Any:
    # numpy scalars (np.linspace gives np.float64; np.arange np.int64) -> Python values, so that
    # validation ("an integer") and JSON both see what the user meant.
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return item()
    return value


def _is_sequence_axis(value: Any) -> bool:
    if isinstance(value, list | tuple | range):
        return True
    return type(value).__module__ == "numpy" and getattr(value, "ndim", 0) == 1


def _axis_values(name: str, value: Any) -> list[Any] | None:
    """The values of an axis, or None when ``value`` is one fixed setting of ``name``."""
    if name == "stop":
        if isinstance(value, list | tuple) and any(
            v is None or isinstance(v, list | tuple) for v in value
        ):
            return [list(v) if isinstance(v, tuple) else v for v in value]
        return None
    if name in _DICT_FIELDS:
        if isinstance(value, list | tuple):
            return list(value)
        return None
    if _is_sequence_axis(value):
        return [_plain(v) for v in list(value)]
    return None


def _prompt_axis(prompt: Any) -> list[tuple[Any, Any]]:
    """(prompt_id, prompt) pairs; see the module docstring for the forms."""
    if isinstance(prompt, Mapping):
        if not prompt:
            raise RequestError(
                "prompt",
                "prompt must not be an empty dict",
                allowed="a string, a list of prompts or a dict name -> prompt",
                value=prompt,
            )
        return [(name, p) for name, p in prompt.items()]
    if isinstance(prompt, list | tuple) and prompt:
        items = [_plain(p) for p in prompt]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
            return [(0, items)]  # one prompt given as token ids
        return [(i, list(p) if isinstance(p, tuple) else p) for i, p in enumerate(items)]
    return [(0, prompt)]


def _column_value(value: Any) -> Any:
    # Lists and dicts become canonical JSON text: hashable (groupby works), one Parquet type.
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(
            value if not isinstance(value, tuple) else list(value),
            sort_keys=True,
            ensure_ascii=False,
        )
    return value


def _describe(values: Mapping[str, Any]) -> str:
    shown = {
        k: (v if not isinstance(v, str) or len(v) <= 40 else v[:37] + "...")
        for k, v in values.items()
    }
    return ", ".join(f"{k}={v!r}" for k, v in shown.items())


def _column_name(field_name: str) -> str:
    """The frame column of a request field: its own name, or ``request_<name>`` where the frames
    already have a column of that name (``echo``: the tokens frame marks echoed tokens)."""
    from ._frames import ALTERNATIVE_COLUMNS, CHOICE_COLUMNS, TOKEN_COLUMNS

    taken = {*CHOICE_COLUMNS, *TOKEN_COLUMNS, *ALTERNATIVE_COLUMNS, *ID_COLUMNS, *TAIL_COLUMNS}
    return f"request_{field_name}" if field_name in taken else field_name


def _weights_tag(model: str | None) -> str:
    """The embedded model's weights fingerprint for the cache key, "" for any other model.

    The embedded model keeps its id when it is retrained (or the package upgraded), so without
    this a cache written by older weights would answer for the new ones.
    """
    from .model import weights_fingerprint

    fingerprint = weights_fingerprint(model)
    return "" if fingerprint is None else "#weights=" + fingerprint


def _sweep_api(prompt: Any, messages: Any) -> str:
    """ "completions" for a ``prompt=`` sweep, "chat" for a ``messages=`` one (never both)."""
    if prompt is not None and messages is not None:
        raise RequestError(
            "messages",
            "prompt= and messages= are exclusive: a sweep sends either completions (prompt=) or "
            "chat completions (messages=); give one of them",
            allowed="prompt= or messages=, not both",
            value=messages,
        )
    if prompt is None and messages is None:
        raise RequestError(
            "prompt",
            "sweep needs a prompt (prompt=...) or conversations (messages=...); got neither",
            allowed="a string, a list of prompts or a dict name -> prompt",
            value=None,
        )
    return "chat" if messages is not None else "completions"


def _check_sweep_fields(api: str, repeats: Any, fields: Mapping[str, Any]) -> None:
    if not is_int(repeats) or repeats < 1:
        raise RequestError(
            "repeats",
            f"repeats must be an integer >= 1; got {repeats!r}",
            allowed="an integer >= 1",
            value=repeats,
        )
    known, kind, main = (
        (CHAT_FIELDS, "Chat Completions", "messages")
        if api == "chat"
        else (FIELDS, "Completions", "prompt")
    )
    unknown = [name for name in fields if name not in known and name != "extra"]
    if unknown:
        raise RequestError(
            unknown[0],
            f"{unknown[0]!r} is not a {kind} request field; sweepable fields are "
            f"{', '.join(f for f in known if f != main)}; pass server-specific fields with "
            f"extra={{...}} (a list of dicts sweeps them)",
            allowed="a request field",
            value=fields[unknown[0]],
        )


def _messages_axis(messages: Any) -> list[tuple[Any, Any]]:
    """(prompt_id, conversation) pairs: one conversation, a list of them, or a dict of them."""
    if isinstance(messages, Mapping):
        if not messages or "role" in messages:
            raise RequestError(
                "messages",
                "messages must be a conversation (a list of {'role', 'content'} dicts), a list of "
                f"conversations or a dict name -> conversation; got {str(messages)[:80]}",
                allowed="a conversation, a list of conversations or a dict of them",
                value=messages,
            )
        return list(messages.items())
    if (
        isinstance(messages, list | tuple)
        and messages
        and all(isinstance(item, list | tuple) for item in messages)
    ):
        return [(i, list(conversation)) for i, conversation in enumerate(messages)]
    return [(0, messages)]  # one conversation (ChatRequest says what is wrong with a bad one)


def _fixed_and_axes(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The fields with one value, and the axes with their values."""
    fixed: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    for name, value in fields.items():
        values = _axis_values(name, value)
        if values is None:
            fixed[name] = _plain(value)
        elif not values:
            raise RequestError(
                name,
                f"{name} was given an empty list: an axis needs at least one value",
                allowed="a value or a non-empty list of values",
                value=value,
            )
        else:
            axes[name] = values
    return fixed, axes


def _combo_request(
    client: Any,
    api: str,
    prompt_id: Any,
    prompt: Any,
    chosen: Mapping[str, Any],
    axis_names: list[str],
) -> CompletionRequest | ChatRequest:
    """The validated request of one combination; a bad value names its grid point."""
    limits = getattr(client, "limits", None)
    model = getattr(client, "model", None)
    # A chosen server profile makes omitted sampling fields mean OpenAI's there, as complete() does.
    neutralize = getattr(getattr(client, "profile", None), "neutralize", None)
    kwargs = {k: v for k, v in chosen.items() if v is not None}
    if kwargs.get("model") is None and model is not None:
        kwargs["model"] = model  # complete_request sends the request's model as it is
    if limits is not None:
        kwargs["limits"] = limits
    try:
        request: CompletionRequest | ChatRequest
        if api == "chat":  # as client.chat() builds it
            request = ChatRequest(messages=prompt, **kwargs)
        else:
            request = CompletionRequest(prompt=prompt, **kwargs)
        return neutralize(request) if neutralize is not None else request
    except RequestError as exc:
        main = "messages_id" if api == "chat" else "prompt_id"
        where = _describe({main: prompt_id, **{k: chosen[k] for k in axis_names}})
        raise RequestError(
            exc.param,
            f"{exc.message} (sweep grid point {where})",
            allowed=exc.allowed,
            value=exc.value,
        ) from None
    except TypeError as exc:  # a non-mapping extra, say
        raise RequestError("extra", f"bad sweep field: {exc}", value=chosen.get("extra")) from None


def expand_grid(
    client: Any, prompt: Any = None, *, repeats: int = 1, messages: Any = None, **fields: Any
) -> Grid:
    """Build and validate every request of a sweep (nothing is sent). Used by `sweep`."""
    api = _sweep_api(prompt, messages)
    _check_sweep_fields(api, repeats, fields)
    main = "messages" if api == "chat" else "prompt"
    prompts = _messages_axis(messages) if api == "chat" else _prompt_axis(prompt)
    repeats = int(repeats)  # a numpy integer counts as one
    fixed, axes = _fixed_and_axes(fields)
    model = getattr(client, "model", None)
    # Credentials in the URL (user:key@host) decide nothing about a response, and the endpoint is
    # written into the cache file (the capabilities note), so they are left out.
    endpoint = redact_url(str(getattr(client, "endpoint", "") or ""))
    column_of = {name: _column_name(name) for name in fields}
    columns = [main, *column_of.values()]
    if "model" not in columns:
        columns.append("model")
    records: list[_Combo] = []
    first_of: dict[str, int] = {}
    axis_names = list(axes)
    combos = list(itertools.product(*(axes[n] for n in axis_names))) if axis_names else [()]
    for prompt_id, one_prompt in prompts:
        for combo in combos:
            chosen = dict(fixed)
            chosen.update(zip(axis_names, combo, strict=True))
            request = _combo_request(client, api, prompt_id, one_prompt, chosen, axis_names)
            columns_values: dict[str, Any] = {main: _column_value(one_prompt)}
            for name in fields:
                columns_values[column_of[name]] = _column_value(chosen[name])
            columns_values.setdefault("model", request.model or model)
            key_endpoint = endpoint + _weights_tag(request.model or model)
            state = key_state(key_endpoint, model, request)
            # Combos that are the same request (a prompt listed twice, an axis value repeated)
            # are sent once per repeat; their points share the response.
            same_as = first_of.setdefault(state.hexdigest(), len(records))
            records.append(_Combo(prompt_id, columns_values, request, state, same_as))
    axis_sizes = {main: len(prompts), **{n: len(v) for n, v in axes.items()}}
    if repeats > 1:
        axis_sizes["repeat"] = repeats
    return Grid(GridPoints(records, repeats), columns, endpoint, model, axis_sizes, api)


# -- the budget -----------------------------------------------------------------------------------


def _chat_prompt(request: ChatRequest, exact: bool) -> str:
    """The text a chat request's prompt is counted from: the embedded model's rendering of its
    template where the tokenizer is known, else the contents (and roles) joined."""
    if exact:
        from .model import render_chat

        return render_chat(request.messages)
    parts = []
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text") or "") for p in content if isinstance(p, Mapping))
        parts.append(f"{message.get('role')}: {content or ''}")
    return "\n".join(parts)


def completion_budget(request: CompletionRequest | ChatRequest) -> int | None:
    """The most completion tokens one choice of ``request`` may have: ``max_tokens`` (16 when a
    completion leaves it unset), or a chat request's ``max_completion_tokens`` / ``max_tokens``
    (None when a chat request sets neither: the server then fills the context)."""
    if isinstance(request, ChatRequest):
        given = request.max_completion_tokens
        return request.max_tokens if given is None else given
    return DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens


def estimate_tokens(
    requests: Sequence[CompletionRequest | ChatRequest],
    *,
    model: str | None = None,
) -> tuple[int, str]:
    """An estimate of the tokens ``requests`` can consume, and how prompts were counted.

    Per request: prompt tokens (once per prompt: that is how OpenAI and vLLM report and bill them,
    whatever n and best_of are) plus max_tokens (16 when unset) x max(n, best_of) completion tokens
    (best_of candidates are generated and billed although only n come back). The completion part is
    an upper bound. Prompt tokens are exact for token-id prompts and for the embedded model (its
    tokenizer), otherwise ceil(characters / 4), an estimate that can be low for unusual text.
    A chat request's prompt is its conversation rendered by the embedded model's chat template
    (exact there; elsewhere its contents, an estimate below the server's template overhead) and
    its completion part ``max_completion_tokens`` (or ``max_tokens``; 0 when neither is set:
    `plan_sweep` refuses a budget for such requests).
    """
    from .model import count_tokens

    exact = count_tokens(model, "") is not None  # the model package knows this model's tokenizer
    method = "embedded tokenizer" if exact else f"characters / {CHARS_PER_TOKEN}"
    counted: dict[str, int] = {}  # a sweep repeats few distinct prompts many times
    total = 0
    for request in requests:
        if isinstance(request, ChatRequest):
            prompts: Any = [_chat_prompt(request, exact)]
            width = request.effective_n
        else:
            prompts = request.prompt if request.n_prompts > 1 else [request.prompt]
            width = max(request.effective_n, request.best_of or 1)
        prompt_tokens = 0
        for p in prompts:
            if isinstance(p, str):
                if p not in counted:
                    tokens = count_tokens(model, p) if exact else None
                    counted[p] = math.ceil(len(p) / CHARS_PER_TOKEN) if tokens is None else tokens
                prompt_tokens += counted[p]
            else:
                prompt_tokens += len(p)
        max_tokens = completion_budget(request) or 0
        total += prompt_tokens + len(prompts) * width * max_tokens
    return total, method
