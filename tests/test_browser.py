"""The notebooks in a real browser: JupyterLab 4 and Notebook 7 in headless Chromium.

Starts ``jupyter lab`` on loopback (the ``notebook`` package's Notebook 7 pages are served by the
same server) in a temporary root holding a copy of ``notebooks/05_playground.ipynb``, opens it in
Debian's ``chromium`` driven by Playwright, runs every cell and checks that the ipywidgets
controls and a plotly figure render (which needs the ipywidgets and plotly extensions to be
installed and working). Then it clicks the Run button and checks that a new result arrives through
the widget's callback. The same notebook runs in Notebook 7.

A second notebook holds a highlight as a *saved* output and no trust signature, as a notebook
cloned from GitHub does: JupyterLab and Notebook 7 then pass the HTML through their sanitizer
(which drops ``<style>`` blocks and scripts). The test clicks a token and checks that its popup
still opens, floats and shows the alternatives.

Screenshots are written to ``$NBC_SCREENSHOTS`` when set (CI can keep them as artefacts); the
small ones the README shows (``docs/images/``) are element screenshots taken here, see
``README_SHOTS``. Needs ``apt-get install -y chromium``; skipped, saying so, when that browser is
not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
import pytest
from helpers import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "05_playground.ipynb"
SAVED = "saved_highlight.ipynb"
#: Element screenshots the README shows: written to $NBC_SCREENSHOTS with the others, then looked
#: at and copied to docs/images/ by hand (they change only when the widgets or plots do).
README_SHOTS = ("highlight-popup.png", "playground.png", "sweep-chart.png")
CHROMIUM = os.environ.get("NBC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
# Generous: the machine running CI may be slow and the kernel imports pandas, plotly and the model.
RENDER_TIMEOUT_MS = 180_000


class Jupyter(NamedTuple):
    """A running Jupyter server: the URL of a notebook in JupyterLab or in Notebook 7."""

    url: str
    token: str

    def lab(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"

    def notebook7(self, name: str) -> str:
        return f"{self.url}/notebooks/{name}?token={self.token}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    """A Jupyter server on loopback with the playground and the saved-highlight notebooks."""
    reason = None
    if not Path(CHROMIUM).exists():
        reason = (
            f"chromium is not installed at {CHROMIUM} (install it: apt-get install -y chromium)"
        )
    elif importlib.util.find_spec("playwright") is None:
        reason = "playwright is not installed: pip install -e '.[dev,browser]'"
    if reason is not None:
        if os.environ.get("NBC_REQUIRE_BROWSER") == "1":  # CI sets this: never skip silently
            pytest.fail(reason)
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    _write_saved_highlight(root / SAVED)
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "receive Jupyter news?" toast over the page (it would also try to reach the internet).
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port = free_port()
    token = secrets.token_hex(16)
    env = dict(os.environ)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(var, None)
    # A private Jupyter config/data/runtime so that nothing of the user's leaks in (kernelspecs, lab
    # settings); the venv's own lab extensions and python3 kernel are still found under sys.prefix.
    env.update(
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        IPYTHONDIR=str(base / "ipython"),
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONPATH=str(ROOT),
    )
    log = open(base / "lab.log", "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            "--ServerApp.port_retries=0",
            "--ServerApp.terminals_enabled=False",
            # CI containers run as root; the server binds loopback only.
            "--allow-root",
            # Nothing may reach the internet: no extension-manager queries to PyPI, no news feed.
            "--LabApp.extension_manager=readonly",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--JupyterNotebookApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--LabServerApp.user_settings_dir={base / 'settings'}",
            f"--LabServerApp.workspaces_dir={base / 'workspaces'}",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited ({proc.returncode}):\n{(base / 'lab.log').read_text()}"
                )
            try:
                if (
                    httpx.get(f"{url}/api/status", params={"token": token}, timeout=2.0).status_code
                    == 200
                ):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"jupyter lab did not answer within 120 s:\n{(base / 'lab.log').read_text()}"
                )
            time.sleep(0.25)
        yield Jupyter(url, token)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _write_saved_highlight(path: Path) -> None:
    """A notebook whose one output is a highlight, saved and untrusted (as if cloned)."""

    html = _completion_highlight()
    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        "cells": [
            {
                "cell_type": "code",
                "id": "saved",
                "metadata": {},
                "execution_count": 1,
                "source": "plots.highlight(done.tokens, alternatives=done.alternatives)",
                "outputs": [
                    {
                        "output_type": "execute_result",
                        "execution_count": 1,
                        "metadata": {},
                        "data": {"text/html": html, "text/plain": "HighlightedText"},
                    }
                ],
            }
        ],
    }
    path.write_text(json.dumps(notebook), encoding="utf-8")


def _shot(page: Page, name: str, element: Any = None) -> None:
    """A screenshot into $NBC_SCREENSHOTS: of ``element`` if given, else of the page."""
    folder = os.environ.get("NBC_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        if element is not None:
            element.screenshot(path=str(Path(folder) / name))
        else:
            page.screenshot(path=str(Path(folder) / name), full_page=True)


def _wait_for_idle_kernel(page: Any) -> None:
    page.wait_for_function(
        "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        " return w && w.sessionContext && w.sessionContext.session"
        " && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.connectionStatus === 'connected'"
        " && w.sessionContext.session.kernel.status === 'idle'; }",
        timeout=RENDER_TIMEOUT_MS,
    )


def _open(playwright: Any, url: str) -> tuple[Any, Any, list[str]]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console_errors: list[str] = []
    page.on(
        "console",
        lambda msg: console_errors.append(msg.text) if msg.type == "error" else None,
    )
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=RENDER_TIMEOUT_MS)
    return browser, page, console_errors


def _offset(element: Any, container: Any) -> tuple[float, float]:
    """Where ``element`` sits inside ``container``, in CSS pixels, whatever the page's scroll."""
    box, origin = element.bounding_box(), container.bounding_box()
    assert box is not None
    assert origin is not None
    return (box["x"] - origin["x"], box["y"] - origin["y"])


