"""A sweep's result: the requests frame, tidy frames built on first use (or read from the sweep's
Parquet dataset, `nbcompletions._results`), saved as Parquet."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cache import CachedResponse
from ._grid import _ID_COLUMNS, _TAIL_COLUMNS, Grid, GridPoint
from ._parse import choice_index

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["SweepResult", "load_sweep"]


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
    - ``dataset``: for a sweep run with ``results=dir`` (or loaded from such a directory), the
      directory of its Parquet dataset (see `nbcompletions._results`); the frames and
      ``requests`` are then read from it on first access, and `read` loads part of one frame.
    """

    def __init__(
        self,
        requests: pd.DataFrame | None = None,
        *,
        usage: Mapping[str, Any] | None = None,
        capabilities: Mapping[str, Any] | None = None,
        frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None,
        builder: Callable[[], tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] | None = None,
        dataset: str | os.PathLike[str] | None = None,
    ) -> None:
        if dataset is None and (requests is None or (frames is None and builder is None)):
            raise ValueError("SweepResult needs requests and frames (or a builder), or a dataset")
        self.dataset = Path(dataset) if dataset is not None else None
        self._requests = requests
        self.usage: dict[str, Any] = dict(usage or {})
        self.capabilities: dict[str, Any] | None = dict(capabilities) if capabilities else None
        self._frames = frames
        self._builder = builder
        self._vocab_size: int | None = None  # what a dataset's frames carry in attrs

    @property
    def requests(self) -> pd.DataFrame:
        """One row per request (read from the dataset on first access, for a streamed sweep)."""
        if self._requests is None:
            assert self.dataset is not None
            self._requests = self.read("requests")
        return self._requests

    def read(
        self, frame: str, *, columns: Sequence[str] | None = None, filter: Any = None
    ) -> pd.DataFrame:
        """Part of one frame of a streamed sweep, read from its Parquet dataset.

        ``frame`` is "requests", "choices", "tokens" or "alternatives"; ``columns`` and
        ``filter`` (a pyarrow expression, ``pyarrow.dataset.field("temperature") >= 1``) are
        applied while reading, so a study too big for memory can still be sliced.
        """
        if self.dataset is None:
            raise ValueError(
                "this sweep's results are in memory, not in a dataset: use its frames, or run "
                "the sweep with results='dir/'"
            )
        from ._results import read_frame

        return _tidy_strings(read_frame(self.dataset, frame, columns=columns, filter=filter))

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(choices, tokens, alternatives)``, built (or read) once."""
        if self._frames is None:
            if self._builder is None:
                choices, tokens, alternatives = (
                    self.read(name) for name in ("choices", "tokens", "alternatives")
                )
                for frame in (choices, tokens, alternatives):
                    frame.attrs["vocab_size"] = self._vocab_size
                self._frames = (choices, tokens, alternatives)
            else:
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

    def _counted(self, name: str) -> int | None:
        # A streamed result answers counts from its usage, without reading the dataset.
        value = self.usage.get(name) if self._requests is None else None
        return value if isinstance(value, int) else None

    def __len__(self) -> int:
        counted = self._counted("requests")
        return len(self.requests) if counted is None else counted

    @property
    def n_failed(self) -> int:
        counted = self._counted("failed_requests")
        return int((self.requests["status"] == "error").sum()) if counted is None else counted

    @property
    def n_cached(self) -> int:
        counted = self._counted("cached_requests")
        return int((self.requests["status"] == "cached").sum()) if counted is None else counted

    def __repr__(self) -> str:
        return (
            f"SweepResult({len(self)} requests, {self.n_cached} cached, "
            f"{self.n_failed} failed, "
            f"{self.usage.get('total_tokens', 0)} tokens spent)"
        )

    def to_parquet(self, path: str | os.PathLike[str]) -> Path:
        """Write the frames, the requests and the metadata into directory ``path`` (created).

        A streamed sweep's frames that were not read yet are copied from its dataset a row group
        at a time (`nbcompletions._results.write_frame_file`), so a study bigger than memory can
        be saved; they stay unread.
        """
        from ._results import write_frame_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        in_memory = {"requests": self._requests}
        if self._frames is not None or self.dataset is None:
            choices, tokens, alternatives = self.frames()
            in_memory.update(choices=choices, tokens=tokens, alternatives=alternatives)
        for name in ("requests", "choices", "tokens", "alternatives"):
            target = directory / f"{name}.parquet"
            frame = in_memory.get(name)
            if frame is None:
                assert self.dataset is not None  # otherwise frames() and requests are in memory
                write_frame_file(self.dataset, name, target)
            else:
                frame.to_parquet(target, index=False)
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
            "with SweepResult.to_parquet(dir) or sweep(..., results=dir)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") == 2:  # a streamed dataset: read lazily
        result = SweepResult(
            dataset=directory, usage=meta.get("usage"), capabilities=meta.get("capabilities")
        )
        vocab = meta.get("vocab_size")
        result._vocab_size = vocab if isinstance(vocab, int) else None
        return result
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


def _requests_frame(
    grid: Grid, outcomes: Sequence[_Outcome], points: Sequence[GridPoint] | None = None
) -> pd.DataFrame:
    """One row per grid point: every point of ``grid``, or only ``points`` (a streamed part)."""
    import pandas as pd

    rows: dict[str, list[Any]] = {
        name: []
        for name in (
            *_ID_COLUMNS,
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
    for point, outcome in zip(grid.points if points is None else points, outcomes, strict=True):
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
    members: list[tuple[int, GridPoint, dict[str, Any]]],  # (position in the frame, point, raw)
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
    for slot, point, response in members:
        choices = [c for c in response.get("choices") or [] if isinstance(c, Mapping)]
        for position, choice in sorted(
            enumerate(choices), key=lambda item: choice_index(item[1], item[0])
        ):
            original.append(choice_index(choice, position))
            merged.append({**choice, "index": len(merged)})
            owner.append(slot)
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
    grid: Grid,
    outcomes: Sequence[_Outcome],
    requests: pd.DataFrame,
    vocab_size: int | None,
    points: Sequence[GridPoint] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every response's frames, stacked in grid order, with the request's columns in front.

    ``points`` (with their ``outcomes`` and ``requests`` rows, in the same order) builds the
    frames of part of the grid, as a streamed sweep does for each batch it writes.
    """
    import numpy as np
    import pandas as pd

    from ._frames import to_frames

    templates = to_frames({"choices": []}, {"n": 1})
    pieces: list[list[tuple[pd.DataFrame, Any]]] = [[], [], []]
    groups: dict[tuple[Any, Any], list[tuple[int, GridPoint, dict[str, Any]]]] = {}
    chosen = grid.points if points is None else points
    for position, (point, outcome) in enumerate(zip(chosen, outcomes, strict=True)):
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
            pieces[0].append((failed, np.full(n, position, dtype=np.int64)))
        elif request.echo:
            # Echoed prompts need the request's own prompt to split prompt from completion.
            for i, frame in enumerate(to_frames(raw, request, vocab_size=vocab_size)):
                pieces[i].append((frame, np.full(len(frame), position, dtype=np.int64)))
        else:
            groups.setdefault((request.max_tokens, request.logprobs), []).append(
                (position, point, raw)
            )
    for (max_tokens, logprobs), members in groups.items():
        for i, piece in enumerate(_merged_frames(members, max_tokens, logprobs, vocab_size)):
            pieces[i].append(piece)

    per_request = requests[[*_ID_COLUMNS, *grid.columns, *_TAIL_COLUMNS]]
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
            [front[[*_ID_COLUMNS, *grid.columns]], body, front[list(_TAIL_COLUMNS)]], axis=1
        )
        frame = _tidy_strings(frame)
        frame.attrs["vocab_size"] = vocab_size
        result.append(frame)
    return result[0], result[1], result[2]
