"""The HTTP libraries' own log records (httpx's, aiohttp's under the network transport, httpcore's
under httpx's transport) never show the API key, even when a hostile server echoes it in a
response header and logging is at DEBUG (as people turn it on to debug a connection)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from nbcompletions import Client
from nbcompletions._secrets import HTTP_LOGGERS, LOG_REDACTION, Secret

KEY = "sk-proj_L0gg+K/ey=Z9q"
COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [{"text": " or", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class _Echo(BaseHTTPRequestHandler):
    """Answers every POST, echoing the Authorization header it got (and the key in the body of
    a 401 when the path says so)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        auth = self.headers.get("authorization", "")
        body = json.dumps(COMPLETION).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-echo-authorization", auth)
        self.send_header("x-echo-key", auth.removeprefix("Bearer "))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hostile_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("transport", ["network", "httpcore"])
def test_the_key_a_server_echoes_in_a_header_stays_out_of_the_http_debug_log(
    hostile_server: str, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """The client's own transport (aiohttp) and httpx's (httpcore, which logs every header at
    DEBUG, and which a client given ``transport=httpx.AsyncHTTPTransport()`` uses)."""
    caplog.set_level(logging.DEBUG)
    given = httpx.AsyncHTTPTransport() if transport == "httpcore" else None
    with Client(hostile_server, api_key=KEY, model="m", max_retries=0, transport=given) as client:
        completion = client.complete("To be", max_tokens=1)
    assert completion is not None
    records = [
        r for r in caplog.records if r.name.split(".")[0] in ("httpx", "httpcore", "aiohttp")
    ]
    assert any("HTTP Request: POST" in r.getMessage() for r in records), "nothing was logged"
    for record in records:
        assert KEY not in record.getMessage(), record.name
        assert KEY not in logging.Formatter().format(record)
    if transport == "httpcore":
        headers_logged = [r for r in records if "x-echo-key" in r.getMessage()]
        assert headers_logged, "httpcore logged no response headers: nothing was tested"
        assert "***" in headers_logged[0].getMessage()


def test_the_filter_masks_only_live_secrets_and_spares_other_records() -> None:
    record = logging.LogRecord(
        "httpcore.http11", logging.DEBUG, __file__, 1, "got %s", ("x",), None
    )
    secret = Secret("sk-only-while-alive")
    masked = logging.LogRecord(
        "httpcore.http11",
        logging.DEBUG,
        __file__,
        1,
        "hdr %r",
        (b"Bearer sk-only-while-alive",),
        None,
    )
    assert LOG_REDACTION.filter(masked)
    assert masked.getMessage() == "hdr b'Bearer ***'"
    assert LOG_REDACTION.filter(record)
    assert record.args == ("x",)  # untouched
    del secret
    later = logging.LogRecord("httpx", logging.INFO, __file__, 1, "sk-only-while-alive", None, None)
    LOG_REDACTION.filter(later)
    assert later.getMessage() == "sk-only-while-alive"  # no client holds it any more
    assert all(LOG_REDACTION in logging.getLogger(name).filters for name in HTTP_LOGGERS)
    headers = Secret({"x-api-key": "sk-from-a-header", "accept": "application/json"})
    assert LOG_REDACTION.secrets().count("sk-from-a-header") == 1
    assert "application/json" not in LOG_REDACTION.secrets()
    del headers