def _check_popup(highlight: Any, *, scripts: bool = True) -> None:
    """Click a token of a highlight: its popup floats under it (the line and the lines below stay
    where they were), shows whole, is the only one open, and closes again: on a click on its
    token, and where scripts run (``scripts``) on Escape and on a click elsewhere."""
    token = highlight.locator("summary").nth(2)
    popup = highlight.locator(".nbc-popup").nth(2)
    later = highlight.locator("summary").nth(30)
    before = _offset(later, highlight)
    assert not popup.is_visible()
    token.click()
    popup.wait_for(state="visible", timeout=10_000)
    text = popup.inner_text()
    assert "alternatives:" in text, text
    assert "logprob" in text, text
    # Out of the text flow: a token further on has not moved, and the popup covers the text
    # under its token instead of opening a gap. Measured from the highlight's own top: a click
    # can scroll the notebook (JupyterLab brings the clicked cell into view), which moves both.
    assert _offset(later, highlight) == before
    assert popup.evaluate("e => getComputedStyle(e).position") == "absolute"
    token_box, popup_box = token.bounding_box(), popup.bounding_box()
    assert token_box is not None
    assert popup_box is not None
    assert abs(popup_box["y"] - (token_box["y"] + token_box["height"])) < 8
    # The whole popup shows: no box between it and the cell's output scrolls to hold it.
    assert popup.evaluate(
        """e => { const top = e.closest('.jp-OutputArea-output') || document.body;
        for (let a = e.parentElement; a; a = a.parentElement) {
            const s = getComputedStyle(a);
            if ((s.overflowY !== 'visible' || s.overflowX !== 'visible')
                && a.scrollHeight > a.clientHeight + 1) return false;
            if (a === top) break;
        }
        return true; }"""
    )
    assert popup.evaluate("e => getComputedStyle(e).fontFamily").lower().find("mono") >= 0
    other = highlight.locator(".nbc-popup").nth(5)
    if not scripts:
        # A sanitizer drops <details name> as well as onclick: each popup closes on its token.
        token.click()
        popup.wait_for(state="hidden", timeout=10_000)
        return
    # One open at a time: opening another token's popup closes this one.
    highlight.locator("summary").nth(5).click()
    other.wait_for(state="visible", timeout=10_000)
    popup.wait_for(state="hidden", timeout=10_000)
    highlight.locator("summary").nth(5).click()
    other.wait_for(state="hidden", timeout=10_000)
    token.click()
    popup.wait_for(state="visible", timeout=10_000)
    popup.page.keyboard.press("Escape")
    popup.wait_for(state="hidden", timeout=10_000)
    token.click()
    popup.wait_for(state="visible", timeout=10_000)
    # A click elsewhere (the legend under the text) closes it.
    highlight.locator("div").last.click()
    popup.wait_for(state="hidden", timeout=10_000)
    assert highlight.locator("details[open]").count() == 0


