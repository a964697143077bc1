"""The Playground: every Completions field as a control, a Run button, the result shown."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .._chat import ChatRequest, top_logprobs_cap
from .._errors import RequestError
from .._request import CompletionRequest, Limits
from .._secrets import secrets_of
from ._controls import Encoder, playground_request
from ._display import (
    UNCAPPED_LOGPROBS,
    api_slider,
    default_client,
    endpoint_label,
    error_html,
    figure_output,
    fit_control,
    frame_html,
    html_of,
    model_options,
    note_output,
)
from ._messages import MessagesEditor

if TYPE_CHECKING:  # pragma: no cover
    from .._client import Client
    from .._completion import Completion

#: How many choices the Playground shows as highlighted text (n can be 128).
MAX_HIGHLIGHTED = 8
#: The Playground's modes: a prompt for /v1/completions, or messages for /v1/chat/completions.
MODES = ("completion", "chat")
#: Completion fields Chat Completions does not have: disabled (and not sent) in chat mode.
COMPLETION_ONLY = ("echo", "suffix", "best_of")


class Playground(widgets.VBox):  # type: ignore[misc, unused-ignore]  # ipywidgets: untyped
    """Every Completions field as a control, a Run button, and the result as tokens, frames, plots.

    ``Playground(client=None, prompt=..., encode=None, mode="completion", messages=None)``:
    ``client`` defaults to ``Client()`` (the embedded model when no endpoint is configured).
    ``mode="chat"`` (or the mode toggle) swaps the prompt for a messages editor (rows of role and
    content, add and remove) and sends `Client.chat` with ``logprobs=True`` and ``top_logprobs``
    from the logprobs control; the result shows as a completion's does. ``encode`` is the
    tokenizer used to turn text in the logit_bias editor into token ids; by default it is known
    only for the embedded model.

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
        mode: str = "completion",
        messages: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise RequestError(
                "mode",
                f"mode must be one of {', '.join(MODES)}; got {mode!r}",
                allowed=", ".join(MODES),
                value=mode,
            )
        self._client = default_client(client)
        self._encode = encode
        self.result: Completion | None = None
        self.last_error: BaseException | None = None
        limits = self._client.limits or Limits()
        self._limits = limits

        models, models_error = model_options(self._client)
        self._make_controls(prompt, max_tokens, models, limits)
        self.mode = widgets.ToggleButtons(options=MODES, value=mode, description="mode")
        self.messages = MessagesEditor(messages)
        self._make_outputs()
        super().__init__(children=self._arranged(), **kwargs)
        self.run_button.on_click(self._on_click)
        for control in self._controls():
            control.observe(self._on_change, names=["value"])
        self.mode.observe(self._on_mode, names=["value"])
        self.messages.on_change(lambda: self._on_change(None))
        self._show_mode()
        if models_error is not None:
            self._show_error(models_error)
        else:
            self._on_change(None)

    def _make_controls(
        self, prompt: str, max_tokens: int, models: list[str], limits: Limits
    ) -> None:
        """One control per Completions field."""
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
        self.temperature = api_slider("temperature", 0.0, 2.0, 0.05, 1.0)
        self.top_p = api_slider("top_p", 0.0, 1.0, 0.01, 1.0)
        self.frequency_penalty = api_slider("frequency_penalty", -2.0, 2.0, 0.05, 0.0)
        self.presence_penalty = api_slider("presence_penalty", -2.0, 2.0, 0.05, 0.0)
        self.logprobs = widgets.Dropdown(
            options=_logprobs_options(limits.max_logprobs),
            value=min(5, _capped(limits.max_logprobs)),
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

    def _make_outputs(self) -> None:
        """The Run button, status and error lines, the highlighted text and the result tabs."""
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
        self.streamed.add_class("nbc-streamed")
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

    def _arranged(self) -> list[widgets.Widget]:
        """The controls in columns that line up and wrap, then the outputs."""
        for slider in (self.temperature, self.top_p, self.frequency_penalty, self.presence_penalty):
            fit_control(slider, "10.5em", "26em")
        for box in (self.model, self.max_tokens, self.logprobs, self.n, self.best_of):
            fit_control(box, "6em", "17em")
        for box in (self.seed, self.suffix):
            fit_control(box, "4em", "15em")
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
        return [
            self.mode,
            self.prompt,
            self.messages,
            controls,
            stop_row,
            self.logit_bias,
            self.logit_bias_preview,
            widgets.HBox([self.run_button, self.status]),
            self.error,
            self.streamed,
            self.highlighted,
            self.tabs,
        ]

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
            "mode": self.mode.value,
            "messages": self.messages.messages,
        }

    def _embedded_engine(self) -> Any:
        """The embedded model's engine when it is the model chosen (its vocabulary is known)."""
        from ..model import MODEL_ID

        if self.model.value != MODEL_ID:
            return None
        from ..model import load_engine

        return load_engine()

    def _on_mode(self, change: Any) -> None:
        self._show_mode()
        self._on_change(change)

    def _show_mode(self) -> None:
        """Chat mode: the messages editor instead of the prompt; echo, suffix, best_of off."""
        chat = self.mode.value == "chat"
        self.prompt.layout.display = "none" if chat else None
        self.messages.layout.display = None if chat else "none"
        for name in COMPLETION_ONLY:
            getattr(self, name).disabled = chat
        # Chat's top_logprobs goes to 20 where Completions' logprobs stop at the server's cap (5).
        cap = top_logprobs_cap(self._limits) if chat else self._limits.max_logprobs
        kept = self.logprobs.value
        options = _logprobs_options(cap)
        if list(self.logprobs.options) != options:
            self.logprobs.options = options
            self.logprobs.value = None if kept is None else min(kept, _capped(cap))

    @property
    def request(self) -> CompletionRequest | ChatRequest:
        """The request the controls describe (a `ChatRequest` in chat mode); raises
        `RequestError` if one is bad."""
        state = self.state
        top_logprobs = state["logprobs"]
        if state["mode"] == "chat":
            # The completion fields are checked as a completion's (the prompt is not sent);
            # top_logprobs is checked by ChatRequest against chat's cap.
            state = {**state, "prompt": "-", "echo": False, "suffix": "", "best_of": 1}
            state["logprobs"] = None
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
        if state["mode"] == "chat":
            return self._chat_request(state["messages"], request, top_logprobs)
        return request

    def _chat_request(
        self, messages: Any, request: CompletionRequest, top_logprobs: int | None
    ) -> ChatRequest:
        """The chat twin of the completion fields checked above (the prompt aside)."""
        fields: dict[str, Any] = {
            name: getattr(request, name)
            for name in (
                "model",
                "max_tokens",
                "temperature",
                "top_p",
                "frequency_penalty",
                "presence_penalty",
                "n",
                "seed",
                "stop",
                "logit_bias",
                "stream",
                "stream_options",
            )
        }
        if top_logprobs is not None:
            fields.update(logprobs=True, top_logprobs=top_logprobs)
        return ChatRequest(messages, limits=self._limits, **fields)

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

    def _bias_preview(self, request: CompletionRequest | ChatRequest) -> str:
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
        self.error.value = error_html(exc, secrets_of(self._client))

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
        exception is kept on `last_error`. A failed run clears the previous run's text, frames and
        plots (and sets `result` to None), so nothing under the error belongs to another request.
        """
        try:
            request = self.request
        except Exception as exc:
            self._fail(exc, "the settings are invalid")
            self.request_view.value = ""  # nothing was sent
            return None
        self.error.value = ""
        # The last run's text (and any popup left open in it), frames and plots answered another
        # request: gone before this one streams in under them.
        self._clear_result()
        self.request_view.value = (
            "<pre>" + html.escape(json.dumps(request.to_body(), indent=2), quote=False) + "</pre>"
        )
        self.run_button.disabled = True
        self.status.value = "<i>running…</i>"
        started = time.perf_counter()
        try:
            completion = self._send(request)
        except Exception as exc:
            self._fail(exc, "the request failed")
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

    def _clear_result(self) -> None:
        """Empty the text, frames and plots of the last run (and set `result` to None)."""
        self.result = None
        self.streamed.value = ""
        self.highlighted.value = ""
        for tab in self.frames_tabs.values():
            tab.value = ""
        for output in self.plot_outputs.values():
            output.outputs = ()

    def _fail(self, exc: BaseException, why: str) -> None:
        """Show ``exc`` and clear the last run's result: it answered a different request."""
        self._show_error(exc)
        self._clear_result()
        self.status.value = f"<small>no result: {html.escape(why)} (see the error below)</small>"

    def _send(self, request: CompletionRequest | ChatRequest) -> Completion:
        if not request.stream:
            if isinstance(request, ChatRequest):
                return self._client.chat_request(request)
            return self._client.complete_request(request, path="widget")
        texts: dict[int, str] = {}
        with self._client.stream_request(request, path="widget") as stream:
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
        from .. import plots

        choices, tokens, alternatives = completion.frames()
        for name, frame in (
            ("choices", choices),
            ("tokens", tokens),
            ("alternatives", alternatives),
        ):
            self.frames_tabs[name].value = frame_html(frame)
        has_logprobs = len(tokens) > 0 and bool(tokens["logprob"].notna().any())
        if has_logprobs:
            indices = sorted(int(i) for i in tokens["index"].dropna().unique())
            blocks = []
            for index in indices[:MAX_HIGHLIGHTED]:
                label = f"<small>choice {index}</small>" if len(indices) > 1 else ""
                # The tabs below may be covered by a popup: no blank room kept for it.
                text = html_of(
                    plots.highlight(
                        tokens, alternatives=alternatives, index=index, popup_room=False
                    )
                )
                blocks.append(f'<div class="nbc-tokens">{label}{text}</div>')
            if len(indices) > MAX_HIGHLIGHTED:
                blocks.append(
                    f"<small>… and {len(indices) - MAX_HIGHLIGHTED} more choices in the "
                    "frames</small>"
                )
            self.highlighted.value = "".join(blocks)
            figures: dict[str, Callable[[], Any]] = {
                "token_probabilities": lambda: plots.token_probabilities(tokens),
                "entropy": lambda: plots.entropy(tokens),
                "alternatives": lambda: plots.alternatives(alternatives),
            }
            for name, make in figures.items():
                try:
                    self.plot_outputs[name].outputs = (figure_output(make()),)
                except Exception as exc:
                    self.plot_outputs[name].outputs = (note_output(f"{type(exc).__name__}: {exc}"),)
        else:
            texts = {
                int(index): str(text)
                for index, text in zip(choices["index"], choices["text"], strict=True)
            }
            self.highlighted.value = self._streamed_html(texts)
            for output in self.plot_outputs.values():
                top = max(k for _, k in self.logprobs.options if k is not None)
                note = f"set logprobs (0-{top}) to see token probabilities"
                output.outputs = (note_output(note),)

    def __repr__(self) -> str:
        return (
            f"Playground(endpoint={endpoint_label(self._client)!r}, "
            f"model={self.model.value!r}, result={'set' if self.result else 'none'})"
        )


def _capped(cap: int | None) -> int:
    return cap if cap is not None else UNCAPPED_LOGPROBS


def _logprobs_options(cap: int | None) -> list[tuple[str, int | None]]:
    """The logprobs dropdown's choices: off, then 0 to the cap (20 where the server sets none)."""
    return [("off", None)] + [(str(k), k) for k in range(_capped(cap) + 1)]
