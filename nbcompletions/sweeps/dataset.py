"""A sweep's results as a Parquet dataset on disk, written as responses arrive and read lazily.

``sweep(client, ..., results="study/")`` writes, every `FLUSH_EVERY` finished requests, one
Parquet file (one row group) into each of four folders, and a ``sweep.json`` when it ends::

    study/
      sweep.json                 format 2: usage, capabilities, the grid's axes
      requests/part-000000.parquet ...
      choices/part-000000.parquet ...
      tokens/part-000000.parquet ...
      alternatives/part-000000.parquet ...

Each part is complete when it appears (written under a temporary name, then renamed), so the
dataset can be read while the sweep runs (pandas, pyarrow, DuckDB: ``read_parquet('study/
tokens/*.parquet')``) and a crash loses at most the last unwritten batch, which the cache
re-supplies. Each run rewrites the dataset (re-run with the same cache: nothing is paid twice).

The writer owns its directory while it runs (an advisory lock on ``study/.writer.lock``, which
the system drops when a process dies). A second sweep writing into the same directory (the same
call started twice on one cache, to share the work) writes its parts under a directory of its
own, ``study/.staging-<id>/``, and when it ends waits for the owner, then replaces the dataset
with its own complete one: every request once, no part overwritten while it is read or renamed.
Rows are written in the order requests finish; `SweepResult` reads them back in grid order.
Memory stays flat as the grid grows: only the batch being written is held. Saving such a result
(`SweepResult.to_parquet`) merges the parts into one file per frame, in grid order, a row group at
a time (`write_frame_file`), so that stays flat too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .._grid import Grid, GridPoint

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

#: Builds the four frames (requests, choices, tokens, alternatives) of some finished grid points
#: from their outcomes (`nbcompletions.sweeps.sink` passes the one a sweep in memory uses).
FrameBuilder = Callable[
    [Sequence[GridPoint], Sequence[Any]],
    tuple["pd.DataFrame", "pd.DataFrame", "pd.DataFrame", "pd.DataFrame"],
]

__all__ = [
    "FLUSH_EVERY",
    "FRAME_NAMES",
    "DatasetWriter",
    "read_frame",
    "require_pyarrow",
    "scan_frame",
    "write_frame_file",
]

#: Finished requests per written part: a row group big enough for Parquet's columnar encoding to
#: pay, small enough that the batch held in memory stays a few MiB.
FLUSH_EVERY = 1000

#: The dataset's folders, one per frame.
FRAME_NAMES = ("requests", "choices", "tokens", "alternatives")

_FORMAT = 2

#: `write_frame_file`: rows read from one part at a time, and rows per written row group.
SAVE_BATCH_ROWS = 16_384
SAVE_ROW_GROUP_ROWS = 131_072


#: One directory of a dataset, or several (shards of one study) read as one.
Directories: TypeAlias = "str | os.PathLike[str] | Sequence[str | os.PathLike[str]]"

_MISSING_PYARROW = (
    "Parquet results (results=, SweepResult.to_parquet, load_sweep) need pyarrow, which is not "
    "installed: pip install 'nbcompletions[parquet]'"
)


def require_pyarrow() -> None:
    """Raise ImportError naming the ``parquet`` extra when pyarrow cannot be imported."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING_PYARROW) from exc


class _DirectoryLock:
    """An advisory lock on a file that the system drops when its process dies (no stale locks)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a+b")

    def acquire(self, *, wait: bool) -> bool:
        """Take the lock (``wait``: until it is free); False when it is held and not ``wait``."""
        fd = self._file.fileno()
        if sys.platform == "win32":  # pragma: no cover - CI runs Linux and macOS
            import msvcrt

            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                    return True
                except OSError:
                    if not wait:
                        return False
                    time.sleep(0.2)
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        self._file.close()  # closing drops the lock


def _clear(directory: Path) -> None:
    """Remove a dataset's parts and ``sweep.json`` (only our own files)."""
    (directory / "sweep.json").unlink(missing_ok=True)
    for name in FRAME_NAMES:
        for old in (directory / name).glob("part-*.parquet"):
            old.unlink()


