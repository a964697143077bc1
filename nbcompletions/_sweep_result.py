"""A sweep's result: the requests frame, tidy frames built on first use (or read from the sweep's
Parquet dataset, `nbcompletions.sweeps.dataset`), saved as Parquet and loaded back, shards of one
study merged."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sweeps.frames import tidy_strings

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["SweepResult", "load_sweep"]


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
      the pre-flight estimate; ``conformance_flags``: the checks of the endpoint's report that this
      run's answers depend on and that could be neither corrected nor refused (the frames carry
      them in ``.attrs["conformance_flags"]`` too).
    - ``capabilities``: what the endpoint was found to support (see `nbcompletions._scoring`).
    - ``dataset``: for a sweep run with ``results=dir`` (or loaded from such a directory), the
      directory of its Parquet dataset (see `nbcompletions.sweeps.dataset`); the frames and
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
        dataset: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if dataset is None and (requests is None or (frames is None and builder is None)):
            raise ValueError("SweepResult needs requests and frames (or a builder), or a dataset")
        # One directory, or the shards of one study (`load_sweep` of several): ``dataset`` is the
        # first, ``datasets`` all of them.
        self.datasets = (
            None
            if dataset is None
            else [Path(dataset)]
            if isinstance(dataset, str | os.PathLike)
            else [Path(d) for d in dataset]
        )
        self.dataset = self.datasets[0] if self.datasets else None
        self._requests = requests
        self.usage: dict[str, Any] = dict(usage or {})
        self.capabilities: dict[str, Any] | None = dict(capabilities) if capabilities else None
        self._frames = frames
        self._builder = builder
        self._vocab_size = vocab_size  # what a dataset's frames carry in attrs

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
        from .sweeps.dataset import read_frame

        assert self.datasets is not None
        return tidy_strings(read_frame(self.datasets, frame, columns=columns, filter=filter))

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
            flags = self.usage.get("conformance_flags")
            if flags:  # checks the endpoint fails that these answers depend on
                for frame in self._frames:
                    frame.attrs["conformance_flags"] = list(flags)
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
        at a time (`nbcompletions.sweeps.dataset.write_frame_file`), so a study bigger than
        memory can be saved; they stay unread.
        """
        from .sweeps.dataset import require_pyarrow, write_frame_file

        require_pyarrow()
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
                assert self.datasets is not None  # otherwise frames() and requests are in memory
                write_frame_file(self.datasets, name, target)
            else:
                frame.to_parquet(target, index=False)
        meta = {"format": 1, "usage": self.usage, "capabilities": self.capabilities}
        (directory / "sweep.json").write_text(
            json.dumps(meta, indent=1, default=str), encoding="utf-8"
        )
        return directory


def load_sweep(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> SweepResult:
    """Read a sweep written by `SweepResult.to_parquet` or ``sweep(..., results=dir)``.

    Several directories (a list, or a glob such as ``"study/shard-*"``) are the shards of one
    study (``sweep(..., shard=(i, k))``): they are read as one result, rows in grid order, usage
    added up. A request id found in two of them raises ValueError (not shards of one grid).
    """
    from .sweeps.dataset import require_pyarrow

    require_pyarrow()
    directories = _sweep_directories(path)
    metas = [_read_meta(directory) for directory in directories]
    if len(directories) == 1:
        return _load_one(directories[0], metas[0])
    usage = _merged_usage([meta.get("usage") or {} for meta in metas])
    capabilities = metas[0].get("capabilities")
    if all(meta.get("format") == 2 for meta in metas):  # streamed datasets: read lazily
        vocab = metas[0].get("vocab_size")
        result = SweepResult(
            dataset=directories,
            usage=usage,
            capabilities=capabilities,
            vocab_size=vocab if isinstance(vocab, int) else None,
        )
        _refuse_overlap(result.read("requests", columns=["request_id"]), directories)
        return result
    loaded = [_load_one(d, m) for d, m in zip(directories, metas, strict=True)]
    requests = _in_grid_order([one.requests for one in loaded])
    _refuse_overlap(requests, directories)
    choices, tokens, alternatives = (
        _in_grid_order([one.frames()[n] for one in loaded]) for n in range(3)
    )
    return SweepResult(
        requests,
        usage=usage,
        capabilities=capabilities,
        frames=(choices, tokens, alternatives),
    )


def _sweep_directories(path: Any) -> list[Path]:
    if isinstance(path, str | os.PathLike):
        text = os.fspath(path)
        if any(mark in text for mark in "*?["):
            import glob

            found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_dir())
            if not found:
                raise FileNotFoundError(f"no sweep directory matches {text!r}")
            return found
        return [Path(path)]
    directories = [Path(p) for p in path]
    if not directories:
        raise ValueError("load_sweep() needs at least one directory; got an empty list")
    return directories


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / "sweep.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{str(directory)!r} holds no sweep (no sweep.json); write one "
            "with SweepResult.to_parquet(dir) or sweep(..., results=dir)"
        )
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta


def _load_one(directory: Path, meta: Mapping[str, Any]) -> SweepResult:
    import pandas as pd

    if meta.get("format") == 2:  # a streamed dataset: read lazily
        vocab = meta.get("vocab_size")
        return SweepResult(
            dataset=directory,
            usage=meta.get("usage"),
            capabilities=meta.get("capabilities"),
            vocab_size=vocab if isinstance(vocab, int) else None,
        )
    frames = tuple(
        tidy_strings(pd.read_parquet(directory / f"{name}.parquet"))
        for name in ("choices", "tokens", "alternatives")
    )
    requests = tidy_strings(pd.read_parquet(directory / "requests.parquet"))
    return SweepResult(
        requests,
        usage=meta.get("usage"),
        capabilities=meta.get("capabilities"),
        frames=(frames[0], frames[1], frames[2]),
    )


def _merged_usage(usages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Shards' usage: counts and tokens added up; the rest (axes, method) from the first."""
    merged: dict[str, Any] = dict(usages[0])
    for name, value in usages[0].items():
        if isinstance(value, int) and not isinstance(value, bool):
            merged[name] = sum(u.get(name, 0) for u in usages if isinstance(u.get(name, 0), int))
    merged["shards"] = [u.get("shard") for u in usages]
    merged.pop("shard", None)
    return merged


def _in_grid_order(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.concat(list(frames), ignore_index=True)
    order = frame["request_id"].to_numpy().argsort(kind="stable")
    return tidy_strings(frame.iloc[order].reset_index(drop=True))


def _refuse_overlap(requests: pd.DataFrame, directories: Sequence[Path]) -> None:
    repeated = requests["request_id"][requests["request_id"].duplicated()]
    if len(repeated):
        shown = ", ".join(str(int(i)) for i in repeated.unique()[:5])
        raise ValueError(
            f"request ids {shown} appear in more than one of {[str(d) for d in directories]}: "
            "these are not shards of one sweep (sweep(..., shard=(i, k)) with the same k)"
        )
