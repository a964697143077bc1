"""Parameter sweeps: a grid of requests, sent concurrently, cached on disk, returned as tidy frames.

``sweep(client, prompt=["To be", "Once"], temperature=[0.2, 0.7, 1.2], repeats=20,
cache="study.sqlite")`` sends 2 x 3 x 20 = 120 requests and returns a `SweepResult` whose frames
carry every request field as a column, so a study is a ``groupby`` away.

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
makes them identical on deterministic servers (sweep ``seed=[...]`` instead). Grid points that are
the same request (one prompt under two names, a value listed twice) are sent once per repeat and
share the response, with or without a cache, so a run and its re-run from the cache agree.

Every grid point is built into a validated `CompletionRequest` before anything is sent. Responses
are written to the cache as they arrive; a re-run sends only what is missing. A request that still
fails after the client's retries becomes rows with ``error`` set; the sweep goes on.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cache import Cache, CachedResponse, cache_keys
from ._errors import APIError, BudgetError, ConformanceError, NBCompletionsError, RequestError
from ._parse import choice_index
from ._request import FIELDS, CompletionRequest
from ._secrets import redact_url

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["SweepResult", "asweep", "estimate_tokens", "expand_grid", "load_sweep", "sweep"]

#: OpenAI's default max_tokens, used by the budget estimate when a request leaves it unset.
DEFAULT_MAX_TOKENS = 16
#: Characters per token for the budget estimate when the endpoint's tokenizer is unknown; the
#: usual rule of thumb for English with GPT-style BPE. Not an upper bound.
CHARS_PER_TOKEN = 4

# Fields whose natural scalar value is itself a list or dict; see the module docstring.
_DICT_FIELDS = ("logit_bias", "stream_options", "extra")
_ID_COLUMNS = ("request_id", "prompt_id", "repeat")
_TAIL_COLUMNS = ("cached", "error")
_UNSET = object()


# -- the grid --------------------------------------------------------------------------------------


@dataclass
class GridPoint:
    """One request of a sweep: its place in the grid, its field values, the request itself."""

    request_id: int
    prompt_id: Any
    repeat: int
    values: dict[str, Any]
    request: CompletionRequest
    key: str = ""


@dataclass
class Plan:
    """A validated sweep, before anything is sent."""

    points: list[GridPoint]
    columns: list[str]
    endpoint: str
    model: str | None
    axes: dict[str, int] = field(default_factory=dict)


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

    taken = {*CHOICE_COLUMNS, *TOKEN_COLUMNS, *ALTERNATIVE_COLUMNS, *_ID_COLUMNS, *_TAIL_COLUMNS}
    return f"request_{field_name}" if field_name in taken else field_name


def _weights_tag(model: str | None) -> str:
    """A fingerprint of the embedded model's weights for the cache key, "" for any other model.

    The embedded model keeps its id when it is retrained (or the package upgraded), so without
    this a cache written by older weights would answer for the new ones.
    """
    try:
        from .model import FILES_DIR, MODEL_ID
    except ImportError:  # pragma: no cover - the model package is part of the distribution
        return ""
    if model != MODEL_ID:
        return ""
    path = Path(FILES_DIR) / "model.safetensors"
    try:
        stat = path.stat()
    except OSError:
        return ""
    return "#weights=" + _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the lru key, so a file replaced in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def expand_grid(client: Any, prompt: Any, *, repeats: int = 1, **fields: Any) -> Plan:
    """Build and validate every request of a sweep (nothing is sent). Used by `sweep`."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise RequestError(
            "repeats",
            f"repeats must be an integer >= 1; got {repeats!r}",
            allowed="an integer >= 1",
            value=repeats,
        )
    unknown = [name for name in fields if name not in FIELDS and name != "extra"]
    if unknown:
        raise RequestError(
            unknown[0],
            f"{unknown[0]!r} is not a Completions request field; sweepable fields are "
            f"{', '.join(f for f in FIELDS if f != 'prompt')}; pass server-specific fields with "
            f"extra={{...}} (a list of dicts sweeps them)",
            allowed="a request field",
            value=fields[unknown[0]],
        )
    if prompt is None:
        raise RequestError(
            "prompt",
            "sweep needs a prompt; got None",
            allowed="a string, a list of prompts or a dict name -> prompt",
            value=None,
        )
    prompts = _prompt_axis(prompt)

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

    limits = getattr(client, "limits", None)
    model = getattr(client, "model", None)
    # Credentials in the URL (user:key@host) decide nothing about a response, and the endpoint is
    # written into the cache file (the capabilities note), so they are left out.
    endpoint = redact_url(str(getattr(client, "endpoint", "") or ""))
    column_of = {name: _column_name(name) for name in fields}
    columns = ["prompt", *column_of.values()]
    if "model" not in columns:
        columns.append("model")
    points: list[GridPoint] = []
    axis_names = list(axes)
    combos = list(itertools.product(*(axes[n] for n in axis_names))) if axis_names else [()]
    request_id = 0
    for prompt_id, one_prompt in prompts:
        for combo in combos:
            chosen = dict(fixed)
            chosen.update(zip(axis_names, combo, strict=True))
            kwargs = {k: v for k, v in chosen.items() if v is not None}
            if kwargs.get("model") is None and model is not None:
                kwargs["model"] = model  # complete_request sends the request's model as it is
            try:
                request = (
                    CompletionRequest(prompt=one_prompt, limits=limits, **kwargs)
                    if limits is not None
                    else CompletionRequest(prompt=one_prompt, **kwargs)
                )
            except RequestError as exc:
                where = _describe({"prompt_id": prompt_id, **{k: chosen[k] for k in axis_names}})
                raise RequestError(
                    exc.param,
                    f"{exc.message} (sweep grid point {where})",
                    allowed=exc.allowed,
                    value=exc.value,
                ) from None
            except TypeError as exc:  # a non-mapping extra, say
                raise RequestError(
                    "extra", f"bad sweep field: {exc}", value=chosen.get("extra")
                ) from None
            columns_values: dict[str, Any] = {"prompt": _column_value(one_prompt)}
            for name in fields:
                columns_values[column_of[name]] = _column_value(chosen[name])
            columns_values.setdefault("model", request.model or model)
            key_endpoint = endpoint + _weights_tag(request.model or model)
            for repeat, key in enumerate(cache_keys(key_endpoint, model, request, repeats)):
                points.append(
                    GridPoint(request_id, prompt_id, repeat, columns_values, request, key)
                )
                request_id += 1
    axis_sizes = {"prompt": len(prompts), **{n: len(v) for n, v in axes.items()}}
    if repeats > 1:
        axis_sizes["repeat"] = repeats
    return Plan(points, columns, endpoint, model, axis_sizes)


