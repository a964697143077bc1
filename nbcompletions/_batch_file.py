"""The OpenAI Batch input file: one JSON line per request, split to fit a batch's limits.

Pure and below the grid: `Grid.to_batch_file` writes itself with these, and `_batch` (which runs
batches) uses the same lines, so a file written offline and a batch sent by a sweep agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from ._chat import ChatRequest
from ._errors import RequestError
from ._request import CompletionRequest

__all__ = [
    "BATCH_URL",
    "CHAT_BATCH_URL",
    "OPENAI_MAX_BATCH_BYTES",
    "OPENAI_MAX_BATCH_REQUESTS",
    "batch_lines",
    "batch_url",
    "check_batch_limits",
    "split_batches",
]

#: OpenAI's limits on one Batch input file.
OPENAI_MAX_BATCH_REQUESTS = 50_000
OPENAI_MAX_BATCH_BYTES = 200 * 1000 * 1000
#: The endpoint every line of a completions grid targets.
BATCH_URL = "/v1/completions"
#: The endpoint of a chat grid's lines (``messages=`` sweeps; vLLM's run_batch takes only these).
CHAT_BATCH_URL = "/v1/chat/completions"


def batch_url(request: CompletionRequest | ChatRequest) -> str:
    """The Batch line ``url`` of ``request``: `CHAT_BATCH_URL` for a chat request."""
    return CHAT_BATCH_URL if isinstance(request, ChatRequest) else BATCH_URL


def check_batch_limits(max_requests: Any, max_bytes: Any) -> None:
    """Both limits of one input file must be integers >= 1 (a RequestError naming the field)."""
    for name, value in (("max_requests", max_requests), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(
                name,
                f"{name} must be an integer >= 1; got {value!r}",
                allowed="an integer >= 1",
                value=value,
            )


class BatchPoint(Protocol):
    """What a Batch line is made of: a grid point's cache key (its custom_id) and its request."""

    @property
    def key(self) -> str: ...

    @property
    def request(self) -> CompletionRequest | ChatRequest: ...


def _body(request: Any, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = request.to_body()
    # A batch answers once, as a whole response: streaming does not apply.
    body.pop("stream", None)
    body.pop("stream_options", None)
    if body.get("model") is None:
        if model is None:
            raise RequestError(
                "model",
                "every line of a Batch file names its model; give Client(model=...) or "
                "model=... to the sweep",
                allowed="a model name",
                value=None,
            )
        body["model"] = model
    return body


def batch_lines(points: Iterable[BatchPoint], model: str | None = None) -> list[tuple[str, bytes]]:
    """``(custom_id, line)`` for each point: one Batch input line (UTF-8 JSON and a newline)."""
    lines = []
    for point in points:
        line = {
            "custom_id": point.key,
            "method": "POST",
            "url": batch_url(point.request),
            "body": _body(point.request, model),
        }
        text = json.dumps(line, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        lines.append((point.key, (text + "\n").encode("utf-8")))
    return lines


def split_batches(
    lines: list[tuple[str, bytes]], max_requests: int, max_bytes: int
) -> list[list[tuple[str, bytes]]]:
    """Consecutive groups of ``lines`` within both limits (one input file, one batch each)."""
    groups: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for custom_id, line in lines:
        if len(line) > max_bytes:
            raise RequestError(
                "max_bytes",
                f"the request {custom_id} alone is {len(line)} bytes as a Batch line, more than "
                f"max_bytes={max_bytes}; raise max_bytes or shorten the prompt",
                allowed=f">= {len(line)}",
                value=max_bytes,
            )
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            groups.append(current)
            current, size = [], 0
        current.append((custom_id, line))
        size += len(line)
    if current:
        groups.append(current)
    return groups
