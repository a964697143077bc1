"""The public namespace: what ``nbcompletions`` exports, and what importing it costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbcompletions

EXPECTED = {
    "APIError",
    "AsyncClient",
    "BatchOptions",
    "BudgetError",
    "CacheError",
    "ChatRequest",
    "Cache",
    "Client",
    "Completion",
    "CompletionRequest",
    "Limits",
    "ConformanceError",
    "ConformanceWarning",
    "ConformanceReport",
    "Grid",
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
    "asweep",
    "expand_grid",
    "load_batch_output",
    "load_sweep",
    "metrics",
    "plots",
    "sweep",
    "to_frames",
    "visible_token",
    "widgets",
    # comparing two endpoints, and noticing when one has changed
    "compare",
    "acompare",
    "endpoint_manifest",
    "check_drift",
    "DriftWarning",
}
HEAVY = (
    "pandas",
    "plotly",
    "ipywidgets",
    "starlette",
    "uvicorn",
    "nbcompletions.model",
    "nbcompletions.server",
    "tokenizers",
    "safetensors",
    "torch",
    "openai",
)


def test_all_is_what_it_should_be() -> None:
    assert set(nbcompletions.__all__) == EXPECTED
    assert len(nbcompletions.__all__) == len(EXPECTED)


def test_every_exported_name_resolves() -> None:
    for name in nbcompletions.__all__:
        assert getattr(nbcompletions, name) is not None, name
    assert set(nbcompletions.__all__) <= set(dir(nbcompletions))


def test_exported_classes_come_from_their_modules() -> None:
    from nbcompletions._client import AsyncClient, Client
    from nbcompletions._completion import Completion
    from nbcompletions._streaming import StreamChunk

    assert nbcompletions.Client is Client
    assert nbcompletions.AsyncClient is AsyncClient
    assert nbcompletions.Completion is Completion
    assert nbcompletions.StreamChunk is StreamChunk
    assert issubclass(nbcompletions.RequestError, ValueError)
    assert issubclass(nbcompletions.APIError, nbcompletions.NBCompletionsError)


def _loaded_after(statement: str) -> list[str]:
    code = (
        f"import sys\n{statement}\n"
        f"import json; print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_import_nbcompletions_loads_nothing_heavy() -> None:
    assert _loaded_after("import nbcompletions") == []


def test_importing_the_client_loads_nothing_heavy() -> None:
    # Building a client for a remote server needs httpx only: no pandas until frames are asked for,
    # no model or server unless the embedded model is used.
    statement = (
        "from nbcompletions import AsyncClient, Client, Completion, StreamChunk\n"
        "Client('http://127.0.0.1:9/v1', model='m')"
    )
    assert _loaded_after(statement) == []


def test_version_is_written_once() -> None:
    """pyproject.toml reads the version from nbcompletions/_version.py; the User-Agent uses it."""
    import importlib.metadata

    import nbcompletions
    from nbcompletions import _settings

    assert importlib.metadata.version("nbcompletions") == nbcompletions.__version__
    assert f"nbcompletions/{nbcompletions.__version__}" == _settings.USER_AGENT
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert nbcompletions.__version__ not in pyproject
