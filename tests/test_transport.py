"""The network transport (aiohttp under httpx) against real sockets on 127.0.0.1 that misbehave:
each failure is the httpx error of its meaning, and the client's error says what happened, with no
aiohttp object (which would hold the request's headers, the key among them) chained to it."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port

from nbcompletions import AsyncClient, Client
from nbcompletions._errors import APIError
from nbcompletions._transport import NetworkTransport

KEY = "sk-transport-Secret-0123456789"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.close()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    writer.close()


async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n"
    )
    writer.write(b'{"id": "cmpl-1", "cho')
    await writer.drain()
    writer.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await asyncio.sleep(30)


async def cut_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    chunk = (
        b'data: {"id": "c", "object": "text_completion", "created": 1, "model": "m", '
        b'"choices": [{"text": " a", "index": 0, "logprobs": null, "finish_reason": null}]}\n\n'
    )
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n"
    )
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()  # mid-stream, no closing chunk


class Misbehaving:
    """A TCP server on a thread of its own whose every connection runs ``handler``."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls)
        )
        self.ready.set()
        loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(server.wait_closed())
        loop.close()

    def __enter__(self) -> str:
        self.thread.start()
        self.ready.wait(5)
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]


def _assert_clean(error: BaseException) -> None:
    for link in _chain(error):
        assert not type(link).__module__.startswith("aiohttp"), type(link)
        assert KEY not in str(link)
        request = getattr(link, "_request", None)
        assert request is None or isinstance(request, httpx.Request)


def _complete_error(url: str, **options: object) -> APIError:
    client = Client(url, api_key=KEY, model="m", max_retries=0, **options)  # type: ignore[arg-type]
    with client, pytest.raises(APIError) as raised:
        client.complete("x", max_tokens=1)
    _assert_clean(raised.value)
    return raised.value


def _transport_error(url: str, timeout: float = 5.0) -> httpx.TransportError:
    async def run() -> httpx.TransportError:
        transport = NetworkTransport()
        try:
            async with httpx.AsyncClient(transport=transport, timeout=timeout) as http:
                try:
                    response = await http.post(
                        url + "/completions",
                        json={"prompt": "x"},
                        headers={"Authorization": f"Bearer {KEY}"},
                    )
                except httpx.TransportError as exc:
                    return exc
                raise AssertionError(f"no error: {response.status_code}")
        finally:
            await transport.aclose()

    error = asyncio.run(run())
    _assert_clean(error)
    return error


def test_a_refused_connection_is_a_connect_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    assert type(_transport_error(url)) is httpx.ConnectError
    error = _complete_error(url)
    assert error.type == "connection_error"
    assert "could not reach POST" in str(error)
    assert "ConnectError" in str(error)


@pytest.mark.parametrize(
    ("handler", "kind", "words"),
    [
        (hang_up, httpx.RemoteProtocolError, "ServerDisconnectedError"),
        (garbage, httpx.RemoteProtocolError, "ClientResponseError: invalid HTTP response"),
        (short_body, httpx.RemoteProtocolError, "ClientPayloadError"),
    ],
    ids=["hang-up", "not-http", "short-body"],
)
def test_a_server_that_breaks_the_protocol_is_a_remote_protocol_error(
    handler: Handler, kind: type[httpx.TransportError], words: str
) -> None:
    with Misbehaving(handler) as url:
        assert type(_transport_error(url)) is kind
        error = _complete_error(url)
    assert error.type == "connection_error"
    assert f"RemoteProtocolError: {words}" in str(error), str(error)


def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    with Misbehaving(silent) as url:
        assert type(_transport_error(url, timeout=0.3)) is httpx.ReadTimeout
        error = _complete_error(url, timeout=0.3)
    assert error.type == "timeout"
    assert "timed out (ReadTimeout" in str(error)


def test_a_stream_cut_after_data_is_a_broken_stream_not_retried() -> None:
    server = Misbehaving(cut_stream)
    with server as url:
        client = Client(url, api_key=KEY, model="m", max_retries=3)
        with pytest.raises(APIError) as raised:
            for _ in client.stream("x", max_tokens=5):
                pass
        client.close()
    assert raised.value.type == "stream_broken"
    assert "RemoteProtocolError: ClientPayloadError" in str(raised.value)
    assert server.connections == 1  # data had arrived: not retried
    _assert_clean(raised.value)


def test_each_event_loop_gets_a_pool_of_its_own() -> None:
    """Each event loop has a session of its own (aiohttp's is bound to the loop it was made on):
    a second ``asyncio.run`` gets the client's error, not aiohttp's "Event loop is closed"."""

    async def one(client: AsyncClient) -> type[BaseException] | None:
        try:
            await client.complete("x", max_tokens=1)
        except APIError as exc:
            return type(exc)
        return None

    url = f"http://127.0.0.1:{free_port()}/v1"
    client = AsyncClient(url, api_key=KEY, model="m", max_retries=0)
    assert asyncio.run(one(client)) is APIError
    assert asyncio.run(one(client)) is APIError  # a new loop: a new session, not the closed one


def test_a_client_dropped_unclosed_goes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """httpx says nothing when a client is dropped without close(); nor does its aiohttp pool
    ("Unclosed client session" is an ERROR log line in a notebook), on a loop that still runs
    (the sync client's) or one that has ended (``asyncio.run``)."""
    import gc
    import warnings

    with Misbehaving(_answer) as url, warnings.catch_warnings():
        warnings.simplefilter("error")
        client = Client(url, api_key=KEY, model="m")
        assert client.complete("x", max_tokens=1).text == "ok"
        del client

        async def run() -> None:
            aclient = AsyncClient(url, api_key=KEY, model="m")
            assert (await aclient.complete("x", max_tokens=1)).text == "ok"

        asyncio.run(run())
        gc.collect()
        time.sleep(0.2)  # the running loop closes the first client's connections
        gc.collect()
    assert not [r for r in caplog.records if "nclosed" in r.getMessage()]


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    body = (
        b'{"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": '
        b'[{"text": "ok", "index": 0, "logprobs": null, "finish_reason": "stop"}]}'
    )
    while True:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        await writer.drain()


async def _gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    import gzip

    head = await _read_request(reader)
    assert b"gzip" in head.lower()  # httpx asks for it; aiohttp leaves the header as httpx set it
    body = gzip.compress(
        b'{"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": '
        b'[{"text": "zipped", "index": 0, "logprobs": null, "finish_reason": "stop"}]}'
    )
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()


def test_a_compressed_answer_is_decoded_once() -> None:
    """aiohttp hands the bytes over as they came (auto_decompress off); httpx decodes them."""
    with Misbehaving(_gzipped) as url, Client(url, api_key=KEY, model="m") as client:
        assert client.complete("x", max_tokens=1).text == "zipped"


def test_https_verifies_the_server_against_the_trusted_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS through aiohttp with httpx's SSL context: a certificate nobody vouches for is a
    ConnectError that says so; trusted through SSL_CERT_FILE (as httpx reads it), it answers."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate for 127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    names = "-subj /CN=local -addext subjectAltName=IP:127.0.0.1"
    subprocess.run(
        [*command.split(), *names.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with Misbehaving(_answer, tls=tls) as url:
        assert url.startswith("https://")
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # certifi's roots: not ours
        error = _complete_error(url)
        assert error.type == "connection_error"
        assert "ConnectError: ClientConnectorCertificateError" in str(error)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with Client(url, api_key=KEY, model="m", max_retries=0) as client:
            assert client.complete("x", max_tokens=1).text == "ok"
