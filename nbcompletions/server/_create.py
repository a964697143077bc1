"""`create_app`: the ASGI app, assembled from the completions routes (`_app`), the Batch API
(`_batches`), the request guard (`_guard`) and the scheduler's budget (`_scheduler`).

It lives apart from `_app` so that the Batch API can build on `_app`'s request handling without
`_app` importing it back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from .._request import Limits
from .._secrets import check_api_key
from ._app import (
    COMPAT_MODES,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    CompletionEngine,
    CompletionsServer,
)
from ._batches import BatchLimits, BatchStore, batch_routes
from ._guard import RequestGuard
from ._http import http_error
from ._scheduler import WorkBudget

__all__ = ["check_seconds", "create_app"]


def _check_positive(name: str, value: Any, *, optional: bool) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"{name} must be an integer >= 1{' or None' if optional else ''}; got {value!r}"
        )


def check_seconds(name: str, value: Any) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number of seconds > 0."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a number of seconds > 0; got {value!r}")


def create_app(
    engine: CompletionEngine | None = None,
    *,
    api_key: str | None = None,
    max_tokens_cap: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    limits: Limits | None = None,
    max_concurrency: int = 4,
    budget: WorkBudget | None = None,
    compat: str = "openai",
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    allowed_hosts: Sequence[str] | None = None,
    allowed_origins: Sequence[str] = (),
    batch_limits: BatchLimits | None = None,
) -> Starlette:
    """The OpenAI-compatible Completions app (an ASGI app).

    Routes: ``POST /v1/completions`` (JSON, or server-sent events with ``stream``),
    ``POST /v1/chat/completions`` (the same completion of the model's chat template, in Chat's
    shapes; see ``nbcompletions.server._chat``), ``POST /v1/responses`` (the same, as a Responses
    ``response``, or its events with ``stream``), ``POST /tokenize`` and ``POST /detokenize``
    (vLLM's, in every mode; see ``nbcompletions.server._tokenize``),
    ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, and the Batch API
    (``/v1/files``, ``/v1/batches``; see ``nbcompletions.server._batches``).

    Args:
        engine: the model engine; by default the embedded model, loaded on the first request.
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        max_tokens_cap: largest ``max_tokens`` accepted (400 above it); None: only the model's
            context limits it.
        max_body_bytes: largest request body accepted (413 above it).
        limits: request caps (logprobs, n, best_of, stop); by default those of ``compat``.
        max_concurrency: for an engine without ``job()`` (only ``complete`` and ``stream``):
            engine calls run at once per event loop. The embedded engine batches every request
            instead (see ``nbcompletions.server._scheduler``).
        budget: the work budget (per-request tokens, the memory all requests may hold, how many
            may wait for it); `WorkBudget`'s defaults when None.
        compat: ``"openai"`` (OpenAI's caps; unknown fields refused) or ``"vllm"`` (vLLM's caps:
            20 logprobs, any number of stop strings, its sampling fields ``top_k``,
            ``min_p``, ``repetition_penalty``, and ``prompt_logprobs`` on completions and chat).
        body_timeout_s: seconds a client has to send its request body (408 after).
        allowed_hosts: None: any ``Host``. Otherwise only loopback names and these (``*``: any);
            ``serve`` sets it for a loopback bind (a defence against DNS rebinding).
        allowed_origins: requests with an ``Origin`` header (web pages) are refused (403) unless
            it is a loopback origin or one of these (``*``: any).
        batch_limits: what the Batch API (``/v1/files``, ``/v1/batches``) may hold and run at
            once; `BatchLimits`' defaults when None.
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if api_key is not None:
        check_api_key(api_key)
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {', '.join(COMPAT_MODES)}; got {compat!r}")
    check_seconds("body_timeout_s", body_timeout_s)
    if limits is None:
        limits = Limits.vllm() if compat == "vllm" else Limits()
    _check_positive("max_tokens_cap", max_tokens_cap, optional=True)
    _check_positive("max_body_bytes", max_body_bytes, optional=False)
    _check_positive("max_concurrency", max_concurrency, optional=False)
    server = CompletionsServer(
        engine,
        api_key=api_key,
        max_tokens_cap=max_tokens_cap,
        max_body_bytes=max_body_bytes,
        limits=limits,
        max_concurrency=max_concurrency,
        budget=budget or WorkBudget(),
        body_timeout_s=float(body_timeout_s),
        compat=compat,
    )
    store = BatchStore(server, batch_limits or BatchLimits())
    return _assemble(server, store, allowed_hosts, tuple(allowed_origins))


def _assemble(
    server: CompletionsServer,
    store: BatchStore,
    allowed_hosts: Sequence[str] | None,
    allowed_origins: tuple[str, ...],
) -> Starlette:
    routes = [
        Route("/v1/completions", server.endpoint(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", server.endpoint(server.chat_completions), methods=["POST"]),
        Route(
            "/v1/chat/completions/render",
            server.endpoint(server.render_chat_ids),
            methods=["POST"],
        ),
        Route("/v1/responses", server.endpoint(server.responses), methods=["POST"]),
        Route("/tokenize", server.endpoint(server.tokenize_text), methods=["POST"]),
        Route("/detokenize", server.endpoint(server.detokenize_ids), methods=["POST"]),
        Route("/v1/models", server.endpoint(server.models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.endpoint(server.model), methods=["GET"]),
        Route("/health", server.endpoint(server.health, auth=False), methods=["GET"]),
    ]
    routes.extend(batch_routes(server, store))
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(RequestGuard, hosts=allowed_hosts, origins=allowed_origins)],
    )
    # Starlette would answer "POST /v1/completions/" with a 307 to the slashless URL before any
    # key check (and clients do not re-POST on 307 uniformly): unknown paths are 404s instead.
    app.router.redirect_slashes = False
    app.state.nbcompletions = server
    app.state.nbcompletions_auth = server.auth
    app.state.nbcompletions_batches = store
    return app
