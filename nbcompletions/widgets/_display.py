"""What both widgets show and ask: error boxes, frames as HTML, figures as outputs, layout, and
the client behind the controls (never in a synced trait, so no key reaches the browser)."""

from __future__ import annotations

import html
import json
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .._errors import APIError, RequestError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .._client import Client

#: How many rows of each frame the Playground's tabs show; the full frames are on ``.result``.
FRAME_ROWS = 200
#: logprobs choices when a server sets no cap (llama.cpp).
UNCAPPED_LOGPROBS = 20


def error_html(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """An error as an HTML box: what was wrong, and for unexpected errors the traceback, folded.

    ``secrets`` (the client's, `nbcompletions._secrets.secrets_of`) are masked in all of it.
    """
    from .._secrets import redact_exception_text, redact_text

    text = html.escape(redact_exception_text(exc, secrets))
    if isinstance(exc, RequestError):
        title = f"Invalid setting: {exc.param}" if exc.param else "Invalid request"
        body = text
    elif isinstance(exc, APIError):
        title = "The server answered with an error"
        body = text
    else:
        title = f"{type(exc).__name__}"
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        body = (
            f"{text}<details><summary>traceback</summary>"
            f"<pre>{html.escape(redact_text(trace, secrets))}</pre></details>"
        )
    return (
        f'<div class="nbc-error" style="color:#b00020;border-left:4px solid #b00020;'
        f'padding:4px 8px;margin:4px 0"><b>{html.escape(title)}</b><br>{body}</div>'
    )


def html_of(obj: Any) -> str:
    """HTML text of what `plots.highlight` returns (a string or an IPython HTML object)."""
    if isinstance(obj, str):
        return obj
    if hasattr(obj, "_repr_html_"):
        return str(obj._repr_html_())
    if hasattr(obj, "data"):
        return str(obj.data)
    return str(obj)


#: Columns a frame tab gives room to (they hold running text): at least this wide.
WIDE_COLUMNS = {"text": "24em", "prompt": "16em"}


def frame_html(frame: pd.DataFrame, rows: int = FRAME_ROWS) -> str:
    """A frame as an HTML table for a tab: columns empty in every row are left out (and named),
    and the text columns get room (three NaN columns squeezed the text to about 100 px)."""
    import pandas as pd

    empty = [c for c in frame.columns if len(frame) and frame[c].isna().all()]
    shown = frame.drop(columns=empty).head(rows)
    notes = []
    if len(frame) > rows:
        notes.append(
            f"first {rows} of {len(frame)} rows; the full frame is on <code>.result</code>"
        )
    if empty:
        names = ", ".join(html.escape(str(c)) for c in empty)
        notes.append(f"not shown, empty in every row: {names}")
    note = "".join(f"<p><i>{n}</i></p>" for n in notes)
    formatters: dict[Any, Any] = {}
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column].dtype):
            continue  # float_format below; nothing to escape
        if column in WIDE_COLUMNS:
            width = WIDE_COLUMNS[column]
            formatters[column] = lambda value, width=width: (
                f'<div style="min-width:{width};white-space:pre-wrap;text-align:left">'
                f"{html.escape(str(value))}</div>"
            )
        else:
            formatters[column] = lambda value: html.escape(str(value))
    table = shown.to_html(
        max_cols=40,
        float_format=lambda x: f"{x:.4g}",
        border=0,
        escape=False,  # every column but the floats is escaped by its formatter above
        formatters=formatters,
    )
    return f'<div style="max-height:420px;overflow:auto">{note}{table}</div>'


def figure_output(figure: Any) -> dict[str, Any]:
    """A plotly figure as a notebook display_data output (plotly's own MIME type).

    JupyterLab, Notebook 7 and VS Code render ``application/vnd.plotly.v1+json`` natively, and it
    needs no JavaScript in the saved notebook (``go.FigureWidget`` would need anywidget).
    """
    import plotly.io as pio

    spec = json.loads(pio.to_json(figure, validate=False))
    spec["config"] = {"displaylogo": False, "responsive": True}
    return {
        "output_type": "display_data",
        "data": {"application/vnd.plotly.v1+json": spec, "text/plain": "<plotly figure>"},
        "metadata": {},
    }


def note_output(text: str) -> dict[str, Any]:
    data = {"text/plain": text, "text/html": f"<p><i>{html.escape(text)}</i></p>"}
    return {"output_type": "display_data", "data": data, "metadata": {}}


def default_client(client: Client | None) -> Client:
    if client is not None:
        return client
    from .._client import Client

    return Client()


def endpoint_label(client: Client) -> str:
    """The client's endpoint for a repr, without credentials written into the URL."""
    from .._secrets import redact_url

    return redact_url(str(getattr(client, "endpoint", "?")))


def model_options(client: Client) -> tuple[list[str], BaseException | None]:
    try:
        models = list(client.models())
    except Exception as exc:  # shown in the widget; the model stays editable by code
        return ([client.model] if client.model else []), exc
    if client.model and client.model not in models:
        models.insert(0, client.model)
    return models, None


def fit_control(widget: widgets.DOMWidget, label: str, width: str) -> None:
    """Give a control a fixed label and total width, so that columns of controls line up."""
    if "description_width" in widget.style.keys:
        widget.style.description_width = label
    widget.layout.width = width


def api_slider(
    description: str, low: float, high: float, step: float, value: float
) -> widgets.FloatSlider:
    return widgets.FloatSlider(
        value=value,
        min=low,
        max=high,
        step=step,
        description=description,
        continuous_update=False,
        readout_format=".2f",
        style={"description_width": "initial"},
    )
