"""Jupyter widgets (ipywidgets 8): a completion playground and a sweep builder.

Each widget is synced control state plus a pure function from that state to a request:
`Playground.request` is the `CompletionRequest` the controls describe and `SweepBuilder.plan` the
sweep they describe. Nothing is sent until ``run()`` (or the Run button). Every error, whether an
invalid setting or a server's answer, is shown inside the widget. The client, and with it any API
key, is kept as a plain Python attribute and never in a synced trait, so it never reaches the
browser or the saved notebook.
"""

from __future__ import annotations

import html
import json
import math
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ._errors import APIError, RequestError
from ._request import CompletionRequest, Limits

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ._client import Client
    from ._completion import Completion
    from ._sweep import SweepResult

__all__ = [
    "FRAME_ROWS",
    "MAX_HIGHLIGHTED",
    "SWEEP_FIELDS",
    "SWEEP_METRICS",
    "Playground",
    "SweepBuilder",
    "SweepPlan",
    "parse_logit_bias",
    "parse_stop",
    "parse_values",
    "playground_request",
]

#: How many rows of each frame the Playground's tabs show; the full frames are on ``.result``.
FRAME_ROWS = 200
#: How many choices the Playground shows as highlighted text (n can be 128).
MAX_HIGHLIGHTED = 8
#: logprobs choices when a server sets no cap (llama.cpp).
UNCAPPED_LOGPROBS = 20

Encoder = Callable[[str], list[int]]


# -- pure helpers: control values -> request fields -----------------------------------------------


