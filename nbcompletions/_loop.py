"""How a coroutine runs from synchronous code: the one module that touches event loops.

Decision: every synchronous call (``Client.complete``, ``sweep`` ...) hands its coroutine to one
background event loop that runs forever in a daemon thread, and blocks the calling thread until the
result is ready (`asyncio.run_coroutine_threadsafe`). We chose this over ``nest-asyncio2`` (the
maintained fork of the archived ``nest-asyncio``) because:

- Nothing is patched. nest-asyncio replaces asyncio internals process-wide (``run_until_complete``,
  the task step functions, the policy), which other libraries do not expect; its parent project was
  archived after repeated breakage on new Python releases, and the fork has to chase every one.
  A plain thread plus ``run_coroutine_threadsafe`` is public, stable API on Python 3.10-3.13.
- It behaves the same everywhere: a script, a test, Jupyter or VS Code notebooks (whose kernels
  already run a loop in the main thread, so ``asyncio.run`` is refused there), or inside
  ``asyncio.run(main())`` when sync code is called without await. The caller's loop is never
  re-entered.
- Connection pools and the per-client concurrency semaphore are bound to one loop; one long-lived
  loop keeps them alive across calls instead of rebuilding them per ``asyncio.run``.
- Ctrl-C (a Jupyter "interrupt kernel") raises KeyboardInterrupt in the waiting thread; we then
  cancel the coroutine's task on the background loop, wait briefly for its cleanup, and re-raise.

The cost: while a sync call waits, the calling thread (e.g. the notebook's loop) is blocked, which
is what a plain, non-awaited call in a cell means anyway. Async users never come here: they
``await`` `AsyncClient` methods on their own loop.

The loop starts on first use, never at import, and is recreated after ``fork``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["get_loop", "in_loop_thread", "iter_sync", "run_sync"]

T = TypeVar("T")

# How often a waiting thread wakes to notice Ctrl-C where lock waits are uninterruptible (Windows).
# It does not delay results: a finished future wakes the waiter at once.
_POLL_SECONDS = 0.2
# How long an interrupted call waits for the cancelled coroutine's cleanup (closing HTTP streams).
_CANCEL_GRACE_SECONDS = 2.0

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None
# Strong references to fire-and-forget tasks, which the loop itself only holds weakly.
_background_tasks: set[asyncio.Future[Any]] = set()


def _run_forever(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def get_loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use (and again in a forked child)."""
    global _loop, _thread, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=_run_forever, args=(loop, ready), name="nbcompletions-loop", daemon=True
            )
            thread.start()
            ready.wait()
            _loop, _thread, _pid = loop, thread, os.getpid()
        return _loop


def in_loop_thread() -> bool:
    """True when called from the background loop's own thread (where blocking would deadlock)."""
    return _thread is not None and threading.current_thread() is _thread and _pid == os.getpid()


async def _guarded(coro: Coroutine[Any, Any, T], finished: threading.Event) -> T:
    try:
        return await coro
    finally:
        finished.set()


def _close_if_unstarted(coro: Coroutine[Any, Any, Any], finished: threading.Event) -> None:
    # A task cancelled before its first step never awaits our coroutine; close it so Python does
    # not warn "coroutine ... was never awaited" (and nothing waits for a cleanup that never comes).
    if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
        coro.close()
        finished.set()


class _Call:
    """One `run_sync` call; ``start`` and ``cancel`` run on the loop thread, in either order."""

    __slots__ = ("cancelled", "coro", "finished", "future", "task")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.finished = threading.Event()
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.task: asyncio.Task[Any] | None = None
        self.cancelled = False

    def start(self) -> None:
        if self.cancelled:
            return
        self.task = asyncio.get_running_loop().create_task(_guarded(self.coro, self.finished))
        self.task.add_done_callback(self._settle)

    def _settle(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.future.cancel()
        elif task.exception() is not None:
            self.future.set_exception(task.exception())
        else:
            self.future.set_result(task.result())

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is None:
            _close_if_unstarted(self.coro, self.finished)
        else:
            self.task.cancel()
            asyncio.get_running_loop().call_soon(_close_if_unstarted, self.coro, self.finished)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and return its result, from any synchronous code.

    Works whether or not the calling thread runs an event loop of its own (Jupyter). Exceptions
    propagate unchanged. A KeyboardInterrupt (or any exception) while waiting cancels the coroutine,
    waits up to a couple of seconds for its cleanup to run, and is re-raised.
    """
    if not inspect.iscoroutine(coro):
        raise TypeError(f"run_sync() needs a coroutine object; got {type(coro).__name__}")
    if in_loop_thread():
        coro.close()
        raise RuntimeError(
            "a synchronous nbcompletions call was made from inside nbcompletions' own event loop "
            "thread, which would deadlock; use the AsyncClient and await it there"
        )
    loop = get_loop()
    call = _Call(coro)
    # Ctrl-C can land anywhere below, even inside call_soon_threadsafe; the except clause copes
    # whether or not ``start`` has been queued or has run.
    try:
        loop.call_soon_threadsafe(call.start)
        while True:
            done, _ = concurrent.futures.wait([call.future], timeout=_POLL_SECONDS)
            if done:
                result: T = call.future.result()
                return result
    except BaseException:
        if not call.future.done():
            loop.call_soon_threadsafe(call.cancel)
            call.finished.wait(_CANCEL_GRACE_SECONDS)
        raise


def iter_sync(aiterator: AsyncIterator[T]) -> Generator[T, None, None]:
    """Iterate an async iterator from synchronous code, one `run_sync` per item.

    Leaving the loop early (``break``, an exception, garbage collection of the generator) closes the
    async iterator (``aclose``) on the background loop, so HTTP streams are released.
    """
    try:
        while True:
            try:
                item = run_sync(_anext(aiterator))
            except StopAsyncIteration:
                return
            yield item
    finally:
        if hasattr(aiterator, "aclose"):
            if in_loop_thread():
                # Collected on the loop thread itself: we cannot block here, so schedule it.
                _background_tasks.add(task := asyncio.ensure_future(_aclose(aiterator)))
                task.add_done_callback(_background_tasks.discard)
            else:
                run_sync(_aclose(aiterator))


async def _anext(aiterator: AsyncIterator[T]) -> T:
    return await aiterator.__anext__()


async def _aclose(aiterator: Any) -> None:
    # "aclose(): asynchronous generator is already running": an interrupted step is still
    # unwinding; it closes itself when it finishes.
    with contextlib.suppress(RuntimeError):
        await aiterator.aclose()