# -- the budget -----------------------------------------------------------------------------------


def _embedded_tokenizer(model: str | None) -> Callable[[str], int] | None:
    """Token counter of the embedded model when the sweep's model is it (in-process or served)."""
    try:
        from .model import FILES_DIR, MODEL_ID
    except ImportError:  # pragma: no cover - the model package is part of the distribution
        return None
    if model != MODEL_ID:
        return None
    path = Path(FILES_DIR) / "tokenizer.json"
    if not path.exists():
        return None
    tokenizer = _load_tokenizer(str(path))
    return lambda text: len(tokenizer.encode(text).ids)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: str) -> Any:
    # Loaded once: the SweepBuilder widget re-estimates on every keystroke.
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def estimate_tokens(
    requests: Sequence[CompletionRequest],
    *,
    model: str | None = None,
) -> tuple[int, str]:
    """An estimate of the tokens ``requests`` can consume, and how prompts were counted.

    Per request: prompt tokens (once per prompt: that is how OpenAI and vLLM report and bill them,
    whatever n and best_of are) plus max_tokens (16 when unset) x max(n, best_of) completion tokens
    (best_of candidates are generated and billed although only n come back). The completion part is
    an upper bound. Prompt tokens are exact for token-id prompts and for the embedded model (its
    tokenizer), otherwise ceil(characters / 4), an estimate that can be low for unusual text.
    """
    count = _embedded_tokenizer(model)
    method = "embedded tokenizer" if count is not None else f"characters / {CHARS_PER_TOKEN}"
    counted: dict[str, int] = {}  # a sweep repeats few distinct prompts many times
    total = 0
    for request in requests:
        prompts = request.prompt if request.n_prompts > 1 else [request.prompt]
        prompt_tokens = 0
        for p in prompts:
            if isinstance(p, str):
                if p not in counted:
                    counted[p] = count(p) if count else math.ceil(len(p) / CHARS_PER_TOKEN)
                prompt_tokens += counted[p]
            else:
                prompt_tokens += len(p)
        width = max(request.effective_n, request.best_of or 1)
        max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        total += prompt_tokens + len(prompts) * width * max_tokens
    return total, method


