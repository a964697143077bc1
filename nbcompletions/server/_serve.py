"""``nbcompletions serve``: the Completions app over HTTP with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from .._request import Limits
from ._app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, CompletionEngine
from ._batch_store import BatchLimits, BatchStore
from ._create import check_seconds, create_app
from ._malloc import keep_heap_small
from ._scheduler import DEFAULT_MAX_MEMORY_BYTES, WorkBudget

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_HEADER_TIMEOUT_S",
    "DEFAULT_KEEP_ALIVE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_TOKENS_CAP",
    "holds_heap_small",
    "is_loopback",
    "serve",
]

#: Environment variable read for the bearer key when none is passed (keeps it out of `ps` output).
API_KEY_ENV = "NBCOMPLETIONS_API_KEY"
DEFAULT_MAX_TOKENS_CAP = 2048
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: Seconds a connection has to send complete request headers (from opening, or from its first
#: byte after a keep-alive pause), and may sit idle between requests.
DEFAULT_HEADER_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 300.0
#: Open connections; past it the longest-idle one is closed, or (all busy) a 503 with Retry-After.
DEFAULT_MAX_CONNECTIONS = 1000
#: File descriptors kept for everything but connections (model files, batch files, logs).
_FD_HEADROOM = 64

logger = logging.getLogger("nbcompletions.server")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/v1"


def _configure_logging(level: str) -> None:
    from uvicorn.logging import DefaultFormatter

    package_logger = logging.getLogger("nbcompletions")
    # An application that configured logging already gets our records through the root logger.
    if not package_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
        package_logger.addHandler(handler)
    # uvicorn's extra "trace" level is below debug; the standard logging module does not know it.
    package_logger.setLevel(logging.DEBUG if level == "trace" else level.upper())


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    max_tokens_cap: int | None = DEFAULT_MAX_TOKENS_CAP,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    limits: Limits | None = None,
    engine: CompletionEngine | None = None,
    max_concurrency: int = 4,
    budget: WorkBudget | None = None,
    batch_limits: BatchLimits | None = None,
    log_level: str = "info",
    preload: bool = True,
    compat: str = "openai",
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    allow_hosts: Sequence[str] = (),
    allow_origins: Sequence[str] = (),
    **uvicorn_options: Any,
) -> None:
    """Serve the Completions API over HTTP until SIGINT/SIGTERM (uvicorn's clean shutdown).

    Binds loopback unless told otherwise. ``api_key`` (or the ``NBCOMPLETIONS_API_KEY`` environment
    variable) makes every ``/v1`` request need ``Authorization: Bearer <key>``; binding another
    interface without one prints a warning. ``preload`` loads the model before the socket opens, so
    ``/health`` answering means requests are served at full speed. ``budget`` bounds the work of one
    request and the memory of all (`WorkBudget`'s defaults when None); ``batch_limits`` what the
    Batch API may hold and run (`BatchLimits`' defaults when None). Other keyword arguments go to
    ``uvicorn.Config``.

    Safe by default: POST bodies must be declared JSON; requests from web pages (an ``Origin``
    header) are refused unless the origin is loopback or in ``allow_origins``; on a loopback bind
    the ``Host`` must name loopback or be in ``allow_hosts`` (DNS rebinding); a body (an upload
    too) must arrive within ``body_timeout_s``; request headers within ``header_timeout_s``; a
    kept-alive connection idle for ``keep_alive_timeout_s`` is closed; past ``max_connections``
    open connections the longest-idle one is closed (all busy: 503 with ``Retry-After``).
    ``compat="vllm"`` takes vLLM's limits and sampling fields. A ``budget`` below the default
    memory also fixes glibc's mmap threshold (`holds_heap_small`)."""
    import uvicorn

    _check_settings(log_level, port, header_timeout_s, keep_alive_timeout_s, max_connections)
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    _configure_logging(log_level)
    if holds_heap_small(budget):
        keep_heap_small()  # before the model loads: freed scratch then leaves the process
    app = create_app(
        engine,
        api_key=api_key,
        max_tokens_cap=max_tokens_cap,
        max_body_bytes=max_body_bytes,
        limits=limits,
        max_concurrency=max_concurrency,
        budget=budget,
        batch_limits=batch_limits,
        compat=compat,
        body_timeout_s=body_timeout_s,
        # Only a loopback bind knows which names it may be called by; elsewhere any name can
        # reach it (and a key should guard it).
        allowed_hosts=tuple(allow_hosts) if is_loopback(host) else None,
        allowed_origins=tuple(allow_origins),
    )
    if preload:
        app.state.nbcompletions.load_engine_now()  # logs the load time
    _announce(host, port, api_key, compat)
    options = _uvicorn_options(
        keep_alive_timeout_s, max_connections, header_timeout_s, uvicorn_options
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="off", **options
    )
    _run_until_signalled(uvicorn.Server(config), app.state.nbcompletions_batches)


def _uvicorn_options(
    keep_alive_timeout_s: float,
    max_connections: int,
    header_timeout_s: float,
    given: Mapping[str, Any],
) -> dict[str, Any]:
    """uvicorn's settings for `serve`: its connection hygiene, then what the caller gave."""
    from ._connections import guarded_protocol  # uvicorn loads only when serving

    return {
        "timeout_graceful_shutdown": 5,
        "server_header": False,
        "timeout_keep_alive": keep_alive_timeout_s,
        "http": guarded_protocol(_connection_cap(max_connections), header_timeout_s),
        **given,
    }


def _check_settings(
    log_level: str,
    port: int,
    header_timeout_s: float,
    keep_alive_timeout_s: float,
    max_connections: int,
) -> None:
    if log_level not in _LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}; got {log_level!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535; got {port!r}")
    check_seconds("header_timeout_s", header_timeout_s)
    check_seconds("keep_alive_timeout_s", keep_alive_timeout_s)
    if not isinstance(max_connections, int) or isinstance(max_connections, bool):
        raise ValueError(f"max_connections must be an integer >= 1; got {max_connections!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be an integer >= 1; got {max_connections!r}")


def _announce(host: str, port: int, api_key: str | None, compat: str) -> None:
    if not is_loopback(host) and api_key is None:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this address can "
            "use the server. Pass --api-key or set %s.",
            host,
            API_KEY_ENV,
        )
    # The URL, never the key: logs get pasted into issues and notebooks.
    logger.info(
        "nbcompletions serving the OpenAI Completions API at %s (%s%s)%s",
        _url(host, port),
        "bearer key required" if api_key else "no key required",
        "; vLLM compatible" if compat == "vllm" else "",
        "; port 0: uvicorn's line below has the port chosen" if port == 0 else "",
    )


def _connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to what the file-descriptor limit leaves room for (past it,
    accept() fails and asyncio logs an error for every attempt)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - Windows
        return max_connections
    room = soft - _FD_HEADROOM if soft != resource.RLIM_INFINITY else max_connections
    if room < max_connections:
        logger.warning(
            "--max-connections %d lowered to %d: the open-file limit is %d (ulimit -n)",
            max_connections,
            max(room, 1),
            soft,
        )
        return max(room, 1)
    return max_connections


def _run_until_signalled(server: Any, store: BatchStore) -> None:
    """Run uvicorn; remove the batch files however it ends.

    uvicorn shuts down cleanly on SIGTERM and then raises the signal again with the handler that
    was there before it: the default one ended the process at once, skipping every cleanup
    (the batch directory, prompts and outputs, stayed in $TMPDIR). A handler that exits instead
    lets the cleanup run.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_terminated)
    terminated = False
    try:
        server.run()
    except _Terminated:
        terminated = True
    finally:
        store.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if terminated:  # end as SIGTERM ends a process (status -15), now that the files are gone
        signal.raise_signal(signal.SIGTERM)


class _Terminated(BaseException):
    """SIGTERM arrived again after uvicorn's clean shutdown."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def holds_heap_small(budget: WorkBudget | None) -> bool:
    """Whether `serve` fixes glibc's mmap threshold (`keep_heap_small`): for a memory budget set
    below the default. It makes a budget of a few hundred MB hold (freed engine scratch leaves the
    process instead of staying in the heap, ~18 MiB), at a cost in decode speed (each large array
    is mapped afresh: 1.45-1.49 s against 1.54-2.14 s for 20 jobs of n=4, measured side by side),
    which the default budget, with room for glibc's own slack, does not pay."""
    return budget is not None and budget.max_memory_bytes < DEFAULT_MAX_MEMORY_BYTES