def _completion_highlight() -> str:
    from nbcompletions import Client, plots

    client = Client(embedded=True)
    try:
        completion = client.complete("ROMEO.\n", max_tokens=40, temperature=0.8, logprobs=5, seed=1)
    finally:
        client.close()
    return plots.highlight(completion.tokens, alternatives=completion.alternatives).html


def test_highlight_popups_on_a_saved_page(tmp_path: Path) -> None:
    """The popup behaviour on a page saved with HighlightedText.save (scripts run), no Jupyter."""
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"needs chromium at {CHROMIUM} and playwright")
    from playwright.sync_api import sync_playwright

    from nbcompletions.plots import HighlightedText

    page_path = HighlightedText(_completion_highlight(), n_tokens=40).save(tmp_path / "hl.html")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 700, "height": 900})
            page.goto(page_path.as_uri())
            highlight = page.locator(".nbc-highlight")
            _check_popup(highlight)
            # A token at the right edge: its popup opens leftwards instead of past the edge.
            page.set_viewport_size({"width": 360, "height": 900})
            width = page.evaluate("document.documentElement.clientWidth")
            rights = [
                box["x"] + box["width"] if box is not None else 0.0
                for box in (s.bounding_box() for s in highlight.locator("summary").all())
            ]
            edge = max(range(len(rights)), key=rights.__getitem__)
            highlight.locator("summary").nth(edge).click()
            popup = highlight.locator(".nbc-popup").nth(edge)
            popup.wait_for(state="visible", timeout=10_000)
            box = popup.bounding_box()
            assert box is not None
            assert box["x"] + box["width"] <= width + 1, (box, width)
            assert box["x"] >= 0
            page.keyboard.press("Escape")
            page.set_viewport_size({"width": 700, "height": 900})
            # Left open for the picture, over the text.
            highlight.locator("summary").nth(10).click()
            _shot(page, "highlight-popup-page.png", highlight)
        finally:
            browser.close()


