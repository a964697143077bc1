"""Jupyter widgets (ipywidgets 8): a completion playground and a sweep builder.

Each widget is synced control state plus a pure function from that state to a request:
`Playground.request` is the `CompletionRequest` the controls describe and `SweepBuilder.settings`
the sweep they describe. Nothing is sent until ``run()`` (or the Run button). Every error, whether
an invalid setting or a server's answer, is shown inside the widget. The client, and with it any API
key, is kept as a plain Python attribute and never in a synced trait, so it never reaches the
browser or the saved notebook.
"""

try:
    import ipywidgets  # noqa: F401  (the widgets extra)
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "nbcompletions.widgets needs ipywidgets, the widgets extra: "
        "pip install 'nbcompletions[widgets]' (or '[notebooks]', which includes it)"
    ) from error

from ._controls import (
    PROMPT_SEPARATOR,
    SWEEP_FIELDS,
    SWEEP_METRICS,
    join_prompts,
    parse_logit_bias,
    parse_stop,
    parse_values,
    playground_request,
    split_prompts,
)
from ._display import FRAME_ROWS
from ._playground import MAX_HIGHLIGHTED, Playground
from ._sweep_builder import SweepBuilder, SweepSettings, conversations_text, parse_conversations

__all__ = [
    "FRAME_ROWS",
    "MAX_HIGHLIGHTED",
    "PROMPT_SEPARATOR",
    "SWEEP_FIELDS",
    "SWEEP_METRICS",
    "Playground",
    "SweepBuilder",
    "SweepSettings",
    "conversations_text",
    "join_prompts",
    "parse_conversations",
    "parse_logit_bias",
    "parse_stop",
    "parse_values",
    "playground_request",
    "split_prompts",
]