# -- results ---------------------------------------------------------------------------------------


def _error_fields(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, APIError):
        kind = exc.type or exc.code or type(exc).__name__
        return {"error_type": kind, "error_status": exc.status, "error_message": exc.message}
    return {"error_type": type(exc).__name__, "error_status": None, "error_message": str(exc)}


def _error_text(kind: Any, status: Any, message: Any) -> str:
    head = f"{kind} ({int(status)})" if status is not None and status == status else f"{kind}"
    return f"{head}: {message}"


@dataclass
class _Outcome:
    response: dict[str, Any] | None = None
    latency: float | None = None
    cached: bool = False
    error: dict[str, Any] | None = None
    entry: CachedResponse | None = None  # a cache hit, its JSON parsed only when frames need it

    @property
    def raw(self) -> dict[str, Any] | None:
        if self.response is None and self.entry is not None:
            return self.entry.response
        return self.response

    @property
    def usage(self) -> Mapping[str, Any]:
        if self.entry is not None and self.response is None:
            return self.entry.usage
        usage = (self.response or {}).get("usage")
        return usage if isinstance(usage, Mapping) else {}

    @property
    def response_id(self) -> Any:
        if self.entry is not None and self.response is None:
            return self.entry.response_id
        return (self.response or {}).get("id")


class SweepResult:
    """The outcome of a sweep: one row per request in ``requests``, tidy frames for analysis.

    - ``choices``, ``tokens``, ``alternatives``: the frames of `nbcompletions.to_frames` for every
      response, with ``request_id``, ``prompt_id``, ``repeat``, one column per request field given
      to the sweep (lists and dicts as JSON text; ``echo`` is named ``request_echo`` because the
      tokens frame has an ``echo`` column of its own), and ``cached`` and ``error`` (None, or
      "type (status): message"). A failed request has one row per expected choice in ``choices``,
      ``error`` set and the response columns empty; it has no rows in ``tokens``/``alternatives``.
      Rows are in grid order whatever order responses arrived in. Built on first access.
    - ``requests``: one row per request: ids, fields, ``status`` ("ok", "cached" or "error"),
      ``error_type``, ``error_status``, ``error_message``, usage, ``latency`` (seconds, including
      the client's retries; for cached rows the original latency) and the response id.
    - ``usage``: tokens spent by this run (cache hits excluded), tokens the cache saved, counts, and
      the pre-flight estimate.
    - ``capabilities``: what the endpoint was found to support (see `nbcompletions._scoring`).
    """

    def __init__(
        self,
        requests: pd.DataFrame,
        *,
        usage: Mapping[str, Any] | None = None,
        capabilities: Mapping[str, Any] | None = None,
        frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None,
        builder: Callable[[], tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] | None = None,
    ) -> None:
        if frames is None and builder is None:
            raise ValueError("SweepResult needs frames or a builder")
        self.requests = requests
        self.usage: dict[str, Any] = dict(usage or {})
        self.capabilities: dict[str, Any] | None = dict(capabilities) if capabilities else None
        self._frames = frames
        self._builder = builder

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(choices, tokens, alternatives)``, built once."""
        if self._frames is None:
            assert self._builder is not None
            self._frames = self._builder()
            self._builder = None  # drop the raw responses once the frames hold them
        return self._frames

    @property
    def choices(self) -> pd.DataFrame:
        return self.frames()[0]

    @property
    def tokens(self) -> pd.DataFrame:
        return self.frames()[1]

    @property
    def alternatives(self) -> pd.DataFrame:
        return self.frames()[2]

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def n_failed(self) -> int:
        return int((self.requests["status"] == "error").sum())

    @property
    def n_cached(self) -> int:
        return int((self.requests["status"] == "cached").sum())

    def __repr__(self) -> str:
        return (
            f"SweepResult({len(self)} requests, {self.n_cached} cached, "
            f"{self.n_failed} failed, "
            f"{self.usage.get('total_tokens', 0)} tokens spent)"
        )

    def to_parquet(self, path: str | os.PathLike[str]) -> Path:
        """Write the frames, the requests and the metadata into directory ``path`` (created)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        choices, tokens, alternatives = self.frames()
        for name, frame in (
            ("requests", self.requests),
            ("choices", choices),
            ("tokens", tokens),
            ("alternatives", alternatives),
        ):
            frame.to_parquet(directory / f"{name}.parquet", index=False)
        meta = {"format": 1, "usage": self.usage, "capabilities": self.capabilities}
        (directory / "sweep.json").write_text(
            json.dumps(meta, indent=1, default=str), encoding="utf-8"
        )
        return directory


