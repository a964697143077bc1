"""nbcompletions: the Completions endpoint as a research instrument in Jupyter.

Everything public is importable from here. Heavy parts (pandas frames, plotly plots, ipywidgets
widgets, the embedded model and server) load on first use, never at ``import nbcompletions``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._chat import ChatRequest, ResponsesRequest
from ._errors import (
    APIError,
    BudgetError,
    CacheError,
    ConformanceError,
    ConformanceWarning,
    NBCompletionsError,
    RequestError,
    SweepError,
    SweepWarning,
)
from ._request import CompletionRequest, Limits
from ._version import __version__

# name -> module that defines it; resolved lazily by __getattr__ below.
_LAZY: dict[str, str] = {
    "Client": "._client",
    "AsyncClient": "._client",
    "Completion": "._completion",
    "StreamChunk": "._streaming",
    "to_frames": "._frames",
    "sweep": "._sweep",
    "asweep": "._sweep",
    "SweepInterrupted": "._sweep",
    "SweepResult": "._sweep_result",
    "load_sweep": "._sweep_result",
    "BatchOptions": "._batch",
    "load_batch_output": "._batch",
    "Grid": "._grid",
    "expand_grid": "._grid",
    "Cache": "._cache",
    "ConformanceReport": "._conformance",
    "ServerProfile": "._profiles",
    "ReplyScore": "._reply_scoring",
    "visible_token": "._visible",
    "compare": "._compare",
    "acompare": "._compare",
    "DriftWarning": "._manifest",
    "check_drift": "._manifest",
    "endpoint_manifest": "._manifest",
}
_SUBMODULES = ("metrics", "plots", "widgets", "server", "model")

__all__ = [
    "APIError",
    "AsyncClient",
    "BatchOptions",
    "BudgetError",
    "Cache",
    "CacheError",
    "ChatRequest",
    "Client",
    "Completion",
    "CompletionRequest",
    "ConformanceError",
    "ConformanceReport",
    "ConformanceWarning",
    "DriftWarning",
    "Grid",
    "Limits",
    "NBCompletionsError",
    "ReplyScore",
    "RequestError",
    "ResponsesRequest",
    "ServerProfile",
    "StreamChunk",
    "SweepError",
    "SweepInterrupted",
    "SweepResult",
    "SweepWarning",
    "__version__",
    "acompare",
    "asweep",
    "check_drift",
    "compare",
    "endpoint_manifest",
    "expand_grid",
    "load_batch_output",
    "load_sweep",
    "metrics",
    "plots",
    "sweep",
    "to_frames",
    "visible_token",
    "widgets",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import metrics, plots, widgets
    from ._batch import BatchOptions, load_batch_output
    from ._cache import Cache
    from ._client import AsyncClient, Client
    from ._compare import acompare, compare
    from ._completion import Completion
    from ._conformance import ConformanceReport
    from ._frames import to_frames
    from ._grid import Grid, expand_grid
    from ._manifest import DriftWarning, check_drift, endpoint_manifest
    from ._profiles import ServerProfile
    from ._reply_scoring import ReplyScore
    from ._streaming import StreamChunk
    from ._sweep import SweepInterrupted, asweep, sweep
    from ._sweep_result import SweepResult, load_sweep
    from ._visible import visible_token


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'nbcompletions' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