def _unescape(text: str) -> str:
    r"""Turn the escapes a one-line text box needs (``\n``, ``\t``, ``\\``) into characters."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def parse_stop(values: Iterable[str]) -> list[str] | None:
    r"""Stop sequences from text boxes: blanks are ignored, ``\n`` and ``\t`` are escapes."""
    stops = [_unescape(value) for value in values if value]
    return stops or None


def parse_logit_bias(text: str, encode: Encoder | None = None) -> dict[str, float] | None:
    """Parse the logit_bias editor: one ``KEY: BIAS`` per line.

    KEY is a token id (digits) or, where the model's tokenizer is known (``encode``), a text in
    double quotes (JSON string syntax, so ``" the"`` keeps its space and ``"\\n"`` is a newline)
    or bare text. A text that is several tokens biases each of them. Returns ``{"id": bias}`` or
    None when empty; raises `RequestError` (param ``logit_bias``) naming the line that is wrong.
    """
    allowed = "lines of KEY: BIAS, KEY a token id or a quoted text, BIAS a number from -100 to 100"
    bias: dict[str, float] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.rpartition(":")
        key = key.strip()
        if not sep or not key:
            raise RequestError(
                "logit_bias",
                f"logit_bias line {number} must look like 'KEY: BIAS'; got {raw_line!r}",
                allowed=allowed,
                value=raw_line,
            )
        try:
            amount = float(value)
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount) or not -100 <= amount <= 100:
            raise RequestError(
                "logit_bias",
                f"logit_bias line {number}: the bias must be a number "
                f"from -100 to 100; got {value.strip()!r}",
                allowed=allowed,
                value=raw_line,
            )
        if key.isdigit():
            ids = [int(key)]
        else:
            if len(key) >= 2 and key[0] == key[-1] == '"':
                try:
                    token_text = json.loads(key)
                except json.JSONDecodeError as exc:
                    raise RequestError(
                        "logit_bias",
                        f"logit_bias line {number}: {key} is not a valid quoted string ({exc.msg})",
                        allowed=allowed,
                        value=raw_line,
                    ) from None
            else:
                token_text = key
            if encode is None:
                raise RequestError(
                    "logit_bias",
                    f"logit_bias line {number}: this model's tokenizer is not known "
                    f"here, so give token ids rather than text; got {key!r}",
                    allowed="token ids (digits) for models whose tokenizer is unknown",
                    value=raw_line,
                )
            ids = list(encode(token_text))
            if not ids:
                raise RequestError(
                    "logit_bias",
                    f"logit_bias line {number}: {key} encodes to no tokens",
                    allowed=allowed,
                    value=raw_line,
                )
        for token_id in ids:
            bias[str(token_id)] = int(amount) if amount == int(amount) else amount
    return bias or None


def _parse_seed(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise RequestError(
            "seed",
            f"seed must be an integer (or blank for none); got {text!r}",
            allowed="an integer, or blank",
            value=text,
        ) from None


def playground_request(
    state: Mapping[str, Any], *, limits: Limits | None = None, encode: Encoder | None = None
) -> CompletionRequest:
    """The request a Playground's control values describe (pure; validates).

    ``state`` maps control names to values as the widgets hold them (strings for seed, suffix, stop
    boxes and the logit_bias editor). Always sent: prompt, model, max_tokens, temperature, top_p and
    logprobs (unless "off"), because servers disagree on their defaults. The other fields are sent
    only when changed from the API default, so a server that refuses a field outright (llama.cpp:
    best_of, echo, suffix) is not sent it unless asked.
    """
    fields: dict[str, Any] = {
        "prompt": state["prompt"],
        "model": state.get("model") or None,
        "max_tokens": state["max_tokens"],
        "temperature": state["temperature"],
        "top_p": state["top_p"],
        "logprobs": state.get("logprobs"),
    }
    for name in ("frequency_penalty", "presence_penalty"):
        if state.get(name):
            fields[name] = state[name]
    if state.get("n", 1) != 1:
        fields["n"] = state["n"]
    if state.get("best_of", 1) != 1:
        fields["best_of"] = state["best_of"]
    if state.get("echo"):
        fields["echo"] = True
    if state.get("stream"):
        fields["stream"] = True
        # Usage arrives only in a last chunk, and only when asked for.
        fields["stream_options"] = {"include_usage": True}
    fields["seed"] = _parse_seed(state.get("seed", ""))
    fields["stop"] = parse_stop(state.get("stop", ()))
    fields["logit_bias"] = parse_logit_bias(state.get("logit_bias", ""), encode)
    if state.get("suffix"):
        fields["suffix"] = state["suffix"]
    return CompletionRequest(**fields, limits=limits or Limits())


def parse_values(field_name: str, text: str) -> list[Any]:
    """Comma-separated sweep values for one request field, typed as the field requires.

    Raises `RequestError` naming the field for a value of the wrong type; ranges are checked when
    the requests are built.
    """
    parts = [part.strip() for part in text.split(",")]
    parts = [part for part in parts if part]
    if not parts:
        raise RequestError(
            field_name,
            f"{field_name}: give at least one value (comma-separated); got {text!r}",
            allowed="comma-separated values",
            value=text,
        )
    kind = SWEEP_FIELDS.get(field_name)
    values: list[Any] = []
    for part in parts:
        try:
            if kind is float:
                values.append(float(part))
            elif kind is int:
                values.append(int(part))
            else:
                values.append(_unescape(part))
        except ValueError:
            kind_name = "a number" if kind is float else "an integer"
            raise RequestError(
                field_name,
                f"{field_name} values must each be {kind_name}; got {part!r}",
                allowed=f"comma-separated, each {kind_name}",
                value=text,
            ) from None
    return values


#: Fields a SweepBuilder can sweep over, and the type of their values.
SWEEP_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "frequency_penalty": float,
    "presence_penalty": float,
    "max_tokens": int,
    "logprobs": int,
    "seed": int,
    "n": int,
    "best_of": int,
    "stop": str,
}


#: What a SweepBuilder can plot against its axes: columns of `metrics.per_choice`.
SWEEP_METRICS: tuple[str, ...] = (
    "mean_logprob",
    "perplexity",
    "n_tokens",
    "repetition_rate",
    "token_repetition_rate",
    "distinct_1",
    "distinct_2",
    "n_words",
)


# -- display helpers ------------------------------------------------------------------------------


def _error_html(exc: BaseException) -> str:
    """An error as an HTML box: what was wrong, and for unexpected errors the traceback, folded."""
    if isinstance(exc, RequestError):
        title = f"Invalid setting: {exc.param}" if exc.param else "Invalid request"
        body = html.escape(str(exc))
    elif isinstance(exc, APIError):
        title = "The server answered with an error"
        body = html.escape(str(exc))
    else:
        title = f"{type(exc).__name__}"
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        body = (
            f"{html.escape(str(exc))}<details><summary>traceback</summary>"
            f"<pre>{html.escape(trace)}</pre></details>"
        )
    return (
        f'<div class="nbc-error" style="color:#b00020;border-left:4px solid #b00020;'
        f'padding:4px 8px;margin:4px 0"><b>{html.escape(title)}</b><br>{body}</div>'
    )


def _html_of(obj: Any) -> str:
    """HTML text of what `plots.highlight` returns (a string or an IPython HTML object)."""
    if isinstance(obj, str):
        return obj
    if hasattr(obj, "_repr_html_"):
        return str(obj._repr_html_())
    if hasattr(obj, "data"):
        return str(obj.data)
    return str(obj)


def _frame_html(frame: pd.DataFrame, rows: int = FRAME_ROWS) -> str:
    shown = frame.head(rows)
    note = (
        f"<p><i>first {rows} of {len(frame)} rows; the full frame is on <code>.result</code>"
        "</i></p>"
        if len(frame) > rows
        else ""
    )
    table = shown.to_html(max_cols=40, float_format=lambda x: f"{x:.4g}", border=0)
    return f'<div style="max-height:420px;overflow:auto">{note}{table}</div>'


def _figure_output(figure: Any) -> dict[str, Any]:
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


def _note_output(text: str) -> dict[str, Any]:
    data = {"text/plain": text, "text/html": f"<p><i>{html.escape(text)}</i></p>"}
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _default_client(client: Client | None) -> Client:
    if client is not None:
        return client
    from ._client import Client

    return Client()


def _endpoint(client: Client) -> str:
    """The client's endpoint for a repr, without credentials written into the URL."""
    from ._secrets import redact_url

    return redact_url(str(getattr(client, "endpoint", "?")))