def load_sweep(path: str | os.PathLike[str]) -> SweepResult:
    """Read a directory written by `SweepResult.to_parquet`."""
    import pandas as pd

    directory = Path(path)
    meta_path = directory / "sweep.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{str(directory)!r} holds no sweep (no sweep.json); write one "
            "with SweepResult.to_parquet(dir)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    frames = tuple(
        _tidy_strings(pd.read_parquet(directory / f"{name}.parquet"))
        for name in ("choices", "tokens", "alternatives")
    )
    requests = _tidy_strings(pd.read_parquet(directory / "requests.parquet"))
    return SweepResult(
        requests,
        usage=meta.get("usage"),
        capabilities=meta.get("capabilities"),
        frames=(frames[0], frames[1], frames[2]),
    )


def _tidy_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """String columns as the frames layer keeps them: object dtype, None where missing.

    Parquet reads strings back as pandas' ``str`` dtype (pandas 3) with NaN for missing, and
    concatenating failed requests' rows leaves NaN in object columns; both are brought back here, so
    a result, its frames and its saved copy all compare equal.
    """
    import pandas as pd

    for name in frame.columns:
        column = frame[name]
        if isinstance(column.dtype, pd.StringDtype):
            values = column.astype(object)
        elif pd.api.types.is_object_dtype(column.dtype):
            present = column[column.notna()]
            if not all(isinstance(v, str) for v in present):
                continue
            values = column
        else:
            continue
        frame[name] = values.where(values.notna(), None)
    return frame


def _requests_frame(plan: Plan, outcomes: Sequence[_Outcome]) -> pd.DataFrame:
    import pandas as pd

    rows: dict[str, list[Any]] = {
        name: []
        for name in (
            *_ID_COLUMNS,
            *plan.columns,
            "status",
            "cached",
            "error",
            "error_type",
            "error_status",
            "error_message",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "latency",
            "response_id",
            "cache_key",
        )
    }
    for point, outcome in zip(plan.points, outcomes, strict=True):
        rows["request_id"].append(point.request_id)
        rows["prompt_id"].append(point.prompt_id)
        rows["repeat"].append(point.repeat)
        for name in plan.columns:
            rows[name].append(point.values.get(name))
        usage = outcome.usage
        err = outcome.error or {}
        status = "error" if outcome.error else ("cached" if outcome.cached else "ok")
        rows["status"].append(status)
        rows["cached"].append(outcome.cached)
        rows["error"].append(
            _error_text(err["error_type"], err["error_status"], err["error_message"])
            if outcome.error
            else None
        )
        rows["error_type"].append(err.get("error_type"))
        rows["error_status"].append(err.get("error_status"))
        rows["error_message"].append(err.get("error_message"))
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(name)
            rows[name].append(value if isinstance(value, int) else None)
        rows["latency"].append(outcome.latency)
        rows["response_id"].append(outcome.response_id)
        rows["cache_key"].append(point.key)
    frame = pd.DataFrame(rows)
    for name in ("error_status", "prompt_tokens", "completion_tokens", "total_tokens"):
        frame[name] = frame[name].astype("Int64")
    frame["latency"] = frame["latency"].astype(float)
    frame["cached"] = frame["cached"].astype(bool)
    return _tidy_strings(frame)


