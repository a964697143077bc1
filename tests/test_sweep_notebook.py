"""A sweep in a real Jupyter kernel: progress widget, "interrupt kernel", re-run the cell, resume.

This is the notebook workflow the sweep is built for, driven through jupyter_client: the cell runs
`nbcompletions.sweep` (a plain call, no await) with a cache; the test interrupts the kernel while
it runs, then executes the same cell again and checks that only the unfinished requests were sent.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SETUP = """
import asyncio
import json
import httpx
import nbcompletions as nbc
from nbcompletions.server import StreamingASGITransport, create_app

class Counting(httpx.AsyncBaseTransport):
    def __init__(self, inner):
        self.inner, self.sent, self.hold_from = inner, 0, None
    async def handle_async_request(self, request):
        if request.url.path.endswith("/completions"):
            self.sent += 1
            if self.hold_from is not None and self.sent >= self.hold_from:
                await asyncio.Event().wait()  # a server gone quiet: held until the interrupt
        return await self.inner.handle_async_request(request)

transport = Counting(StreamingASGITransport(create_app()))
client = nbc.Client("http://embedded/v1", model="nbc-shakespeare", transport=transport)
"""

STUDY = """
result = nbc.sweep(client, prompt={"hamlet": "To be", "king": "My lord"},
                   temperature=[0.2, 0.6, 1.0, 1.4, 1.8], repeats=3, max_tokens=2,
                   cache="study.sqlite", max_concurrency=1, probe=False)
"""


def _rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


async def test_interrupt_kernel_and_resume(tmp_path: Path, embedded_engine: Any) -> None:
    manager_module = pytest.importorskip("jupyter_client.manager")
    km = manager_module.AsyncKernelManager(kernel_name="python3")
    await km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    outputs: list[dict[str, Any]] = []

    async def run(code: str) -> dict[str, Any]:
        reply = await kc.execute_interactive(
            textwrap.dedent(code), timeout=180, output_hook=outputs.append
        )
        return dict(reply["content"])

    try:
        await kc.wait_for_ready(timeout=120)
        assert (await run(SETUP))["status"] == "ok"
        cache = tmp_path / "study.sqlite"
        # The first run's seventh request is held, so the interrupt below lands while the sweep
        # runs. Unheld, the 30 short requests could all finish before it did (a loaded machine).
        assert (await run("transport.hold_from = 7"))["status"] == "ok"

        async def interrupt_when_some_finished() -> None:
            # Polls the file the kernel writes: the test cannot share an event with the kernel.
            for _ in range(2400):
                if _rows(cache) >= 4:
                    break
                await asyncio.sleep(0.05)
            await km.interrupt_kernel()  # the notebook's "interrupt the kernel" button

        interrupter = asyncio.create_task(interrupt_when_some_finished())
        first = await run(STUDY)
        await interrupter
        assert first["status"] == "error"
        # One line, not a traceback through the loop code: what was saved, and that a rerun resumes.
        assert first["ename"] == "SweepInterrupted"
        assert "responses saved in" in first["evalue"], first["evalue"]
        assert "rerun the same call to resume" in first["evalue"], first["evalue"]
        finished = _rows(cache)
        assert 4 <= finished <= 6  # nothing past the held request finished

        outputs.clear()
        reset = "sent_before, transport.hold_from = transport.sent, None"
        assert (await run(reset))["status"] == "ok"
        second = await run(STUDY)
        assert second["status"] == "ok", second
        report = await run(
            "print(json.dumps({'sent': transport.sent - sent_before, "
            "'requests': len(result), 'status': result.requests['status']"
            ".value_counts().to_dict()}))"
        )
        assert report["status"] == "ok"
        printed = [
            m["content"]["text"]
            for m in outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        ]
        summary = json.loads(printed[-1])
        assert summary["requests"] == 30
        assert summary["sent"] == 30 - finished  # nothing finished was sent again
        assert summary["status"] == {"cached": finished, "ok": 30 - finished}
        # In a kernel, tqdm.auto shows an ipywidgets progress bar.
        widget_views = [
            m
            for m in outputs
            if m["msg_type"] == "display_data"
            and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
        ]
        assert widget_views
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