class DatasetWriter:
    """Collects finished grid points and writes them as dataset parts, ``flush_every`` at a time,
    into a directory it owns while it runs (see the module docstring for a second writer)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        grid: Grid,
        vocab_size: int | None,
        build: FrameBuilder,
        *,
        flush_every: int | None = None,
    ) -> None:
        require_pyarrow()
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(
                f"results must be a directory for the sweep's Parquet dataset; "
                f"{str(self.directory)!r} is a file"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _DirectoryLock(self.directory / ".writer.lock")
        self.owner = self._lock.acquire(wait=False)
        if self.owner:
            # Each run writes the whole dataset: a re-run (after an interrupt, say) replaces what
            # an earlier run left, and the cache makes it free.
            _clear(self.directory)
            self.parts_directory = self.directory
        else:
            self.parts_directory = self.directory / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for name in FRAME_NAMES:
            (self.parts_directory / name).mkdir(parents=True, exist_ok=True)
        self.grid = grid
        self.vocab_size = vocab_size
        self._build = build
        self.flush_every = FLUSH_EVERY if flush_every is None else flush_every
        self._pending: list[tuple[GridPoint, Any]] = []  # (grid point, its Outcome)
        self._parts = 0
        self.rows = 0

    def add(self, point: GridPoint, outcome: Any) -> None:
        """``point`` has finished (answered, failed or found in the cache)."""
        self._pending.append((point, outcome))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write what has finished since the last flush as one part per frame."""
        if not self._pending:
            return
        batch = sorted(self._pending, key=lambda item: item[0].request_id)
        self._pending = []
        points = [point for point, _ in batch]
        outcomes = [outcome for _, outcome in batch]
        frames = self._build(points, outcomes)
        for name, frame in zip(FRAME_NAMES, frames, strict=True):
            _write_part(self.parts_directory / name / f"part-{self._parts:06d}.parquet", frame)
        self._parts += 1
        self.rows += len(batch)

    def try_own(self) -> bool:
        """True once this writer owns its directory (at once for the first writer)."""
        if not self.owner:
            self.owner = self._lock.acquire(wait=False)
        return self.owner

    def wait_for_directory(self) -> None:
        """Block until this writer owns its directory (at once for the first writer)."""
        if not self.owner:
            self.owner = self._lock.acquire(wait=True)

    def close(self, usage: dict[str, Any], capabilities: dict[str, Any] | None) -> None:
        """Write the last part and ``sweep.json`` (which marks the dataset complete); a second
        writer first waits for the directory (`wait_for_directory`), then puts its parts there."""
        self.flush()
        self.wait_for_directory()
        try:
            if self.parts_directory != self.directory:
                _clear(self.directory)
                for name in FRAME_NAMES:
                    for part in sorted((self.parts_directory / name).glob("part-*.parquet")):
                        os.replace(part, self.directory / name / part.name)
                shutil.rmtree(self.parts_directory, ignore_errors=True)
            meta = {
                "format": _FORMAT,
                "usage": usage,
                "capabilities": capabilities,
                "columns": self.grid.columns,
                "vocab_size": self.vocab_size,
            }
            temporary = self.directory / f".sweep.json.{uuid.uuid4().hex[:8]}.tmp"
            temporary.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
            os.replace(temporary, self.directory / "sweep.json")
        finally:
            self._lock.release()

    def abort(self) -> None:
        """The sweep stopped early: what finished stays on disk for an owner (the cache holds it
        either way); a second writer's parts, a partial copy, are dropped."""
        try:
            if self.parts_directory != self.directory:
                shutil.rmtree(self.parts_directory, ignore_errors=True)
            else:
                self.flush()
        finally:
            self._lock.release()


def _write_part(path: Path, frame: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One thread: pyarrow's default starts a thread pool for each frame, which cost more than the
    # conversion of a part's few thousand rows (and competes with the sweep's event loop).
    table = pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
    # A name of this writer's own: two writers never rename each other's file.
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)  # readers see a whole part or none


def _directories(directory: Any) -> list[Path]:
    if isinstance(directory, str | os.PathLike):
        return [Path(directory)]
    return [Path(d) for d in directory]


def _parts(directories: Sequence[Path], name: str) -> list[Path]:
    return [part for d in directories for part in sorted((d / name).glob("part-*.parquet"))]


def _frame_parts(directory: Directories, name: str) -> tuple[list[Path], pa.Schema]:
    """One frame's part files and their unified schema.

    Parts written early may lack a type for a column that was empty in them (all null); the
    schema is unified over every part's footer so such columns take the type the others give.
    """
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    if name not in FRAME_NAMES:
        raise ValueError(f"frame must be one of {', '.join(FRAME_NAMES)}; got {name!r}")
    files = _parts(_directories(directory), name)
    if not files:
        raise FileNotFoundError(f"{str(directory)!r} holds no {name} parts")
    schemas = [pq.read_schema(f) for f in files]
    return files, pa.unify_schemas(schemas, promote_options="permissive")


def scan_frame(directory: Directories, name: str) -> ds.Dataset:
    """A pyarrow dataset over one frame's parts (``name`` in `FRAME_NAMES`), nothing read yet."""
    import pyarrow.dataset as ds

    files, schema = _frame_parts(directory, name)
    return ds.dataset([str(f) for f in files], schema=schema, format="parquet")