def _models(client: Client) -> tuple[list[str], BaseException | None]:
    try:
        models = list(client.models())
    except Exception as exc:  # shown in the widget; the model stays editable by code
        return ([client.model] if client.model else []), exc
    if client.model and client.model not in models:
        models.insert(0, client.model)
    return models, None


def _fit(widget: widgets.DOMWidget, label: str, width: str) -> None:
    """Give a control a fixed label and total width, so that columns of controls line up."""
    if "description_width" in widget.style.keys:
        widget.style.description_width = label
    widget.layout.width = width


def _slider(
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


# -- Playground -----------------------------------------------------------------------------------


class Playground(widgets.VBox):
    """Every Completions field as a control, a Run button, and the result as tokens, frames, plots.

    ``Playground(client=None, prompt=..., encode=None)``: ``client`` defaults to ``Client()`` (the
    embedded model when no endpoint is configured). ``encode`` is the tokenizer used to turn text in
    the logit_bias editor into token ids; by default it is known only for the embedded model.

    `request` is the request the controls describe; `run` sends it; `result` is the last
    `Completion`. Errors appear in `error` (an HTML box), never as a lost traceback.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        prompt: str = "",
        max_tokens: int = 32,
        encode: Encoder | None = None,
        **kwargs: Any,
    ) -> None:
        self._client = _default_client(client)
        self._encode = encode
        self.result: Completion | None = None
        self.last_error: BaseException | None = None
        limits = self._client.limits or Limits()
        self._limits = limits

        models, models_error = _models(self._client)
        self.prompt = widgets.Textarea(
            value=prompt, placeholder="Prompt", layout=widgets.Layout(width="100%", height="6em")
        )
        self.model = widgets.Dropdown(
            options=models,
            value=(
                self._client.model
                if self._client.model in models
                else (models[0] if models else None)
            ),
            description="model",
        )
        self.temperature = _slider("temperature", 0.0, 2.0, 0.05, 1.0)
        self.top_p = _slider("top_p", 0.0, 1.0, 0.01, 1.0)
        self.frequency_penalty = _slider("frequency_penalty", -2.0, 2.0, 0.05, 0.0)
        self.presence_penalty = _slider("presence_penalty", -2.0, 2.0, 0.05, 0.0)
        cap = limits.max_logprobs if limits.max_logprobs is not None else UNCAPPED_LOGPROBS
        self.logprobs = widgets.Dropdown(
            options=[("off", None)] + [(str(k), k) for k in range(cap + 1)],
            value=min(5, cap),
            description="logprobs",
        )
        # IntText, not bounded boxes: an out-of-range value is reported, never clamped silently.
        self.max_tokens = widgets.IntText(
            value=max_tokens, description="max_tokens", style={"description_width": "initial"}
        )
        self.n = widgets.IntText(value=1, description="n")
        self.best_of = widgets.IntText(value=1, description="best_of")
        self.seed = widgets.Text(value="", placeholder="blank: none", description="seed")
        self.suffix = widgets.Text(value="", placeholder="blank: none", description="suffix")
        self.echo = widgets.Checkbox(value=False, description="echo", indent=False)
        self.stream = widgets.Checkbox(value=False, description="stream", indent=False)
        self.stop = [
            widgets.Text(
                value="",
                placeholder=f"stop {i + 1} (\\n = newline)",
                layout=widgets.Layout(width="10em"),
            )
            for i in range(limits.max_stop if limits.max_stop is not None else 4)
        ]
        self.logit_bias = widgets.Textarea(
            value="",
            placeholder='logit_bias, one per line: 464: -100  or  " the": 5',
            layout=widgets.Layout(width="100%", height="4em"),
        )
        self.logit_bias_preview = widgets.HTML(value="")

        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.runs = 0
        self.status = widgets.HTML(value="")
        self.error = widgets.HTML(value="")
        self.streamed = widgets.HTML(value="")
        self.highlighted = widgets.HTML(value="")
        # Classes the browser test (and user CSS) can find the parts by.
        self.add_class("nbc-playground")
        self.status.add_class("nbc-status")
        self.error.add_class("nbc-error-area")
        self.highlighted.add_class("nbc-highlight")
        self.frames_tabs = {
            name: widgets.HTML(value="") for name in ("choices", "tokens", "alternatives")
        }
        self.plot_outputs = {
            name: widgets.Output() for name in ("token_probabilities", "entropy", "alternatives")
        }
        self.request_view = widgets.HTML(value="")
        tab_children = [*self.frames_tabs.values(), *self.plot_outputs.values(), self.request_view]
        tab_titles = [
            "choices",
            "tokens",
            "alternatives",
            "probability plot",
            "entropy plot",
            "alternatives plot",
            "request",
        ]
        self.tabs = widgets.Tab(children=tab_children, titles=tab_titles)

        for slider in (self.temperature, self.top_p, self.frequency_penalty, self.presence_penalty):
            _fit(slider, "10.5em", "26em")
        for box in (self.model, self.max_tokens, self.logprobs, self.n, self.best_of):
            _fit(box, "6em", "17em")
        for box in (self.seed, self.suffix):
            _fit(box, "4em", "15em")
        for box in (self.echo, self.stream):
            box.layout.width = "7em"
        # Columns keep their width and wrap below each other on a narrow screen.
        column = widgets.Layout(flex="0 0 auto", margin="0 1em 0 0")
        sliders = widgets.VBox(
            [self.temperature, self.top_p, self.frequency_penalty, self.presence_penalty],
            layout=column,
        )
        numbers = widgets.VBox(
            [self.model, self.max_tokens, self.logprobs, self.n, self.best_of], layout=column
        )
        others = widgets.VBox(
            [self.seed, self.suffix, widgets.HBox([self.echo, self.stream])], layout=column
        )
        controls = widgets.HBox(
            [sliders, numbers, others], layout=widgets.Layout(flex_flow="row wrap")
        )
        stop_row = widgets.HBox([widgets.Label("stop"), *self.stop])
        super().__init__(
            children=[
                self.prompt,
                controls,
                stop_row,
                self.logit_bias,
                self.logit_bias_preview,
                widgets.HBox([self.run_button, self.status]),
                self.error,
                self.streamed,
                self.highlighted,
                self.tabs,
            ],
            **kwargs,
        )

        self.run_button.on_click(self._on_click)
        for control in self._controls():
            control.observe(self._on_change, names=["value"])
        if models_error is not None:
            self._show_error(models_error)
        else:
            self._on_change(None)

    # -- state ------------------------------------------------------------------------------------
    def _controls(self) -> list[widgets.ValueWidget]:
        return [
            self.prompt,
            self.model,
            self.temperature,
            self.top_p,
            self.frequency_penalty,
            self.presence_penalty,
            self.logprobs,
            self.max_tokens,
            self.n,
            self.best_of,
            self.seed,
            self.suffix,
            self.echo,
            self.stream,
            *self.stop,
            self.logit_bias,
        ]

    @property
    def state(self) -> dict[str, Any]:
        """The control values, as `playground_request` takes them."""
        return {
            "prompt": self.prompt.value,
            "model": self.model.value,
            "temperature": self.temperature.value,
            "top_p": self.top_p.value,
            "frequency_penalty": self.frequency_penalty.value,
            "presence_penalty": self.presence_penalty.value,
            "logprobs": self.logprobs.value,
            "max_tokens": self.max_tokens.value,
            "n": self.n.value,
            "best_of": self.best_of.value,
            "seed": self.seed.value,
            "suffix": self.suffix.value,
            "echo": self.echo.value,
            "stream": self.stream.value,
            "stop": [box.value for box in self.stop],
            "logit_bias": self.logit_bias.value,
        }

    def _embedded_engine(self) -> Any:
        """The embedded model's engine when it is the model chosen (its vocabulary is known)."""
        from .model import MODEL_ID

        if self.model.value != MODEL_ID:
            return None
        from .model import load_engine

        return load_engine()

    @property
    def request(self) -> CompletionRequest:
        """The `CompletionRequest` the controls describe; raises `RequestError` if one is bad."""
        state = self.state
        bias_lines = [
            line.strip()
            for line in state["logit_bias"].splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        # The embedded engine is looked up only when the editor is used (it loads the model).
        engine = self._embedded_engine() if bias_lines else None
        encode = self._encode or (engine.encode if engine is not None else None)
        request = playground_request(state, limits=self._limits, encode=encode)
        if engine is not None and request.logit_bias:
            for key in request.logit_bias:
                if int(key) >= engine.vocab_size:
                    raise RequestError(
                        "logit_bias",
                        f"logit_bias: token id {key} is not in {engine.model_id}'s "
                        f"vocabulary (ids 0 to {engine.vocab_size - 1})",
                        allowed=f"token ids from 0 to {engine.vocab_size - 1}",
                        value=key,
                    )
        return request

    def _on_change(self, change: Any) -> None:
        try:
            request = self.request
        except Exception as exc:  # invalid settings, or a tokenizer failure: shown, never lost
            self._show_error(exc)
            self.logit_bias_preview.value = ""
            return
        self.error.value = ""
        self.last_error = None
        self.logit_bias_preview.value = self._bias_preview(request)

    def _bias_preview(self, request: CompletionRequest) -> str:
        """The logit_bias as sent, with each id's token where the vocabulary is known."""
        if not request.logit_bias:
            return ""
        engine = self._embedded_engine()
        parts = []
        for key, value in request.logit_bias.items():
            label = f" {html.escape(repr(engine.token_str(int(key))))}" if engine else ""
            parts.append(f"<code>{key}</code>{label}: {value:g}")
        return "<small>logit_bias: " + ", ".join(parts) + "</small>"

    def _show_error(self, exc: BaseException) -> None:
        self.last_error = exc
        self.error.value = _error_html(exc)

    # -- running ----------------------------------------------------------------------------------
    def _on_click(self, button: widgets.Button) -> None:
        # A callback's exception would only reach the kernel log: show everything in the widget.
        try:
            self.run()
        except Exception as exc:
            self._show_error(exc)

    def run(self) -> Completion | None:
        """Send `request` (streaming into the widget if ``stream`` is ticked); return the result.

        Errors (invalid settings, server errors) are shown in the widget and returned as None; the
        exception is kept on `last_error`.
        """
        try:
            request = self.request
        except Exception as exc:
            self._show_error(exc)
            return None
        self.error.value = ""
        self.streamed.value = ""
        self.request_view.value = (
            "<pre>" + html.escape(json.dumps(request.to_body(), indent=2), quote=False) + "</pre>"
        )
        self.run_button.disabled = True
        self.status.value = "<i>running…</i>"
        started = time.perf_counter()
        try:
            completion = self._send(request)
        except Exception as exc:
            self.status.value = ""
            self._show_error(exc)
            return None
        finally:
            self.run_button.disabled = False
        elapsed = time.perf_counter() - started
        self.result = completion
        self.last_error = None
        self.runs += 1
        usage = completion.usage or {}
        self.status.value = (
            f"<small>run #{self.runs}: "
            f"{usage.get('completion_tokens', '?')} tokens generated, "
            f"{usage.get('prompt_tokens', '?')} in the prompt, "
            f"{elapsed:.2f} s</small>"
        )
        try:
            self._show_result(completion)
        except Exception as exc:
            self._show_error(exc)
        else:
            self.streamed.value = ""  # the highlighted result below now shows the same text
        return completion

    def _send(self, request: CompletionRequest) -> Completion:
        if not request.stream:
            return self._client.complete_request(request)
        texts: dict[int, str] = {}
        with self._client.stream_request(request) as stream:
            for chunk in stream:
                if chunk.text:
                    texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
                    self.streamed.value = self._streamed_html(texts)
            return stream.completion()

    @staticmethod
    def _streamed_html(texts: Mapping[int, str]) -> str:
        blocks = [
            f'<pre style="white-space:pre-wrap;margin:2px 0">'
            f"{'[' + str(index) + '] ' if len(texts) > 1 else ''}{html.escape(text)}</pre>"
            for index, text in sorted(texts.items())
        ]
        return "".join(blocks)

    def _show_result(self, completion: Completion) -> None:
        from . import plots

        choices, tokens, alternatives = completion.frames()
        for name, frame in (
            ("choices", choices),
            ("tokens", tokens),
            ("alternatives", alternatives),
        ):
            self.frames_tabs[name].value = _frame_html(frame)
        has_logprobs = len(tokens) > 0 and bool(tokens["logprob"].notna().any())
        if has_logprobs:
            indices = sorted(int(i) for i in tokens["index"].dropna().unique())
            blocks = []
            for index in indices[:MAX_HIGHLIGHTED]:
                label = f"<small>choice {index}</small>" if len(indices) > 1 else ""
                text = _html_of(plots.highlight(tokens, alternatives=alternatives, index=index))
                blocks.append(f'<div class="nbc-tokens">{label}{text}</div>')
            if len(indices) > MAX_HIGHLIGHTED:
                blocks.append(
                    f"<small>… and {len(indices) - MAX_HIGHLIGHTED} more choices in the "
                    "frames</small>"
                )
            self.highlighted.value = "".join(blocks)
            figures = {
                "token_probabilities": lambda: plots.token_probabilities(tokens),
                "entropy": lambda: plots.entropy(tokens),
                "alternatives": lambda: plots.alternatives(alternatives),
            }
            for name, make in figures.items():
                try:
                    self.plot_outputs[name].outputs = (_figure_output(make()),)
                except Exception as exc:
                    self.plot_outputs[name].outputs = (
                        _note_output(f"{type(exc).__name__}: {exc}"),
                    )
        else:
            texts = {
                int(index): str(text)
                for index, text in zip(choices["index"], choices["text"], strict=True)
            }
            self.highlighted.value = self._streamed_html(texts)
            for output in self.plot_outputs.values():
                output.outputs = (_note_output("set logprobs (0-5) to see token probabilities"),)

    def __repr__(self) -> str:
        return (
            f"Playground(endpoint={_endpoint(self._client)!r}, "
            f"model={self.model.value!r}, result={'set' if self.result else 'none'})"
        )


# -- SweepBuilder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPlan:
    """What a SweepBuilder's controls describe: ``nbcompletions.sweep(client, **kwargs)``.

    ``n_requests`` and ``token_estimate`` come from the sweeps module's own grid and estimate
    (`nbcompletions._sweep.expand_grid`, `estimate_tokens`), so they are what `sweep` will send.
    """

    kwargs: dict[str, Any]
    axes: dict[str, list[Any]] = field(default_factory=dict)
    n_requests: int = 0
    token_estimate: int = 0
    estimate_method: str = ""


class SweepBuilder(widgets.VBox):
    """Choose the axes of a sweep, see its request count and token estimate, run it, see the plot.

    ``SweepBuilder(client=None, prompt=..., axes={"temperature": "0, 0.7, 1.4"}, repeats=3)``.
    Each axis is a request field and comma-separated values; every combination, for every prompt
    (one per line), is requested ``repeats`` times. `plan` is what the controls describe; `run` runs
    it through `nbcompletions.sweep` with a progress bar; `result` is the last `SweepResult`.
    """

    N_AXES = 3

    def __init__(
        self,
        client: Client | None = None,
        *,
        prompt: str = "",
        axes: Mapping[str, str] | None = None,
        repeats: int = 3,
        max_tokens: int = 16,
        **kwargs: Any,
    ) -> None:
        self._client = _default_client(client)
        self.result: SweepResult | None = None
        self.last_error: BaseException | None = None
        models, models_error = _models(self._client)
        self.prompts = widgets.Textarea(
            value=prompt,
            placeholder="one prompt per line (\\n for a newline inside one)",
            layout=widgets.Layout(width="100%", height="5em"),
        )
        self.model = widgets.Dropdown(
            options=models,
            value=(
                self._client.model
                if self._client.model in models
                else (models[0] if models else None)
            ),
            description="model",
        )
        self.max_tokens = widgets.IntText(
            value=max_tokens, description="max_tokens", style={"description_width": "initial"}
        )
        limits = self._client.limits or Limits()
        cap = limits.max_logprobs if limits.max_logprobs is not None else UNCAPPED_LOGPROBS
        self.logprobs = widgets.Dropdown(
            options=[("off", None)] + [(str(k), k) for k in range(cap + 1)],
            value=min(1, cap),
            description="logprobs",
        )
        self.repeats = widgets.IntText(value=repeats, description="repeats")
        self.cache = widgets.Text(value="", placeholder="blank: no cache", description="cache file")
        given = list((axes if axes is not None else {"temperature": "0, 0.5, 1, 1.5"}).items())
        field_options = [("(none)", "")] + [(name, name) for name in SWEEP_FIELDS]
        self.axis_fields: list[widgets.Dropdown] = []
        self.axis_values: list[widgets.Text] = []
        for i in range(self.N_AXES):
            name, values = given[i] if i < len(given) else ("", "")
            self.axis_fields.append(
                widgets.Dropdown(options=field_options, value=name, description=f"axis {i + 1}")
            )
            self.axis_values.append(
                widgets.Text(value=values, placeholder="comma-separated values")
            )
        self.y = widgets.Dropdown(
            options=list(SWEEP_METRICS), value="mean_logprob", description="plot y"
        )
        self.summary = widgets.HTML(value="")
        self.error = widgets.HTML(value="")
        self.run_button = widgets.Button(
            description="Run sweep", button_style="primary", icon="play"
        )
        # tqdm's notebook bar is displayed into this Output while a sweep runs.
        self.progress = widgets.Output()
        self.status = widgets.HTML(value="")
        self.plot = widgets.Output()
        self.add_class("nbc-sweep-builder")
        self.summary.add_class("nbc-summary")
        self.status.add_class("nbc-status")

        for box in (self.model, self.max_tokens, self.logprobs, self.repeats):
            _fit(box, "6em", "15em")
        _fit(self.cache, "6em", "30em")
        _fit(self.y, "6em", "20em")
        for field_box, values_box in zip(self.axis_fields, self.axis_values, strict=True):
            _fit(field_box, "6em", "15em")
            values_box.layout.width = "30em"
        axes_rows = [
            widgets.HBox([f, v]) for f, v in zip(self.axis_fields, self.axis_values, strict=True)
        ]
        super().__init__(
            children=[
                self.prompts,
                widgets.HBox([self.model, self.max_tokens, self.logprobs]),
                widgets.HBox([self.repeats, self.cache]),
                *axes_rows,
                self.summary,
                self.error,
                widgets.HBox([self.run_button, self.status]),
                self.progress,
                self.y,
                self.plot,
            ],
            **kwargs,
        )
        self.run_button.on_click(self._on_click)
        for control in self._controls():
            control.observe(self._on_change, names=["value"])
        self.y.observe(self._on_y, names=["value"])
        if models_error is not None:
            self._show_error(models_error)
        else:
            self._on_change(None)

    def _controls(self) -> list[widgets.ValueWidget]:
        return [
            self.prompts,
            self.model,
            self.max_tokens,
            self.logprobs,
            self.repeats,
            self.cache,
            *self.axis_fields,
            *self.axis_values,
        ]

    @property
    def plan(self) -> SweepPlan:
        """The sweep the controls describe; raises `RequestError` naming a field that is wrong."""
        from ._sweep import estimate_tokens, expand_grid

        prompts = [_unescape(line) for line in self.prompts.value.splitlines() if line.strip()]
        if not prompts:
            raise RequestError(
                "prompt",
                "give at least one prompt (one per line); got none",
                allowed="one or more lines",
                value=self.prompts.value,
            )
        axes: dict[str, list[Any]] = {}
        for field_box, values_box in zip(self.axis_fields, self.axis_values, strict=True):
            if not field_box.value:
                continue
            if field_box.value in axes:
                raise RequestError(
                    field_box.value,
                    f"{field_box.value} is chosen for two axes",
                    allowed="each field on one axis at most",
                    value=field_box.value,
                )
            axes[field_box.value] = parse_values(field_box.value, values_box.value)
        fields: dict[str, Any] = {
            "model": self.model.value or None,
            "max_tokens": self.max_tokens.value,
            "logprobs": self.logprobs.value,
        }
        fields = {k: v for k, v in fields.items() if v is not None and k not in axes}
        for name, values in axes.items():
            # A list of strings is ONE stop setting to the API; one list per value makes an axis.
            fields[name] = [[v] for v in values] if name == "stop" else values
        prompt: Any = prompts if len(prompts) > 1 else prompts[0]
        grid = expand_grid(self._client, prompt, repeats=self.repeats.value, **fields)
        estimate, method = estimate_tokens(
            [point.request for point in grid.points], model=self.model.value or grid.model
        )
        kwargs: dict[str, Any] = {"prompt": prompt, "repeats": self.repeats.value, **fields}
        if self.cache.value.strip():
            kwargs["cache"] = self.cache.value.strip()
        return SweepPlan(
            kwargs=kwargs,
            axes=axes,
            n_requests=len(grid.points),
            token_estimate=estimate,
            estimate_method=method,
        )

    def _on_change(self, change: Any) -> None:
        try:
            plan = self.plan
        except Exception as exc:
            self._show_error(exc)
            self.summary.value = ""
            return
        self.error.value = ""
        self.last_error = None
        axes = " × ".join(f"{name} ({len(values)})" for name, values in plan.axes.items())
        prompts = plan.kwargs["prompt"]
        n_prompts = len(prompts) if isinstance(prompts, list) else 1
        self.summary.value = (
            f"<b>{plan.n_requests:,}</b> requests = {n_prompts} prompt(s)"
            f"{' × ' + html.escape(axes) if axes else ''} × {plan.kwargs['repeats']} repeats; "
            f"at most about <b>{plan.token_estimate:,}</b> tokens "
            f"<small>(prompts counted by {html.escape(plan.estimate_method)})</small>"
        )

    def _show_error(self, exc: BaseException) -> None:
        self.last_error = exc
        self.error.value = _error_html(exc)

    def _on_click(self, button: widgets.Button) -> None:
        try:
            self.run()
        except Exception as exc:
            self._show_error(exc)

    def run(self) -> SweepResult | None:
        """Run the planned sweep with a progress bar and show the sweep plot.

        Errors are shown in the widget and returned as None (kept on `last_error`).
        """
        from ._sweep import sweep

        try:
            plan = self.plan
        except Exception as exc:
            self._show_error(exc)
            return None
        self.error.value = ""
        self.run_button.disabled = True
        self.status.value = f"<i>running {plan.n_requests:,} requests…</i>"
        self.progress.clear_output()
        try:
            with self.progress:
                result = sweep(self._client, progress=True, **plan.kwargs)
        except Exception as exc:
            self.status.value = ""
            self._show_error(exc)
            return None
        finally:
            self.run_button.disabled = False
        self.result = result
        self.last_error = None
        failed = f", {result.n_failed} failed" if result.n_failed else ""
        self.status.value = (
            f"<small>{len(result):,} requests: {result.n_cached:,} from the cache{failed}</small>"
        )
        self._show_plot()
        return result

    def _on_y(self, change: Any) -> None:
        if self.result is not None:
            try:
                self._show_plot()
            except Exception as exc:
                self._show_error(exc)

    def _show_plot(self) -> None:
        from . import plots
        from .metrics import per_choice

        if self.result is None:
            return
        axes = [name for name in (box.value for box in self.axis_fields) if name]
        choices = per_choice(self.result.choices, self.result.tokens)
        several_prompts = "prompt" in choices.columns and choices["prompt"].nunique(dropna=True) > 1
        kwargs: dict[str, Any] = {"y": self.y.value}
        if axes:
            kwargs["x"] = axes[0]
            rest = axes[1:] + (["prompt"] if several_prompts else [])
        else:
            kwargs["x"] = "prompt"
            rest = []
        if rest:
            kwargs["color"] = rest[0]
        if len(rest) > 1:
            kwargs["facet_col"] = rest[1]
        self.plot.outputs = (_figure_output(plots.sweep(choices, **kwargs)),)

    def __repr__(self) -> str:
        axes = [box.value for box in self.axis_fields if box.value]
        return (
            f"SweepBuilder(endpoint={_endpoint(self._client)!r}, axes={axes!r}, "
            f"result={'set' if self.result else 'none'})"
        )
