"""The ``nbcompletions`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main"]

_SERVE_EPILOG = """\
examples:
  nbcompletions serve                      # http://127.0.0.1:8000/v1, no key
  NBCOMPLETIONS_API_KEY=secret nbcompletions serve --host 0.0.0.0

then, from Python:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.completions.create(model="nbc-shakespeare", prompt="To be", max_tokens=16, logprobs=5)
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to 65535; got {text!r}"
        ) from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 65535; got {value}")
    return value


def _api_key(text: str) -> str:
    # "--api-key $KEY" with KEY unset would otherwise fail deep in the server with a traceback;
    # the server strips the bearer token it receives, so surrounding spaces could never match.
    from ._errors import RequestError
    from ._secrets import check_api_key

    key = text.strip()
    if not key:
        raise argparse.ArgumentTypeError(f"must be a non-empty string; got {text!r}")
    try:
        check_api_key(key)  # a non-ASCII key could never authenticate anyone
    except RequestError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("api_key ")) from None
    return key


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0; got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0; got {text}")
    return value


#: The serve options that bound something: (flag, metavar, type, help). The defaults are written
#: out so --help needs no server import; tests/test_cli.py checks they are the server's own.
_SERVE_LIMITS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--max-tokens-cap", "N", _positive_int, "reject requests asking for more than N tokens "
     "(default: 2048)"),
    ("--max-body-bytes", "N", _positive_int, "reject request bodies larger than N bytes with 413 "
     "(default: 1000000); a Batch input line is held to it too"),
    ("--max-request-tokens", "N", _positive_int, "work budget per request: reject (400) a "
     "request whose prompts x max(n, best_of) x (prompt + max_tokens) tokens exceed N "
     "(default: 16384)"),
    ("--max-memory-mb", "MB", _positive_int, "memory all running requests may hold, above the "
     "process's ~200 MB (key/value cache, logits, one step's scratch); more requests wait, and "
     "one needing more alone is rejected with 400 (default: 1024)"),
    ("--max-waiting", "N", _positive_int, "requests that may wait for memory; beyond them: 503 "
     "with Retry-After (default: 256)"),
    ("--body-timeout", "SECONDS", _seconds, "answer 408 when a request body (an upload too) has "
     "not fully arrived after SECONDS (default: 30)"),
    ("--header-timeout", "SECONDS", _seconds, "close a connection that has not sent complete "
     "request headers SECONDS after opening, or after its first byte following a keep-alive "
     "pause (default: 30)"),
    ("--keep-alive-timeout", "SECONDS", _seconds, "close a kept-alive connection idle for "
     "SECONDS between requests (default: 300)"),
    ("--max-connections", "N", _positive_int, "open connections at most; past it the "
     "longest-idle one is closed, or, all busy, the new one gets 503 with Retry-After "
     "(default: 1000, lowered to what ulimit -n allows)"),
    # The Batch API's limits (BatchLimits).
    ("--max-batch-file-bytes", "N", _positive_int, "largest Batch input file (POST /v1/files); "
     "bigger uploads get 413 (default: 200000000, OpenAI's 200 MB; written to disk as it "
     "arrives)"),
    ("--max-batch-file-requests", "N", _positive_int, "most requests (lines) in one Batch input "
     "file; more get 400 (default: 50000, OpenAI's limit)"),
    ("--max-batch-stored-bytes", "N", _positive_int, "Batch files, inputs and outputs together, "
     "never pass N bytes: an upload that would is refused (400 storage_limit_exceeded) and a "
     "batch whose output would ends failed; DELETE /v1/files/{id} frees room (default: "
     "2000000000)"),
    ("--max-batch-lines-in-flight", "N", _positive_int, "Batch lines waiting in the scheduler at "
     "once, all batches together, so live requests still get their turn (default: 64)"),
    ("--batch-window", "SECONDS", _seconds, "how long a batch may run before it expires (its "
     "unfinished lines fail with batch_expired); clients still ask for OpenAI's '24h' "
     "(default: 86400)"),
)  # fmt: skip
#: serve() keyword arguments set by a flag only when given (serve's defaults stay the source).
_SERVE_OPTIONS = {
    "body_timeout": "body_timeout_s",
    "header_timeout": "header_timeout_s",
    "keep_alive_timeout": "keep_alive_timeout_s",
    "max_connections": "max_connections",
}
_BATCH_LIMITS = {
    "max_batch_file_bytes": "max_file_bytes",
    "max_batch_file_requests": "max_file_requests",
    "max_batch_stored_bytes": "max_stored_bytes",
    "max_batch_lines_in_flight": "max_lines_in_flight",
    "batch_window": "completion_window_s",
}


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the embedded model over HTTP (POST /v1/completions, GET /v1/models)",
        description="Serve the embedded model with an OpenAI-compatible Completions API\n"
        "(POST /v1/completions with streaming, GET /v1/models, GET /health)\n"
        "until Ctrl-C or SIGTERM.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default: %(default)s, this machine only; binding "
        "another interface without a key prints a warning)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="TCP port (default: %(default)s; 0 picks a free one)",
    )
    serve.add_argument(
        "--api-key",
        metavar="KEY",
        type=_api_key,
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 requests (default: the "
        "NBCOMPLETIONS_API_KEY environment variable, which keeps the key out "
        "of the process list; unset: no key)",
    )
    for flag, metavar, kind, text in _SERVE_LIMITS:
        serve.add_argument(flag, metavar=metavar, type=kind, default=None, help=text)
    serve.add_argument(
        "--compat",
        choices=["openai", "vllm"],
        default="openai",
        help="openai (default): OpenAI's limits (4 stop strings, 5 logprobs) and unknown fields "
        "refused; vllm: vLLM's limits (any number of stop strings, 20 logprobs) and its sampling "
        "fields top_k, min_p and repetition_penalty",
    )
    serve.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        default=[],
        help="on a loopback bind, also answer requests whose Host header names NAME (default: "
        "only localhost, 127.0.0.1 and ::1, against DNS rebinding); repeatable; '*' for any",
    )
    serve.add_argument(
        "--allow-origin",
        metavar="ORIGIN",
        action="append",
        default=[],
        help="also answer web pages from ORIGIN (scheme://host[:port]); by default requests "
        "carrying an Origin header are refused unless it is a loopback origin; repeatable; "
        "'*' for any",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (default: %(default)s)",
    )
    serve.add_argument(
        "--no-access-log", action="store_true", help="do not log one line per request"
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nbcompletions",
        description="nbcompletions: the OpenAI Completions endpoint as a research instrument. "
        "This command runs the embedded model (nbc-shakespeare, offline, no key) "
        "behind an OpenAI-compatible server.",
        epilog="Run 'nbcompletions serve --help' for the server's options. In Python, "
        "nbcompletions.Client() uses the same model in-process, with no server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_serve(commands)
    batch = commands.add_parser(
        "batch",
        help="run an OpenAI Batch input file (JSONL) on the embedded model, offline",
        description="Run an OpenAI Batch input file on the embedded model, in-process: one "
        'request per line, {"custom_id": ..., "method": "POST", "url": "/v1/completions", '
        '"body": {...}}, or every line with "url": "/v1/chat/completions" and a chat body '
        '({"messages": [...], ...}). Writes the output file (one line per answered request, '
        "any order; join on custom_id) and, when a request failed, the error file.",
    )
    batch.add_argument("-i", "--input", required=True, metavar="FILE", help="the Batch input file")
    batch.add_argument("-o", "--output", required=True, metavar="FILE", help="the output file")
    batch.add_argument(
        "-e",
        "--errors",
        metavar="FILE",
        default=None,
        help="the error file (default: next to the output, <name>-errors<suffix>)",
    )
    batch.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def _run_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._batch import arun_batch_file
    from ._client import Client
    from ._errors import NBCompletionsError
    from ._loop import run_sync

    source, output = Path(args.input), Path(args.output)
    errors = (
        Path(args.errors)
        if args.errors
        else output.with_name(f"{output.stem}-errors{output.suffix or '.jsonl'}")
    )
    if not source.is_file():
        print(f"nbcompletions batch: no input file {str(source)!r}", file=sys.stderr)
        return 2
    try:
        with Client(max_retries=0) as client:
            card, output_data, error_data = run_sync(
                arun_batch_file(
                    client.async_client,
                    source.read_bytes(),
                    source.name,
                    poll_interval=0.05,
                    progress=not args.quiet,
                )
            )
    except NBCompletionsError as exc:  # the file was refused (a bad line) or the model is missing
        print(f"nbcompletions batch: {exc}", file=sys.stderr)
        return 1
    output.write_bytes(output_data or b"")  # a run always leaves its output file
    if error_data:
        errors.write_bytes(error_data)
    counts = card.get("request_counts") or {}
    if card.get("status") != "completed":
        problems = (card.get("errors") or {}).get("data") or []
        detail = "; ".join(f"line {p.get('line')}: {p.get('message')}" for p in problems)
        print(f"nbcompletions batch: the batch {card.get('status')}: {detail}", file=sys.stderr)
        return 1
    if not args.quiet:
        where = f" -> {output}" + (f", errors -> {errors}" if card.get("error_file_id") else "")
        print(
            f"{counts.get('total', 0)} requests: {counts.get('completed', 0)} completed, "
            f"{counts.get('failed', 0)} failed{where}",
            file=sys.stderr,
        )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from . import server

    defaults = server.WorkBudget()
    budget = server.WorkBudget(
        max_request_tokens=args.max_request_tokens or defaults.max_request_tokens,
        max_memory_bytes=(args.max_memory_mb << 20)
        if args.max_memory_mb
        else defaults.max_memory_bytes,
        max_waiting=args.max_waiting or defaults.max_waiting,
    )
    # Only what was given: serve()'s own defaults stay the single source of truth.
    options: dict[str, Any] = {
        keyword: getattr(args, name)
        for name, keyword in _SERVE_OPTIONS.items()
        if getattr(args, name) is not None
    }
    if args.compat != "openai":
        options["compat"] = args.compat
    if args.allow_host:
        options["allow_hosts"] = args.allow_host
    if args.allow_origin:
        options["allow_origins"] = args.allow_origin
    batch_limits = {
        field: getattr(args, name)
        for name, field in _BATCH_LIMITS.items()
        if getattr(args, name) is not None
    }
    if batch_limits:
        options["batch_limits"] = server.BatchLimits(**batch_limits)
    try:
        server.serve(
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_tokens_cap=args.max_tokens_cap or server.DEFAULT_MAX_TOKENS_CAP,
            max_body_bytes=args.max_body_bytes or server.DEFAULT_MAX_BODY_BYTES,
            log_level=args.log_level,
            budget=budget,
            access_log=not args.no_access_log,
            **options,
        )
    except FileNotFoundError as exc:  # the model's files (serve loads them before binding)
        print(f"nbcompletions serve: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a setting serve() refuses, e.g. a key from the environment
        print(f"nbcompletions serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises the signal; a traceback
        # after a clean shutdown would only alarm. 130 is the shell's code for SIGINT.
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "batch":
        return _run_batch(args)
    # argparse rejects unknown commands before this point.
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
