"""The embedded OpenAI-compatible Completions server.

`create_app()` builds the ASGI app (Starlette); the client runs it in-process through an httpx
transport when nothing else is configured (`StreamingASGITransport` delivers streams incrementally;
httpx's ``ASGITransport`` buffers each response whole). `serve()` (``nbcompletions serve``) runs it
over HTTP with uvicorn. Neither loads the model until it is needed.
"""

from __future__ import annotations

from ._app import COMPAT_MODES, DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, CompletionEngine
from ._batches import BatchLimits
from ._create import create_app
from ._http import render_json
from ._scheduler import WorkBudget
from ._serve import API_KEY_ENV, DEFAULT_MAX_TOKENS_CAP, serve
from ._transport import StreamingASGITransport

__all__ = [
    "API_KEY_ENV",
    "COMPAT_MODES",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_TOKENS_CAP",
    "BatchLimits",
    "CompletionEngine",
    "StreamingASGITransport",
    "WorkBudget",
    "create_app",
    "render_json",
    "serve",
]
