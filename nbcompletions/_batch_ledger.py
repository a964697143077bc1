"""The batches a sweep's cache has paid for: the record that keeps a batch from being paid twice.

A batch costs money from the moment the server accepts ``POST /v1/batches``, and the client learns
its id only when the answer arrives. A process that dies in between (a crash, a kernel restart), a
task cancelled while the answer is on its way, or an answer lost on the wire (which the client
retries: a second batch) would leave a running batch nobody waits for, and the next run would pay
for the same requests again. So a batch is created the way a payment is: an idempotency marker is
written down before the charge, and looked up before charging again.

1. The input file is uploaded, then the intent is written to the cache, one row
   ``batch:<endpoint>:<marker>``: a fresh marker, the file's id and upload time, the custom ids.
2. The batch is created with the marker in its ``metadata`` (``nbcompletions_batch``), and its id
   is written into the same row. These two run to their end even when the task is cancelled
   meanwhile (`run_to_end`: the cancel is delivered after the row is written).
3. The server's batches (``GET /v1/batches``, newest first, paged with ``after`` back to the file's
   upload time) are searched for ours: metadata holding the marker, or ``input_file_id`` naming our
   file (so a server that drops metadata still matches). More than one (a retried create): the
   oldest is kept and the others are cancelled at once, before they have run much.

A run that finds a row not yet looked up does step 3 first: a batch found is waited for; none
means the create never arrived, so the orphaned input file is deleted and its requests are planned
again. A server that cannot list batches (404, 405, 501) is taken at the row's word: its batch id
when the row has one; otherwise the requests are sent again, with a `SweepWarning`.

What remains: a run started while the server is still processing the dead process's create (a
fraction of a second) may not see that batch yet. Without a cache, step 3 still cancels a retried
create's duplicate, but nothing outlives the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
import warnings
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import APIError, SweepWarning, answered_field

if TYPE_CHECKING:  # pragma: no cover
    from ._cache import Cache
    from ._client import AsyncClient

__all__ = ["MARKER_KEY", "Entry", "Ledger", "find_ours", "new_marker", "run_to_end", "settle"]

T = TypeVar("T")

#: The metadata key that carries a batch's marker (OpenAI: keys up to 64 characters).
MARKER_KEY = "nbcompletions_batch"
# A file's and a batch's created_at come from the server's clocks, which may not agree exactly:
# the search goes this much further back than the upload.
_SLACK_S = 300
_PAGE = 100  # OpenAI's largest page
#: Pages searched at most (10,000 batches): a list without creation times, or a server that pages
#: forever, must not keep a resumed sweep waiting without end.
_MAX_PAGES = 100
# What a server answers for a route it does not have: it cannot list batches.
_NO_LISTING = (404, 405, 501)


def new_marker() -> str:
    return uuid.uuid4().hex


@dataclass
class Entry:
    """One batch of this cache, from before its creation until its results are stored.

    ``marker`` is None for a row written by an earlier version (keyed by the batch id, which it
    recorded only once the batch existed). ``checked``: the server's list was searched for it.
    """

    marker: str | None
    keys: list[str]
    input_file_id: str | None
    file_created_at: int | None = None
    batch_id: str | None = None
    checked: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "marker": self.marker,
            "keys": self.keys,
            "input_file_id": self.input_file_id,
            "file_created_at": self.file_created_at,
            "batch_id": self.batch_id,
            "checked": self.checked,
        }

    @classmethod
    def from_json(cls, suffix: str, value: Any) -> Entry | None:
        if not isinstance(value, Mapping) or not isinstance(value.get("keys"), list):
            return None
        keys = [str(k) for k in value["keys"]]
        file_id = value.get("input_file_id")
        file_id = file_id if isinstance(file_id, str) else None
        if "marker" not in value:  # an earlier version's row: the batch existed when written
            return cls(None, keys, file_id, batch_id=suffix, checked=True)
        created = value.get("file_created_at")
        batch_id = value.get("batch_id")
        return cls(
            marker=str(value["marker"]),
            keys=keys,
            input_file_id=file_id,
            file_created_at=created if isinstance(created, int) else None,
            batch_id=batch_id if isinstance(batch_id, str) else None,
            checked=value.get("checked") is True,
        )


class Ledger:
    """The open batches of one endpoint in a cache: one row each (no shared index to update), each
    write a single committed statement. Without a cache every method does nothing."""

    def __init__(self, cache: Cache | None, endpoint: str) -> None:
        self.cache = cache
        self.prefix = f"batch:{endpoint}:"

    def _key(self, entry: Entry) -> str:
        name = entry.marker if entry.marker is not None else entry.batch_id
        assert name is not None  # a row has a marker, or (an earlier version's) a batch id
        return self.prefix + name

    def entries(self) -> list[Entry]:
        if self.cache is None:
            return []
        found = []
        for key, value in self.cache.meta_items(self.prefix).items():
            entry = Entry.from_json(key[len(self.prefix) :], value)
            if entry is not None:
                found.append(entry)
        return found

    def write(self, entry: Entry) -> None:
        if self.cache is not None:
            self.cache.set_meta(self._key(entry), entry.to_json())

    def remove(self, entry: Entry) -> None:
        if self.cache is not None:
            self.cache.set_meta(self._key(entry), None)


async def run_to_end(step: Awaitable[T]) -> T:
    """Await ``step`` to its end even when the awaiting task is cancelled meanwhile; the cancel is
    delivered afterwards. For the short steps after which the cache must hold what the server did
    (a created batch's id): an interrupt then waits for one answer instead of losing a batch."""
    task = asyncio.ensure_future(step)
    cancel: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.done():  # the step itself was cancelled (its loop is closing)
                raise
            cancel = exc
            continue
        except BaseException as exc:
            if cancel is not None:
                raise cancel from exc
            raise
        break
    if cancel is not None:
        raise cancel
    return result


async def find_ours(
    aclient: AsyncClient, entries: Sequence[Entry]
) -> list[list[dict[str, Any]]] | None:
    """The server's batches belonging to each entry (oldest first); None when it cannot list.

    Pages through ``GET /v1/batches`` (newest first) until the page reaches batches older than
    every entry's upload, or the list ends.
    """
    by_marker = {e.marker: i for i, e in enumerate(entries) if e.marker is not None}
    by_file = {e.input_file_id: i for i, e in enumerate(entries) if e.input_file_id is not None}
    uploaded = [e.file_created_at for e in entries if e.file_created_at is not None]
    since = min(uploaded) - _SLACK_S if len(uploaded) == len(entries) else None
    found: list[list[dict[str, Any]]] = [[] for _ in entries]
    seen: set[str] = set()
    after: str | None = None
    for pages in itertools.count(1):
        if pages > _MAX_PAGES:
            # Not knowing is not "not found": deciding either way could pay for a batch twice.
            raise APIError(
                f"GET /batches still had more after {_MAX_PAGES} pages ({len(seen)} batches) "
                "without reaching the upload of the batches this sweep looks for (input files "
                f"{[e.input_file_id for e in entries]}); the sweep stops rather than risk paying "
                "twice: look these files' batches up on the server",
                type="batch_lookup",
            )
        params: dict[str, Any] = (
            {"limit": _PAGE} if after is None else {"limit": _PAGE, "after": after}
        )
        try:
            page = await aclient.request("GET", "/batches", params=params)
        except APIError as exc:
            if exc.status in _NO_LISTING:
                return None
            raise
        data = answered_field(page, "data", list, "GET /batches", "a data list")
        older_than_all = False
        new = False
        for card in data:
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                continue
            if card["id"] in seen:
                continue
            seen.add(card["id"])
            new = True
            after = card["id"]
            metadata = card.get("metadata")
            marker = metadata.get(MARKER_KEY) if isinstance(metadata, Mapping) else None
            i = by_marker.get(marker) if isinstance(marker, str) else None
            file_id = card.get("input_file_id")
            if i is None and isinstance(file_id, str):
                i = by_file.get(file_id)
            if i is not None:
                found[i].append(card)
            created = card.get("created_at")
            if since is not None and isinstance(created, int) and created < since:
                older_than_all = True
        # A page of nothing new: a server that ignores after would repeat itself forever.
        if older_than_all or not new or page.get("has_more") is not True:
            break
    for cards in found:
        cards.reverse()  # the list is newest first
    return found


async def settle(aclient: AsyncClient, ledger: Ledger, entries: Sequence[Entry]) -> list[Entry]:
    """Search the server for the entries not yet checked; the entries with a batch to wait for.

    Duplicates (a retried create) are cancelled, keeping the oldest; a row whose create never
    arrived is removed and its input file deleted, so its requests are planned again.
    """
    kept = [e for e in entries if e.checked]
    unchecked = [e for e in entries if not e.checked]
    if not unchecked:
        return kept
    found = await find_ours(aclient, unchecked)
    for i, entry in enumerate(unchecked):
        cards = [] if found is None else found[i]
        if not cards:
            if entry.batch_id is not None:  # its id came back: the server just does not list it
                entry.checked = True
                ledger.write(entry)
                kept.append(entry)
            elif found is None:
                warnings.warn(
                    f"a batch for {len(entry.keys)} requests may have been created before the "
                    f"last run stopped (input file {entry.input_file_id}), and this server cannot "
                    "list batches (GET /v1/batches) to find it: the requests are sent again",
                    SweepWarning,
                    stacklevel=2,
                )
                ledger.remove(entry)
            else:  # the create never arrived: nothing to wait for, nothing was paid
                await _delete_file(aclient, entry.input_file_id)
                ledger.remove(entry)
            continue
        first, *extra = cards
        for card in extra:
            await _cancel_duplicate(aclient, card, str(first["id"]))
        entry.batch_id = str(first["id"])
        entry.checked = True
        ledger.write(entry)  # after the cancels: a run stopped between them repeats them
        kept.append(entry)
    return kept


async def _cancel_duplicate(aclient: AsyncClient, card: Mapping[str, Any], kept: str) -> None:
    if card.get("status") in ("cancelled", "cancelling"):
        return
    try:
        # Sent even for a batch the list shows ended: the list may be older than the batch.
        await aclient.request("POST", f"/batches/{card['id']}/cancel")
    except APIError as exc:
        if exc.status == 409:  # it has ended: nothing left to stop
            return
        warnings.warn(
            f"batch {card['id']} duplicates batch {kept} (a retried create) and could not be "
            f"cancelled ({exc}); cancel it yourself to stop paying for it",
            SweepWarning,
            stacklevel=3,
        )


async def _delete_file(aclient: AsyncClient, file_id: str | None) -> None:
    """Delete an input file no batch was created from; it costs storage, not tokens, so a
    failure is no reason to stop the sweep."""
    if file_id is None:
        return
    with contextlib.suppress(APIError):
        await aclient.request("DELETE", f"/files/{file_id}")
