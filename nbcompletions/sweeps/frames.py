"""A sweep's outcomes as frames: the requests frame (one row per grid point) and the choices,
tokens and alternatives frames of every response, stacked in grid order.

The memory sink builds them once for the whole grid; the dataset sink for each part it writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._chat import ChatRequest
from .._gc_pause import paused_gc
from .._grid import ID_COLUMNS, TAIL_COLUMNS, Grid, GridPoint
from .._parse import choice_index
from .outcome import TOKEN_FIELDS, Outcome

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["build_frames", "error_text", "requests_frame", "tidy_strings"]


def error_text(kind: Any, status: Any, message: Any) -> str:
    """The ``error`` column: "type (status): message"."""
    head = f"{kind} ({int(status)})" if status is not None and status == status else f"{kind}"
    return f"{head}: {message}"


def tidy_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """String columns as the frames layer keeps them: object dtype, None where missing.

    Parquet reads strings back as pandas' ``str`` dtype (pandas 3) with NaN for missing, and
    concatenating failed requests' rows leaves NaN in object columns; both are brought back here, so
    a result, its frames and its saved copy all compare equal.
    """
    import pandas as pd

    for name in frame.columns:
        column = frame[name]
        if isinstance(column.dtype, pd.StringDtype):
            values = column.array.to_numpy(dtype=object, na_value=None)
            frame[name] = pd.Series(values, index=frame.index, dtype=object, name=name)
        elif pd.api.types.is_object_dtype(column.dtype):
            # One scan for missing values (the most of this function's time on the token frames
            # a streamed sweep writes every batch); a column missing none has nothing to replace.
            missing = column.isna().to_numpy()
            if not missing.any():
                continue
            present = column[~missing]
            # infer_dtype scans in C: a Python-level isinstance loop was 40% of building frames.
            if len(present) and pd.api.types.infer_dtype(present, skipna=False) != "string":
                continue
            frame[name] = column.where(~missing, None)
    return frame


def requests_frame(
    grid: Grid, points: Sequence[GridPoint], outcomes: Sequence[Outcome]
) -> pd.DataFrame:
    """One row per grid point of ``points`` (all of a sweep, or a streamed part), in that order."""
    import pandas as pd

    rows: dict[str, list[Any]] = {
        name: []
        for name in (
            *ID_COLUMNS,
            *grid.columns,
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
    for point, outcome in zip(points, outcomes, strict=True):
        rows["request_id"].append(point.request_id)
        rows["prompt_id"].append(point.prompt_id)
        rows["repeat"].append(point.repeat)
        for name in grid.columns:
            rows[name].append(point.values.get(name))
        usage = outcome.usage
        err = outcome.error or {}
        status = "error" if outcome.error else ("cached" if outcome.cached else "ok")
        rows["status"].append(status)
        rows["cached"].append(outcome.cached)
        rows["error"].append(
            error_text(err["error_type"], err["error_status"], err["error_message"])
            if outcome.error
            else None
        )
        rows["error_type"].append(err.get("error_type"))
        rows["error_status"].append(err.get("error_status"))
        rows["error_message"].append(err.get("error_message"))
        for name in TOKEN_FIELDS:
            rows[name].append(usage[name])
        rows["latency"].append(outcome.latency)
        rows["response_id"].append(outcome.response_id)
        rows["cache_key"].append(point.key)
    frame = pd.DataFrame(rows)
    for name in ("error_status", "prompt_tokens", "completion_tokens", "total_tokens"):
        frame[name] = frame[name].astype("Int64")
    frame["latency"] = frame["latency"].astype(float)
    frame["cached"] = frame["cached"].astype(bool)
    return tidy_strings(frame)


def _converter(api: str, max_tokens: int | None, logprobs: int | None) -> Any:
    """The frames of one merged response: `to_frames` for completions, `chat_frames` (with the
    chat columns) for chat, where ``logprobs`` is the group's ``top_logprobs``."""
    from .._frames import to_frames

    if api == "chat":
        from types import SimpleNamespace

        from .._chat_frames import chat_frames

        merged = SimpleNamespace(n=1, top_logprobs=logprobs, api=api)
        return lambda body, vocab_size: chat_frames(body, merged, vocab_size=vocab_size)
    info = {"n": 1, "echo": False, "max_tokens": max_tokens, "logprobs": logprobs}
    return lambda body, vocab_size: to_frames(body, info, vocab_size=vocab_size)