class _Part:
    """One part being merged: its batches in order, the current one and the next row to take."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int) -> None:
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(path)
        self._batches = self._file.iter_batches(batch_size=batch_rows)
        self._schema = schema
        self.batch: pa.RecordBatch | None = None
        self.ids: Any = None  # the batch's request ids (numpy, ascending)
        self.row = 0
        self._next()

    def _next(self) -> None:
        import pyarrow as pa

        for batch in self._batches:
            if batch.num_rows:
                table = pa.Table.from_batches([batch])
                for field in self._schema:  # a column this part never had: all null
                    if field.name not in table.column_names:
                        table = table.append_column(field, pa.nulls(len(table), field.type))
                # The unified schema types the columns this part left all null.
                [self.batch] = table.select(self._schema.names).cast(self._schema).to_batches()
                self.ids = self.batch.column("request_id").to_numpy()
                self.row = 0
                return
        self.batch = self.ids = None
        self._file.close()

    @property
    def head(self) -> int:
        return int(self.ids[self.row])

    def take_below(self, bound: int | None) -> pa.RecordBatch:
        """The rows from the current one on whose request id is below ``bound`` (at least one)."""
        import numpy as np

        assert self.batch is not None
        end = len(self.ids) if bound is None else int(np.searchsorted(self.ids, bound, "left"))
        end = max(end, self.row + 1)
        rows = self.batch.slice(self.row, end - self.row)
        self.row = end
        if self.row >= len(self.ids):
            self._next()
        return rows


def _first_request_id(path: Path) -> int:
    """The smallest request id in a part (its first row: a part is written in grid order), from
    the footer's statistics when it has them."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as part:
        metadata = part.metadata
        column = part.schema_arrow.get_field_index("request_id")
        starts = []
        for group in range(metadata.num_row_groups):
            if metadata.row_group(group).num_rows == 0:
                continue
            stats = metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max:
                first = next(part.iter_batches(batch_size=1, columns=["request_id"]))
                return int(first.column(0)[0].as_py())
            starts.append(int(stats.min))
        return min(starts) if starts else 2**63 - 1


def write_frame_file(
    directory: Directories,
    name: str,
    target: str | os.PathLike[str],
    *,
    batch_rows: int | None = None,
    row_group_rows: int | None = None,
) -> int:
    """Write one frame of a streamed sweep into one Parquet file, rows in grid order, without
    loading the frame: the rows written; they go out in row groups of ``row_group_rows``.

    Each part is already in grid order, and parts hold disjoint requests, so the parts are merged
    (a k-way merge on ``request_id``) holding ``batch_rows`` rows of each part the merge is in.
    A part is opened only when the merge reaches its first request; as requests finish in about
    grid order, few parts are open at once.
    """
    import heapq

    import pyarrow as pa
    import pyarrow.parquet as pq

    batch_rows = SAVE_BATCH_ROWS if batch_rows is None else batch_rows
    row_group_rows = SAVE_ROW_GROUP_ROWS if row_group_rows is None else row_group_rows
    files, schema = _frame_parts(directory, name)
    waiting = sorted((_first_request_id(path), n, path) for n, path in enumerate(files))
    waiting.reverse()  # popped from the end: smallest first request first
    merging: list[tuple[int, int, _Part]] = []  # (head request id, part number, part)
    target = Path(target)
    temporary = target.with_name(target.name + ".tmp")
    written = 0
    held: list[pa.RecordBatch] = []
    held_rows = 0
    with pq.ParquetWriter(temporary, schema) as writer:

        def write_held() -> None:
            nonlocal held, held_rows, written
            if held:
                # One row group: row_group_rows, plus the rest of the slice that crossed it.
                writer.write_table(pa.Table.from_batches(held, schema=schema), held_rows)
                written += held_rows
                held, held_rows = [], 0

        while merging or waiting:
            # Open every part that may hold the next row.
            while waiting and (not merging or waiting[-1][0] <= merging[0][0]):
                _, number, path = waiting.pop()
                part = _Part(path, schema, batch_rows)
                if part.batch is not None:
                    heapq.heappush(merging, (part.head, number, part))
            _, number, part = heapq.heappop(merging)
            bounds = [merging[0][0]] if merging else []
            bounds += [waiting[-1][0]] if waiting else []
            rows = part.take_below(min(bounds) if bounds else None)
            held.append(rows)
            held_rows += rows.num_rows
            if part.batch is not None:
                heapq.heappush(merging, (part.head, number, part))
            if held_rows >= row_group_rows:
                write_held()
        write_held()
    os.replace(temporary, target)
    return written


def read_frame(
    directory: Directories,
    name: str,
    *,
    columns: Sequence[str] | None = None,
    filter: Any = None,
) -> pd.DataFrame:
    """One frame of a streamed sweep as a DataFrame, rows in grid order (strings as Parquet
    gives them; `SweepResult.read` tidies them as the frames layer keeps them).

    ``columns`` and ``filter`` (a ``pyarrow.dataset`` expression such as
    ``pyarrow.dataset.field("temperature") > 0.5``) are applied while reading, so only what they
    select is loaded.
    """
    import pyarrow.compute as pc

    dataset = scan_frame(directory, name)
    wanted = None if columns is None else list(dict.fromkeys(["request_id", *columns]))
    table: pa.Table = dataset.to_table(columns=wanted, filter=filter)
    # Parts hold requests in the order they finished; a stable sort by request keeps each
    # request's rows in their own order.
    table = table.take(pc.sort_indices(table, sort_keys=[("request_id", "ascending")]))
    if columns is not None and "request_id" not in columns:
        table = table.drop_columns(["request_id"])
    frame: pd.DataFrame = table.to_pandas()
    return frame