def _merged_frames(
    members: list[tuple[GridPoint, dict[str, Any]]],
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int | None,
) -> list[tuple[pd.DataFrame, Any]]:
    """Frames of many echo-free responses from one `to_frames` call.

    Converting 10,000 small responses one by one costs milliseconds each in pandas overhead;
    stacking their choices into one response (re-indexed 0, 1, 2 ...) and mapping the indices back
    afterwards gives the same rows at a fraction of the cost. Only responses whose request did not
    echo are merged: for them nothing depends on the prompt, and ``max_tokens`` and ``logprobs``
    are shared by the group.
    """
    import numpy as np
    import pandas as pd

    from ._frames import to_frames

    merged: list[dict[str, Any]] = []
    owner: list[int] = []
    original: list[int] = []
    width: list[int] = []
    for point, response in members:
        choices = [c for c in response.get("choices") or [] if isinstance(c, Mapping)]
        for position, choice in sorted(
            enumerate(choices), key=lambda item: choice_index(item[1], item[0])
        ):
            original.append(choice_index(choice, position))
            merged.append({**choice, "index": len(merged)})
            owner.append(point.request_id)
            width.append(point.request.effective_n)
    frames = to_frames(
        {"choices": merged},
        {"n": 1, "echo": False, "max_tokens": max_tokens, "logprobs": logprobs},
        vocab_size=vocab_size,
    )
    owners = np.asarray(owner, dtype=np.int64)
    originals = np.asarray(original, dtype=np.int64)
    widths = np.asarray(width, dtype=np.int64)
    out = []
    for frame in frames:
        where = frame["index"].to_numpy(dtype=np.int64)
        fixed = frame.assign(index=originals[where])
        if "prompt_index" in fixed.columns:
            fixed["prompt_index"] = pd.array(originals[where] // widths[where], dtype="Int64")
            fixed["choice"] = pd.array(originals[where] % widths[where], dtype="Int64")
        out.append((fixed, owners[where]))
    return out


def _build_frames(
    plan: Plan, outcomes: Sequence[_Outcome], requests: pd.DataFrame, vocab_size: int | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every response's frames, stacked in grid order, with the request's columns in front."""
    import numpy as np
    import pandas as pd

    from ._frames import to_frames

    templates = to_frames({"choices": []}, {"n": 1})
    pieces: list[list[tuple[pd.DataFrame, Any]]] = [[], [], []]
    groups: dict[tuple[Any, Any], list[tuple[GridPoint, dict[str, Any]]]] = {}
    for point, outcome in zip(plan.points, outcomes, strict=True):
        request = point.request
        raw = outcome.raw
        if raw is None or outcome.error is not None:
            # One row per expected choice, so a failed grid point still counts in a groupby.
            n = request.effective_n
            failed = pd.DataFrame(
                {
                    "index": np.arange(n, dtype=np.int64),
                    "prompt_index": pd.array(np.zeros(n, np.int64), dtype="Int64"),
                    "choice": pd.array(np.arange(n), dtype="Int64"),
                }
            )
            pieces[0].append((failed, np.full(n, point.request_id, dtype=np.int64)))
        elif request.echo:
            # Echoed prompts need the request's own prompt to split prompt from completion.
            for i, frame in enumerate(to_frames(raw, request, vocab_size=vocab_size)):
                pieces[i].append((frame, np.full(len(frame), point.request_id, dtype=np.int64)))
        else:
            groups.setdefault((request.max_tokens, request.logprobs), []).append((point, raw))
    for (max_tokens, logprobs), members in groups.items():
        for i, piece in enumerate(_merged_frames(members, max_tokens, logprobs, vocab_size)):
            pieces[i].append(piece)

    per_request = requests[[*_ID_COLUMNS, *plan.columns, *_TAIL_COLUMNS]]
    result = []
    for template, parts in zip(templates, pieces, strict=True):
        parts = [(frame, owner) for frame, owner in parts if len(frame)]
        if parts:
            body = pd.concat([template, *(frame for frame, _ in parts)], ignore_index=True)
            owner = np.concatenate([owner for _, owner in parts])
            # Grid order; within a request each part is already in (index, position) order.
            order = np.argsort(owner, kind="stable")
            body = body.iloc[order].reset_index(drop=True)
            owner = owner[order]
        else:
            body, owner = template.copy(), np.zeros(0, dtype=np.int64)
        for column in template.columns:  # failed rows leave NA where the template has none
            if body[column].dtype != template[column].dtype:
                body[column] = body[column].astype(template[column].dtype)
        body = body[list(template.columns)]
        # request_id == position in `requests`, so the broadcast is a positional take.
        front = per_request.iloc[owner].reset_index(drop=True)
        frame = pd.concat(
            [front[[*_ID_COLUMNS, *plan.columns]], body, front[list(_TAIL_COLUMNS)]], axis=1
        )
        frame = _tidy_strings(frame)
        frame.attrs["vocab_size"] = vocab_size
        result.append(frame)
    return result[0], result[1], result[2]


# -- running ---------------------------------------------------------------------------------------


def _progress_bar(total: int, enabled: bool, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="sweep", unit="req", dynamic_ncols=True)


def _client_concurrency(client: Any) -> int:
    for name in ("max_concurrency", "_max_concurrency"):
        value = getattr(client, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 16


def _check_concurrency(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(
            "max_concurrency",
            f"max_concurrency must be an integer >= 1 or None; got {value!r}",
            allowed="an integer >= 1 or None",
            value=value,
        )


def _check_budget(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise RequestError(
            "budget",
            f"budget must be a number of tokens >= 0 or None; got {value!r}",
            allowed="a number >= 0 or None",
            value=value,
        )


# Failures that become error rows. Anything else (a bug, a cancellation) stops the sweep.
def _failure_types() -> tuple[type[BaseException], ...]:
    import httpx

    return (NBCompletionsError, httpx.HTTPError, OSError, TimeoutError, asyncio.TimeoutError)


@dataclass
class _Prepared:
    plan: Plan
    outcomes: list[_Outcome]
    cache: Cache | None
    owns_cache: bool
    estimate: int
    estimate_method: str
    pending: list[int]
    same_as: list[tuple[int, int]] = field(default_factory=list)  # (duplicate, point it copies)


def _prepare(
    client: Any,
    prompt: Any,
    repeats: int,
    cache: Any,
    max_concurrency: Any,
    budget: Any,
    fields: dict[str, Any],
) -> _Prepared:
    """Expand, validate, read the cache and check the budget: all before a single request."""
    _check_concurrency(max_concurrency)
    _check_budget(budget)
    plan = expand_grid(client, prompt, repeats=repeats, **fields)
    owns = False
    store: Cache | None
    if cache is None or isinstance(cache, Cache):
        store = cache
    elif isinstance(cache, str | os.PathLike):
        store, owns = Cache(cache), True
    else:
        raise RequestError(
            "cache",
            f"cache must be a file path, a Cache or None; got {cache!r}",
            allowed="a path or a Cache",
            value=cache,
        )
    outcomes = [_Outcome() for _ in plan.points]
    if store is not None:
        hits = store.get_many(point.key for point in plan.points)
        for point, outcome in zip(plan.points, outcomes, strict=True):
            hit = hits.get(point.key)
            if hit is not None:
                outcome.entry, outcome.latency, outcome.cached = hit, hit.latency, True
    # Grid points with the same key (a prompt listed twice, a repeated axis value) are one request:
    # sent once, their rows share its response, as they would on a re-run from the cache.
    pending: list[int] = []
    first_of: dict[str, int] = {}
    same_as: list[tuple[int, int]] = []
    for i, outcome in enumerate(outcomes):
        if outcome.cached:
            continue
        key = plan.points[i].key
        if key in first_of:
            same_as.append((i, first_of[key]))
        else:
            first_of[key] = i
            pending.append(i)
    estimate, method = estimate_tokens([plan.points[i].request for i in pending], model=plan.model)
    if budget is not None and estimate > budget:
        if owns and store is not None:
            store.close()
        raise BudgetError(
            f"this sweep can use up to ~{estimate:,} tokens ({len(pending)} requests to send; "
            f"prompt tokens counted by {method}, completions as max_tokens x max(n, best_of)), "
            f"more than budget={budget:,}; lower max_tokens, repeats or the grid, or raise the "
            "budget",
            estimate=estimate,
            budget=int(budget),
        )
    return _Prepared(plan, outcomes, store, owns, estimate, method, pending, same_as)


async def _probe(aclient: Any, prepared: _Prepared) -> dict[str, Any] | None:
    from ._scoring import acapabilities, cached_capabilities

    meta_key = f"capabilities:{prepared.plan.endpoint}:{prepared.plan.model}"
    known = cached_capabilities(aclient)
    if known is None and prepared.cache is not None:
        known = prepared.cache.get_meta(meta_key)
    if known is None:
        try:
            known = await acapabilities(aclient)
        except _failure_types() as exc:
            return {"error": str(exc)}
    if prepared.cache is not None:
        prepared.cache.set_meta(meta_key, known)
    return known


def _refuse_ignored(capabilities: Mapping[str, Any] | None, plan: Plan) -> None:
    from ._conformance import ConformanceReport, check_sweep

    report = ConformanceReport.from_dict(capabilities) if capabilities else None
    problems = check_sweep(report, [p.request for p in plan.points]) if report else []
    if problems:
        raise ConformanceError(
            "this sweep asks for what the endpoint was measured not to do, so its results would "
            "be wrong; nothing was sent (probe=False sends anyway):\n- " + "\n- ".join(problems),
            check="sweep",
            detail="; ".join(problems),
        )


async def _execute(
    aclient: Any, prepared: _Prepared, *, max_concurrency: int | None, bar: Any, probe: bool
) -> SweepResult:
    plan, outcomes, store = prepared.plan, prepared.outcomes, prepared.cache
    failures = _failure_types()
    spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    n_failed = 0
    capabilities: dict[str, Any] | None = None
    try:
        if probe:
            capabilities = await _probe(aclient, prepared)
            _refuse_ignored(capabilities, plan)
        queue = iter(prepared.pending)
        workers = min(
            max_concurrency or _client_concurrency(aclient), max(len(prepared.pending), 1)
        )

        async def send(i: int) -> None:
            nonlocal n_failed
            point, outcome = plan.points[i], outcomes[i]
            started = time.perf_counter()
            try:
                completion = await aclient.complete_request(point.request)
            except failures as exc:
                outcome.error = _error_fields(exc)
                outcome.latency = time.perf_counter() - started
                n_failed += 1
            else:
                outcome.latency = time.perf_counter() - started
                outcome.response = completion.raw
                if store is not None:
                    store.put(point.key, completion.raw, latency=outcome.latency)
                usage = completion.raw.get("usage") or {}
                for name in spent:
                    value = usage.get(name) if isinstance(usage, Mapping) else None
                    if isinstance(value, int):
                        spent[name] += value
            if bar is not None:
                bar.set_postfix(failed=n_failed, tokens=spent["total_tokens"], refresh=False)
                bar.update(1)

        async def worker() -> None:
            # One shared iterator: each worker takes the next pending request; no task per request.
            for i in queue:
                await send(i)

        if prepared.pending:
            tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # A bug or a cancellation: stop every worker before the cache is closed below.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
    finally:
        if bar is not None:
            bar.close()
        if prepared.owns_cache and store is not None:
            store.close()

    for duplicate, original in prepared.same_as:
        source, target = outcomes[original], outcomes[duplicate]
        target.response, target.error, target.latency = (
            source.response,
            source.error,
            source.latency,
        )
        if source.error:
            n_failed += 1
    requests = _requests_frame(plan, outcomes)
    cached = requests[requests["status"] == "cached"]
    usage = {
        **spent,
        "requests": len(plan.points),
        "sent": len(prepared.pending),
        "cached_requests": len(cached),
        "failed_requests": n_failed,
        "cached_tokens": int(cached["total_tokens"].fillna(0).sum()),
        "estimate": prepared.estimate,
        "estimate_method": prepared.estimate_method,
        "axes": plan.axes,
    }
    return SweepResult(
        requests,
        usage=usage,
        capabilities=capabilities,
        builder=lambda: _build_frames(plan, outcomes, requests, _vocab_size(aclient)),
    )


def _vocab_size(client: Any) -> int | None:
    value = getattr(client, "vocab_size", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def asweep(
    client: Any,
    prompt: Any = None,
    *,
    repeats: int = 1,
    cache: Any = None,
    max_concurrency: int | None = None,
    budget: float | None = None,
    progress: bool = True,
    probe: bool = True,
    **fields: Any,
) -> SweepResult:
    """The async twin of `sweep`, for an `AsyncClient`: ``await asweep(aclient, ...)``.

    Cancelling the task stops the sweep; what finished is in the cache.
    """
    if hasattr(client, "async_client"):
        raise TypeError(
            "asweep() needs an AsyncClient; for a Client call "
            "nbcompletions.sweep(...), which works in Jupyter without await"
        )
    prepared = _prepare(client, prompt, repeats, cache, max_concurrency, budget, fields)
    bar = _progress_bar(
        len(prepared.plan.points), progress, len(prepared.plan.points) - len(prepared.pending)
    )
    return await _execute(client, prepared, max_concurrency=max_concurrency, bar=bar, probe=probe)


def sweep(
    client: Any,
    prompt: Any = None,
    *,
    repeats: int = 1,
    cache: Any = None,
    max_concurrency: int | None = None,
    budget: float | None = None,
    progress: bool = True,
    probe: bool = True,
    **fields: Any,
) -> SweepResult:
    """Send every combination of the listed field values, ``repeats`` times each.

    ``sweep(client, prompt={"hamlet": "To be", "tale": "Once upon"}, temperature=[0.2, 0.7, 1.2],
    max_tokens=32, repeats=20, cache="study.sqlite")``: lists are axes, scalars fixed (see the
    module docstring for ``prompt`` and ``stop``). Every request is validated before the first is
    sent; ``budget`` (tokens) refuses a sweep whose estimate exceeds it (`BudgetError`). ``cache``
    (a path or a `Cache`) stores each response as it arrives, so after an interrupt the same call
    resumes and sends only what is missing. ``max_concurrency`` caps requests in flight (default:
    the client's limit, which also applies). ``probe`` asks the endpoint once what it supports
    (``result.capabilities``; remembered by the client and the cache). ``progress`` shows a tqdm
    bar.

    Works from plain code and from a Jupyter cell (no await); a kernel interrupt stops it cleanly.
    """
    from ._loop import run_sync

    aclient = getattr(client, "async_client", client)
    prepared = _prepare(aclient, prompt, repeats, cache, max_concurrency, budget, fields)
    # The bar is made here, in the caller's thread, so Jupyter displays it under the calling cell.
    bar = _progress_bar(
        len(prepared.plan.points), progress, len(prepared.plan.points) - len(prepared.pending)
    )
    try:
        return run_sync(
            _execute(aclient, prepared, max_concurrency=max_concurrency, bar=bar, probe=probe)
        )
    finally:
        # _execute closes these itself; this covers an interrupt that lands before it started.
        if bar is not None:
            bar.close()
        if prepared.owns_cache and prepared.cache is not None:
            prepared.cache.close()