def _merged_frames(
    members: list[tuple[int, GridPoint, dict[str, Any]]],  # (position in the frame, point, raw)
    convert: Any,  # `_converter`'s function
    vocab_size: int | None,
) -> list[tuple[pd.DataFrame, Any]]:
    """Frames of many echo-free responses from one `to_frames` call.

    Converting 10,000 small responses one by one costs milliseconds each in pandas overhead;
    stacking their choices into one response (re-indexed 0, 1, 2 ...) and mapping the indices back
    afterwards gives the same rows at a fraction of the cost. Only responses whose request did not
    echo are merged: for them nothing depends on the prompt, and ``max_tokens`` and ``logprobs``
    are shared by the group (chat responses are merged the same way, by their ``top_logprobs``).
    """
    import numpy as np
    import pandas as pd

    merged: list[dict[str, Any]] = []
    owner: list[int] = []
    original: list[int] = []
    width: list[int] = []
    for slot, point, response in members:
        choices = [c for c in response.get("choices") or [] if isinstance(c, Mapping)]
        for position, choice in sorted(
            enumerate(choices), key=lambda item: choice_index(item[1], item[0])
        ):
            original.append(choice_index(choice, position))
            merged.append({**choice, "index": len(merged)})
            owner.append(slot)
            width.append(point.request.effective_n)
    frames = convert({"choices": merged}, vocab_size)
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


def build_frames(
    grid: Grid,
    points: Sequence[GridPoint],
    outcomes: Sequence[Outcome],
    requests: pd.DataFrame,
    vocab_size: int | None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The frames of every response of ``points``, stacked in that order, with the request's
    columns in front; ``outcomes`` and the ``requests`` rows are in the same order.

    The garbage collector is held off meanwhile (`paused_gc`): the answers parsed here (kept as
    bytes or cache rows until now) are all alive until their frames are built, and the collector
    walked them over and over as they were parsed (a 2,000-request chat sweep: ~1 s of its 2)."""
    with paused_gc():
        return _stacked_frames(grid, points, outcomes, requests, vocab_size)


def _stacked_frames(
    grid: Grid,
    points: Sequence[GridPoint],
    outcomes: Sequence[Outcome],
    requests: pd.DataFrame,
    vocab_size: int | None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    import numpy as np
    import pandas as pd

    from .._frames import to_frames

    templates = _converter(grid.api, None, None)({"choices": []}, None)
    pieces: list[list[tuple[pd.DataFrame, Any]]] = [[], [], []]
    groups: dict[tuple[Any, Any], list[tuple[int, GridPoint, dict[str, Any]]]] = {}
    for position, (point, outcome) in enumerate(zip(points, outcomes, strict=True)):
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
                    **(
                        {"api": np.full(n, grid.api, dtype=object)}
                        if grid.api != "completions"
                        else {}
                    ),
                }
            )
            pieces[0].append((failed, np.full(n, position, dtype=np.int64)))
        elif isinstance(request, ChatRequest):
            groups.setdefault((None, request.top_logprobs), []).append((position, point, raw))
        elif request.echo:
            # Echoed prompts need the request's own prompt to split prompt from completion.
            for i, frame in enumerate(to_frames(raw, request, vocab_size=vocab_size)):
                pieces[i].append((frame, np.full(len(frame), position, dtype=np.int64)))
        else:
            groups.setdefault((request.max_tokens, request.logprobs), []).append(
                (position, point, raw)
            )
    for (max_tokens, logprobs), members in groups.items():
        convert = _converter(grid.api, max_tokens, logprobs)
        for i, piece in enumerate(_merged_frames(members, convert, vocab_size)):
            pieces[i].append(piece)

    per_request = requests[[*ID_COLUMNS, *grid.columns, *TAIL_COLUMNS]]
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
        # owner is the position in `requests`, so the broadcast is a positional take.
        front = per_request.iloc[owner].reset_index(drop=True)
        frame = pd.concat(
            [front[[*ID_COLUMNS, *grid.columns]], body, front[list(TAIL_COLUMNS)]], axis=1
        )
        frame = tidy_strings(frame)
        frame.attrs["vocab_size"] = vocab_size
        result.append(frame)
    return result[0], result[1], result[2]