@pytest.mark.parametrize("ui", ["lab", "notebook7"])
def test_saved_highlight_popup_survives_the_sanitizer(lab: Jupyter, ui: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page, _ = _open(playwright, getattr(lab, ui)(SAVED))
        try:
            output = page.locator(".jp-OutputArea-output").first
            output.wait_for(timeout=RENDER_TIMEOUT_MS)
            # Sanitized (untrusted): no data-* attributes are left, yet the colours, the legend
            # and the popups are.
            assert page.locator("[data-prob]").count() == 0
            assert page.locator(".nbc-popup").count() >= 40
            summary_style = output.locator("summary").first.get_attribute("style") or ""
            assert "background" in summary_style, summary_style
            assert "scale=" in output.inner_text()
            # The sanitizer drops the onclick and the details' name: no Escape, no click-elsewhere,
            # several may stay open; the popups still open floating and close on their token.
            _check_popup(output, scripts=False)
            # Leave one popup open for the picture.
            output.locator("summary").nth(10).click()
            output.locator(".nbc-popup").nth(10).wait_for(state="visible", timeout=10_000)
            page.set_viewport_size({"width": 1000, "height": 700})
            _shot(page, f"saved-highlight-{ui}.png")
            if ui == "lab":
                # A box tall enough for the open popup, around the output only.
                box = output.bounding_box()
                popup = output.locator(".nbc-popup").nth(10).bounding_box()
                assert box is not None
                assert popup is not None
                height = max(box["height"], popup["y"] + popup["height"] - box["y"]) + 8
                folder = os.environ.get("NBC_SCREENSHOTS")
                if folder:
                    page.screenshot(
                        path=str(Path(folder) / "highlight-popup.png"),
                        clip={
                            "x": box["x"],
                            "y": box["y"],
                            "width": min(box["width"], 760),
                            "height": height,
                        },
                    )
        finally:
            browser.close()


def test_playground_renders_in_notebook7(lab: Jupyter) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page, console_errors = _open(playwright, lab.notebook7(NOTEBOOK.name))
        try:
            _wait_for_idle_kernel(page)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.locator(".jupyter-widgets.widget-button", has_text="Run").first.wait_for(
                timeout=RENDER_TIMEOUT_MS
            )
            highlight = page.locator(".nbc-tokens").first
            highlight.wait_for(timeout=RENDER_TIMEOUT_MS)
            page.locator(".js-plotly-plot .main-svg >> visible=true").first.wait_for(
                timeout=RENDER_TIMEOUT_MS
            )
            builder = page.locator(".nbc-sweep-builder").first
            builder.locator(".js-plotly-plot .main-svg >> visible=true").first.wait_for(
                timeout=RENDER_TIMEOUT_MS
            )
            _wait_for_idle_kernel(page)
            _check_popup(highlight)
            body = page.inner_text("body")
            assert "Error displaying widget" not in body
            assert "Traceback" not in body
            _shot(page, "notebook7-playground.png")
            builder.scroll_into_view_if_needed()
            _shot(page, "notebook7-sweep-builder.png")
            assert not [e for e in console_errors if "widget" in e.lower()], console_errors
        finally:
            browser.close()


def test_playground_renders_in_jupyterlab(lab: Jupyter) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page, console_errors = _open(playwright, lab.lab(NOTEBOOK.name))
        try:
            # The notebook is open and its kernel has started.
            _wait_for_idle_kernel(page)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

            # The Playground: its Run button, its controls, and the highlighted completion that the
            # notebook's own pg.run() produced.
            run_button = page.locator(".jupyter-widgets.widget-button", has_text="Run").first
            run_button.wait_for(timeout=RENDER_TIMEOUT_MS)
            page.locator(".widget-slider").first.wait_for(timeout=RENDER_TIMEOUT_MS)
            page.locator(".nbc-tokens").first.wait_for(timeout=RENDER_TIMEOUT_MS)
            # A plotly figure, drawn by plotly.js through the JupyterLab extension (the notebook
            # shows one directly; the Playground's own sit in tabs not yet selected).
            page.locator(".js-plotly-plot .main-svg >> visible=true").first.wait_for(
                timeout=RENDER_TIMEOUT_MS
            )
            page.wait_for_function(
                "() => { const w = window.jupyterapp.shell.currentWidget;"
                " return w.sessionContext.session.kernel.status === 'idle'; }",
                timeout=RENDER_TIMEOUT_MS,
            )
            _shot(page, "playground-after-run-all.png")
            _shot(page, "playground.png", page.locator(".nbc-playground").first)

            # Clicking a token opens its popup (a <details> element, no JavaScript) with the
            # alternatives; clicking again closes it.
            _check_popup(page.locator(".nbc-tokens").first)

            body = page.inner_text("body")
            assert "Error displaying widget" not in body
            assert "Traceback" not in body

            # The button's callback runs in the kernel: a click sends a new request, whose status
            # line ("run #N: ...") replaces the one the notebook's own pg.run() left.
            status = page.locator(".nbc-status").first
            assert "run #1:" in status.inner_text()
            run_button.click()
            page.locator(".nbc-status", has_text="run #2:").first.wait_for(
                timeout=RENDER_TIMEOUT_MS
            )
            _shot(page, "playground-after-click.png")

            # A streamed run: while its text streams in, the last run's highlighted text (and a
            # popup left open in it) is gone, not shown under the new text.
            playground = page.locator(".nbc-playground").first
            highlight = playground.locator(".nbc-tokens").first
            highlight.locator("summary").nth(3).click()
            highlight.locator(".nbc-popup").nth(3).wait_for(state="visible", timeout=10_000)
            page.evaluate(
                """() => { window.nbcStale = false; window.nbcStreamed = false;
                const pg = document.querySelector('.nbc-playground');
                // The last run's highlight, marked: it must be gone while new text streams in.
                pg.querySelectorAll('.nbc-tokens').forEach(e => e.dataset.lastRun = '1');
                new MutationObserver(() => {
                    const s = pg.querySelector('.nbc-streamed');
                    if (s && s.innerText.trim()) {
                        window.nbcStreamed = true;
                        if (pg.querySelector('[data-last-run]')) window.nbcStale = true;
                    }
                }).observe(pg, {subtree: true, childList: true, characterData: true}); }"""
            )
            playground.locator(".widget-checkbox", has_text="stream").locator("input").check()
            run_button.click()
            page.locator(".nbc-status", has_text="run #3:").first.wait_for(
                timeout=RENDER_TIMEOUT_MS
            )
            assert page.evaluate("window.nbcStreamed")
            assert not page.evaluate("window.nbcStale")
            assert playground.locator(".nbc-popup:visible").count() == 0

            # The choices tab leaves out the empty columns and gives the text room.
            playground.locator(".lm-TabBar-tab", has_text="choices").first.click()
            text_cell = playground.locator("td div[style*='min-width']").first
            text_cell.wait_for(timeout=RENDER_TIMEOUT_MS)
            box = text_cell.bounding_box()
            assert box is not None
            assert box["width"] >= 250, box
            assert "empty in every row" in playground.inner_text()
            _shot(page, "playground-choices-tab.png", playground)

            # The Playground's plot tab: a figure inside the widget's Output, rendered by the same
            # plotly extension through the widget manager.
            playground = page.locator(".nbc-playground").first
            playground.locator(".lm-TabBar-tab", has_text="probability plot").first.click()
            tab_plot = playground.locator(".js-plotly-plot .main-svg >> visible=true").first
            tab_plot.wait_for(timeout=RENDER_TIMEOUT_MS)
            tab_plot.scroll_into_view_if_needed()
            _shot(page, "playground-plot-tab.png")

            # An invalid value typed into a control is reported in the widget, in red.
            max_tokens = playground.locator(".widget-text", has_text="max_tokens").locator("input")
            max_tokens.fill("-5")
            max_tokens.press("Enter")
            error = playground.locator(".nbc-error", has_text="max_tokens").first
            error.wait_for(timeout=RENDER_TIMEOUT_MS)
            assert "got -5" in error.inner_text()
            error.scroll_into_view_if_needed()
            _shot(page, "playground-invalid-setting.png")

            # The SweepBuilder's run (last cell) drew its sweep chart.
            builder = page.locator(".nbc-sweep-builder").first
            builder_plot = builder.locator(".js-plotly-plot .main-svg >> visible=true").first
            builder_plot.wait_for(timeout=RENDER_TIMEOUT_MS)
            builder_plot.scroll_into_view_if_needed()
            assert "requests" in builder.locator(".nbc-summary").first.inner_text()
            _shot(page, "sweep-builder.png")
            _shot(page, "sweep-chart.png", builder.locator(".js-plotly-plot").first)

            # An axis set to "(none)" drops its values and locks its box.
            second = builder.locator(".widget-dropdown", has_text="axis 2").locator("select")
            second.select_option(label="top_p")
            axis_values = builder.locator("input[placeholder='comma-separated values']")
            values = axis_values.nth(1)
            values.fill("0.5, 0.9")
            values.press("Enter")
            second.select_option(label="(none)")
            page.wait_for_function(
                "e => e.value === '' && e.disabled", arg=values.element_handle(), timeout=30_000
            )
            # A new validation error clears the chart of the last run.
            first_values = axis_values.nth(0)
            first_values.fill("0.5, hot")
            first_values.press("Enter")
            builder.locator(".nbc-error", has_text="temperature").first.wait_for(
                timeout=RENDER_TIMEOUT_MS
            )
            builder.locator(".js-plotly-plot").first.wait_for(state="detached", timeout=30_000)
            assert "chart cleared" in builder.locator(".nbc-status").first.inner_text()
            _shot(page, "sweep-builder-invalid.png", builder)
            assert not [e for e in console_errors if "widget" in e.lower()], console_errors
        finally:
            browser.close()
