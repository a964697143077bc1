"""A chat's messages as widgets: one row per message (role dropdown, content box, remove button)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as widgets

from .._chat import check_messages

#: Roles offered in the dropdown, in Chat Completions' order.
ROLES = ("system", "developer", "user", "assistant")


class MessageRow(widgets.HBox):  # type: ignore[misc, unused-ignore]  # ipywidgets: untyped
    """One message: ``role`` (Dropdown), ``content`` (Textarea), ``remove`` (Button)."""

    def __init__(self, role: str, content: str) -> None:
        self.role = widgets.Dropdown(
            options=ROLES, value=role, layout=widgets.Layout(width="8.5em")
        )
        self.content = widgets.Textarea(
            value=content,
            placeholder=f"{role} message",
            layout=widgets.Layout(flex="1 1 auto", width="auto", height="3.2em"),
        )
        self.remove = widgets.Button(
            icon="trash", tooltip="remove this message", layout=widgets.Layout(width="3em")
        )
        super().__init__(
            [self.role, self.content, self.remove], layout=widgets.Layout(width="100%")
        )
        self.add_class("nbc-message")


class MessagesEditor(widgets.VBox):  # type: ignore[misc, unused-ignore]  # ipywidgets: untyped
    """Rows of messages and an "add message" button.

    `messages` is the list of ``{"role", "content"}`` dicts the rows hold (in order); setting it
    replaces the rows. ``on_change(callback)`` calls ``callback()`` after any edit, addition or
    removal. A new row's role follows the last one's (user after assistant, assistant after user).
    """

    def __init__(self, messages: Sequence[Mapping[str, Any]] | None = None) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self.rows: list[MessageRow] = []
        self.add_button = widgets.Button(description="add message", icon="plus")
        self.add_button.on_click(lambda _: self.add())
        super().__init__([self.add_button], layout=widgets.Layout(width="100%"))
        self.add_class("nbc-messages")
        self.messages = list(messages or [{"role": "user", "content": ""}])

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [{"role": row.role.value, "content": row.content.value} for row in self.rows]

    @messages.setter
    def messages(self, messages: Sequence[Mapping[str, Any]]) -> None:
        check_messages(list(messages))
        self.rows = []
        for message in messages:
            self._new_row(str(message["role"]), str(message["content"]))
        self._refresh()

    def add(self, role: str | None = None, content: str = "") -> MessageRow:
        """Append a row (by default a user turn after an assistant one, else an assistant turn)."""
        if role is None:
            last = self.rows[-1].role.value if self.rows else "assistant"
            role = "assistant" if last == "user" else "user"
        row = self._new_row(role, content)
        self._refresh()
        return row

    def remove(self, row: MessageRow) -> None:
        self.rows = [r for r in self.rows if r is not row]
        self._refresh()

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _new_row(self, role: str, content: str) -> MessageRow:
        row = MessageRow(role, content)
        row.remove.on_click(lambda _: self.remove(row))
        for control in (row.role, row.content):
            control.observe(lambda _: self._changed(), names=["value"])
        self.rows.append(row)
        return row

    def _refresh(self) -> None:
        self.children = [*self.rows, self.add_button]
        self._changed()

    def _changed(self) -> None:
        for callback in self._callbacks:
            callback()
