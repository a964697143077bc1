"""`nbcompletions._loop`: running coroutines from sync code, inside running loops, with Ctrl-C."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator

import pytest
from helpers import Interrupts

from nbcompletions import _loop
from nbcompletions._loop import iter_sync, run_sync


async def _add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def test_run_sync_returns_the_result_from_plain_code() -> None:
    assert run_sync(_add(2, 3)) == 5


def test_run_sync_runs_on_one_background_loop() -> None:
    async def loop_and_thread() -> tuple[asyncio.AbstractEventLoop, str]:
        return asyncio.get_running_loop(), threading.current_thread().name

    first = run_sync(loop_and_thread())
    second = run_sync(loop_and_thread())
    assert first[0] is second[0]
    assert first[1] == "nbcompletions-loop"


def test_run_sync_propagates_exceptions_unchanged() -> None:
    async def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_sync(fail())


def test_run_sync_inside_a_running_loop_like_jupyter() -> None:
    # A notebook cell runs inside the kernel's loop; a plain (non-awaited) call must still work.
    async def cell() -> int:
        return run_sync(_add(20, 22))

    assert asyncio.run(cell()) == 42


def test_run_sync_rejects_non_coroutines() -> None:
    with pytest.raises(TypeError, match="coroutine"):
        run_sync(42)  # type: ignore[arg-type]  # the refusal under test


def test_run_sync_from_the_loop_thread_raises_instead_of_deadlocking() -> None:
    async def nested() -> int:
        return run_sync(_add(1, 1))

    with pytest.raises(RuntimeError, match="deadlock"):
        run_sync(nested())


def test_keyboard_interrupt_cancels_the_coroutine_and_propagates() -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    interrupts = Interrupts()  # what Jupyter's "interrupt kernel" (SIGINT) does

    def interrupt_when_started() -> None:
        started.wait(10)
        interrupts.start()

    interrupter = threading.Thread(target=interrupt_when_started)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sync(forever())
    finally:
        interrupts.arrived()
        interrupter.join()
    # run_sync waits for the cancellation's cleanup before re-raising.
    assert cancelled.is_set()


def test_an_unstarted_cancelled_coroutine_is_closed_without_warning() -> None:
    finished = threading.Event()
    coro = _add(1, 2)
    _loop._close_if_unstarted(coro, finished)
    assert finished.is_set()
    with pytest.raises(RuntimeError, match="cannot reuse"):
        coro.send(None)


def test_iter_sync_yields_items_and_closes_the_async_iterator_early() -> None:
    closed = threading.Event()

    async def numbers() -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            closed.set()

    items = []
    for item in iter_sync(numbers()):
        items.append(item)
        if item == 2:
            break
    assert items == [0, 1, 2]
    assert closed.is_set()
    assert list(iter_sync(numbers())) == list(range(100))


def test_nothing_starts_or_patches_at_import() -> None:
    code = (
        "import asyncio, threading\n"
        "run, new_loop = asyncio.run, asyncio.new_event_loop\n"
        "import nbcompletions, nbcompletions._client, nbcompletions._loop\n"
        "assert asyncio.run is run and asyncio.new_event_loop is new_loop\n"
        "assert [t.name for t in threading.enumerate()] == ['MainThread'], threading.enumerate()\n"
        "assert nbcompletions._loop._loop is None\n"
        "import sys\n"
        "assert 'nest_asyncio' not in sys.modules and 'nest_asyncio2' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_plain_call_in_a_real_jupyter_kernel() -> None:
    # The real thing: an ipykernel whose loop is running while the cell calls the sync client.
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    cells = [
        "import asyncio, httpx\n"
        "from nbcompletions import Client\n"
        "asyncio.get_running_loop()  # the kernel's loop is running in this thread\n"
        "body = {'choices': [{'text': 'from the kernel', 'index': 0, 'finish_reason': 'stop'}]}\n"
        "client = Client('http://test/v1', model='m',\n"
        "                transport=httpx.MockTransport(lambda r: httpx.Response(200, json=body)))",
        "completion = client.complete('hello')  # no await\nprint(completion.text)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = notebook.cells[1].outputs
    assert [o.get("text") for o in outputs] == ["from the kernel\n"], outputs
