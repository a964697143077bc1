"""The SweepBuilder: the axes of a sweep as controls, its size and cost shown, run, plotted."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .._chat import CHAT_ROLES
from .._errors import RequestError
from .._request import Limits
from .._secrets import secrets_of
from .._visible import visible_token
from ._controls import (
    PROMPT_SEPARATOR,
    SWEEP_FIELDS,
    SWEEP_METRICS,
    join_prompts,
    parse_values,
    split_prompts,
)
from ._display import (
    UNCAPPED_LOGPROBS,
    default_client,
    endpoint_label,
    error_html,
    figure_output,
    fit_control,
    model_options,
)

if TYPE_CHECKING:  # pragma: no cover
    from .._client import Client
    from .._sweep_result import SweepResult


@dataclass(frozen=True)
class SweepSettings:
    """What a SweepBuilder's controls describe: ``nbcompletions.sweep(client, **kwargs)``.

    ``n_requests`` and ``token_estimate`` come from the sweeps module's own grid and estimate
    (`nbcompletions._grid.expand_grid`, `estimate_tokens`), so they are what `sweep` will send.
    """

    kwargs: dict[str, Any]
    axes: dict[str, list[Any]] = field(default_factory=dict)
    n_requests: int = 0
    token_estimate: int = 0
    estimate_method: str = ""


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_ROLE_LINE = re.compile(rf"^({'|'.join(CHAT_ROLES)}):[ \t]?(.*)$")
_CONVERSATION_ALLOWED = (
    f"'role: content' lines (roles {', '.join(CHAT_ROLES)}), conversations separated by a line "
    f"holding only {PROMPT_SEPARATOR}"
)


def parse_conversations(text: str) -> list[list[dict[str, str]]]:
    """The conversations in a SweepBuilder's box (chat mode): blocks cut at ``---`` lines (as
    `split_prompts` cuts prompts), each a run of ``role: content`` lines; a line that starts with
    no role continues the message above it (``"user: To be\nor not"`` is one message).
    A block whose first line names no role is a `RequestError` naming ``messages``."""
    conversations = []
    for number, block in enumerate(split_prompts(text), start=1):
        messages: list[dict[str, str]] = []
        for line in block.strip("\n").split("\n"):
            match = _ROLE_LINE.match(line)
            if match is not None:
                messages.append({"role": match[1], "content": match[2]})
            elif messages:
                messages[-1]["content"] += "\n" + line
            else:
                raise RequestError(
                    "messages",
                    f"conversation {number} must start with a 'role: content' line "
                    f"(roles {', '.join(CHAT_ROLES)}); got {line!r}",
                    allowed=_CONVERSATION_ALLOWED,
                    value=block,
                )
        conversations.append(messages)
    return conversations


def conversations_text(conversations: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    """The box text for ``conversations`` (string contents); `parse_conversations` reads it."""
    blocks = []
    for number, conversation in enumerate(conversations):
        lines = []
        for message in conversation:
            content = message.get("content")
            if not isinstance(content, str):
                raise TypeError(
                    f"conversation {number} has a {message.get('role')!r} message whose content "
                    f"is not a string ({type(content).__name__}); the box holds text only"
                )
            lines.append(f"{message.get('role')}: {content}")
        blocks.append("\n".join(lines))
    return f"\n{PROMPT_SEPARATOR}\n".join(blocks)


def _as_conversations(messages: Any) -> list[Any]:
    """One conversation (a list of message dicts) or a list of them, as a list of them."""
    if (
        isinstance(messages, Sequence)
        and messages
        and all(isinstance(m, Mapping) for m in messages)
    ):
        return [messages]
    return list(messages)


class SweepBuilder(widgets.VBox):  # type: ignore[misc, unused-ignore]  # ipywidgets: untyped
    """Choose the axes of a sweep, see its request count and token estimate, run it, see the plot.

    ``SweepBuilder(client=None, prompt=..., axes={"temperature": "0, 0.7, 1.4"}, repeats=3)``.
    Each axis is a request field and comma-separated values; every combination, for every prompt,
    is requested ``repeats`` times.

    Prompts: ``prompt="ROMEO:\nJULIET:"`` (a string) is ONE prompt, newlines and all, never split;
    ``prompt=["ROMEO:\n", "JULIET:\n"]`` (a list) is several. In the prompts box, a line holding
    only ``---`` separates prompts (`split_prompts` says exactly how), and the summary lists the
    prompts it will send, whitespace made visible. `settings` is what the controls describe; `run`
    runs it through `nbcompletions.sweep` with a progress bar; `result` is the last `SweepResult`.

    Chat: ``SweepBuilder(client, messages=[conversation, ...])`` sweeps conversations (lists of
    ``{"role", "content"}`` dicts) through ``/v1/chat/completions`` instead. The box then holds
    them as ``role: content`` lines, conversations separated by a ``---`` line
    (`parse_conversations`); max_tokens is sent as ``max_completion_tokens`` and logprobs as
    ``logprobs=True`` with ``top_logprobs``.
    """

    N_AXES = 3

    def __init__(
        self,
        client: Client | None = None,
        *,
        prompt: str | Sequence[str] = "",
        axes: Mapping[str, str] | None = None,
        repeats: int = 3,
        max_tokens: int = 16,
        messages: Any = None,
        **kwargs: Any,
    ) -> None:
        self._client = default_client(client)
        self.result: SweepResult | None = None
        self.last_error: BaseException | None = None
        #: Chat mode: the box holds conversations, the sweep goes to /v1/chat/completions.
        self.chat = messages is not None
        models, models_error = model_options(self._client)
        self._make_controls("" if self.chat else prompt, max_tokens, repeats, models)
        if self.chat:
            self.prompts.value = conversations_text(_as_conversations(messages))
            self.prompts.placeholder = (
                "user: a message (system: and assistant: lines too); a line holding only "
                f"{PROMPT_SEPARATOR} starts another conversation"
            )
            self.max_tokens.description = "max_completion_tokens"
        self._make_axes(axes)
        self._make_outputs()
        super().__init__(children=self._arranged(), **kwargs)
        self.run_button.on_click(self._on_click)
        for control in self._controls():
            control.observe(self._on_change, names=["value"])
        self.y.observe(self._on_y, names=["value"])
        for field_box in self.axis_fields:
            field_box.observe(self._on_axis_field, names=["value"])
        if models_error is not None:
            self._show_error(models_error)
        else:
            self._on_change(None)

    def _make_controls(
        self, prompt: str | Sequence[str], max_tokens: int, repeats: int, models: list[str]
    ) -> None:
        """The prompts box and the fields every request shares."""
        if isinstance(prompt, str):
            box_text = join_prompts([prompt]) if prompt.strip() else prompt
        else:
            box_text = join_prompts(prompt)
        self.prompts = widgets.Textarea(
            value=box_text,
            placeholder=f"a prompt (newlines are part of it); a line holding only "
            f"{PROMPT_SEPARATOR} starts another",
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

    def _make_axes(self, axes: Mapping[str, str] | None) -> None:
        """N_AXES rows of (request field, comma-separated values)."""
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
                # Read on Enter or leaving the box, not per keystroke: "0.5," on the way to
                # "0.5, 0.9" is an error that would clear the chart.
                widgets.Text(
                    value=values,
                    placeholder="comma-separated values",
                    disabled=not name,
                    continuous_update=False,
                )
            )

    def _on_axis_field(self, change: Any) -> None:
        """An axis set to "(none)" drops its values (they would come back with the next field
        chosen, for a field they were not written for); choosing a field opens the box again."""
        values_box = self.axis_values[self.axis_fields.index(change.owner)]
        if not change.new:
            values_box.value = ""
        values_box.disabled = not change.new

    def _make_outputs(self) -> None:
        """The plot's y, the summary, error and status lines, progress and the chart."""
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

    def _arranged(self) -> list[widgets.Widget]:
        """The controls in rows that line up, then the outputs."""
        for box in (self.model, self.max_tokens, self.logprobs, self.repeats):
            fit_control(box, "6em", "15em")
        fit_control(self.cache, "6em", "30em")
        fit_control(self.y, "6em", "20em")
        for field_box, values_box in zip(self.axis_fields, self.axis_values, strict=True):
            fit_control(field_box, "6em", "15em")
            values_box.layout.width = "30em"
        axes_rows = [
            widgets.HBox([f, v]) for f, v in zip(self.axis_fields, self.axis_values, strict=True)
        ]
        return [
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
        ]

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
    def settings(self) -> SweepSettings:
        """The sweep the controls describe; raises `RequestError` naming a field that is wrong."""
        from .._grid import estimate_tokens, expand_grid

        main, value = self._prompt_value()
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
        fields = {k: v for k, v in self._shared_fields().items() if v is not None and k not in axes}
        for name, values in axes.items():
            # A list of strings is ONE stop setting to the API; one list per value makes an axis.
            fields[name] = [[v] for v in values] if name == "stop" else values
        kwargs: dict[str, Any] = {main: value, "repeats": self.repeats.value, **fields}
        grid = expand_grid(self._client, **kwargs)
        estimate, method = estimate_tokens(
            [point.request for point in grid.points], model=self.model.value or grid.model
        )
        if self.cache.value.strip():
            kwargs["cache"] = self.cache.value.strip()
        return SweepSettings(
            kwargs=kwargs,
            axes=axes,
            n_requests=len(grid.points),
            token_estimate=estimate,
            estimate_method=method,
        )

    def _prompt_value(self) -> tuple[str, Any]:
        """("prompt", the prompt or prompts) or, in chat mode, ("messages", the conversations)."""
        if self.chat:
            conversations = parse_conversations(self.prompts.value)
            if not conversations:
                raise RequestError(
                    "messages",
                    "give at least one conversation ('role: content' lines; several: separated "
                    f"by a line holding only {PROMPT_SEPARATOR}); got none",
                    allowed=_CONVERSATION_ALLOWED,
                    value=self.prompts.value,
                )
            return "messages", conversations
        prompts = split_prompts(self.prompts.value)
        if not prompts:
            raise RequestError(
                "prompt",
                f"give at least one prompt (several: separated by a line holding only "
                f"{PROMPT_SEPARATOR}); got none",
                allowed="one or more prompts",
                value=self.prompts.value,
            )
        return "prompt", prompts if len(prompts) > 1 else prompts[0]

    def _shared_fields(self) -> dict[str, Any]:
        """The fields every request shares, under the names of the API the mode sends to."""
        if self.chat:
            top = self.logprobs.value
            return {
                "model": self.model.value or None,
                "max_completion_tokens": self.max_tokens.value,
                "logprobs": True if top is not None else None,
                "top_logprobs": top,
            }
        return {
            "model": self.model.value or None,
            "max_tokens": self.max_tokens.value,
            "logprobs": self.logprobs.value,
        }

    def _shown_prompts(self, settings: SweepSettings) -> list[str]:
        """What the summary lists: the prompts, or each conversation's last message."""
        if self.chat:
            return [c[-1]["content"] for c in settings.kwargs["messages"]]
        prompts = settings.kwargs["prompt"]
        return prompts if isinstance(prompts, list) else [prompts]

    def _on_change(self, change: Any) -> None:
        try:
            settings = self.settings
        except Exception as exc:
            self._show_error(exc)
            self.summary.value = ""
            self._clear_chart("the settings are invalid")
            return
        self.error.value = ""
        self.last_error = None
        axes = " × ".join(f"{name} ({len(values)})" for name, values in settings.axes.items())
        prompts = self._shown_prompts(settings)
        n_prompts = len(prompts)
        noun = "conversation" if self.chat else "prompt"
        shown = " · ".join(
            f"<code>{html.escape(_short(visible_token(p) or ''))}</code>" for p in prompts[:6]
        ) + (f" … and {n_prompts - 6} more" if n_prompts > 6 else "")
        self.summary.value = (
            f"<b>{settings.n_requests:,}</b> requests = "
            f"{n_prompts} {noun}{'' if n_prompts == 1 else 's'}"
            f"{' × ' + html.escape(axes) if axes else ''} × {settings.kwargs['repeats']} repeats; "
            f"at most about <b>{settings.token_estimate:,}</b> tokens "
            f"<small>(prompts counted by {html.escape(settings.estimate_method)})</small>"
            f"<br><small>{noun}{'' if n_prompts == 1 else 's'}: {shown}</small>"
        )

    def _show_error(self, exc: BaseException) -> None:
        self.last_error = exc
        self.error.value = error_html(exc, secrets_of(self._client))

    def _on_click(self, button: widgets.Button) -> None:
        try:
            self.run()
        except Exception as exc:
            self._show_error(exc)

    def run(self) -> SweepResult | None:
        """Run the sweep the controls describe, with a progress bar; plot it with `plots.mean_ci`.

        Errors are shown in the widget and returned as None (kept on `last_error`).
        """
        from .._sweep import sweep

        try:
            settings = self.settings
        except Exception as exc:
            self._show_error(exc)
            self._clear_chart("the settings are invalid")
            return None
        self.error.value = ""
        self.run_button.disabled = True
        self.status.value = f"<i>running {settings.n_requests:,} requests…</i>"
        self.progress.clear_output()
        try:
            with self.progress:
                result = sweep(self._client, progress=True, **settings.kwargs)
        except Exception as exc:
            self.status.value = ""
            self._show_error(exc)
            self._clear_chart("the sweep failed")
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

    def _clear_chart(self, why: str) -> None:
        """No chart of an earlier run under an error: it would read as this one's."""
        if self.plot.outputs:
            self.plot.outputs = ()
            self.status.value = (
                f"<small>chart cleared: {html.escape(why)}; <code>.result</code> still holds "
                "the last run</small>"
            )

    def _on_y(self, change: Any) -> None:
        if self.result is not None and self.last_error is None:
            try:
                self._show_plot()
            except Exception as exc:
                self._show_error(exc)

    def _show_plot(self) -> None:
        from .. import plots
        from ..metrics import per_choice

        if self.result is None:
            return
        axes = [name for name in (box.value for box in self.axis_fields) if name]
        choices = per_choice(self.result.choices, self.result.tokens)
        # A chat sweep's conversations are told apart by their index (the messages column holds
        # whole conversations as JSON: too long for a legend).
        main = "prompt_id" if self.chat else "prompt"
        several_prompts = main in choices.columns and choices[main].nunique(dropna=True) > 1
        kwargs: dict[str, Any] = {"y": self.y.value}
        if axes:
            kwargs["x"] = axes[0]
            rest = axes[1:] + ([main] if several_prompts else [])
        else:
            kwargs["x"] = main
            rest = []
        if rest:
            kwargs["color"] = rest[0]
        if len(rest) > 1:
            kwargs["facet_col"] = rest[1]
        self.plot.outputs = (figure_output(plots.mean_ci(choices, **kwargs)),)

    def __repr__(self) -> str:
        axes = [box.value for box in self.axis_fields if box.value]
        return (
            f"SweepBuilder(endpoint={endpoint_label(self._client)!r}, axes={axes!r}, "
            f"result={'set' if self.result else 'none'})"
        )
