"""A server that echoes the API key, in every form we know of, must not get it anywhere we show or
write: the exception (str, repr, body, headers), the sweep's error column, its Parquet files, the
cache file. The servers are httpx.MockTransport handlers (fault injection); the rest is real."""

from __future__ import annotations

import json
import sqlite3
import unicodedata
import urllib.parse
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from helpers import mock_client

from nbcompletions import APIError, SweepError, SweepWarning, sweep
from nbcompletions._secrets import redact_error, redact_text

KEY = "sk-proj_T3st+K/ey=Z9q"
URL_FORM = urllib.parse.quote(KEY, safe="")
JSON_ESCAPED = "".join(f"\\u{ord(c):04x}" for c in KEY)  # the key, every character \u-escaped
FULLWIDTH = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in KEY)
FORMS = [KEY, URL_FORM, JSON_ESCAPED, FULLWIDTH]

assert URL_FORM != KEY
assert unicodedata.normalize("NFKC", FULLWIDTH) == KEY


def _error_body(message: str) -> dict[str, object]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": KEY, "code": KEY}
    }


def _json(status: int, body: object, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


SERVERS: dict[str, Callable[[httpx.Request], httpx.Response]] = {
    "plain message, param and code": lambda r: _json(
        401, _error_body(f"Incorrect API key provided: {KEY}. clé refusée")
    ),
    "key in response headers": lambda r: _json(
        401,
        {"error": {"message": "no", "type": "auth"}},
        **{"x-echo-key": KEY, "www-authenticate": f'Bearer error="{KEY}"'},
    ),
    "url-encoded in a text body": lambda r: httpx.Response(
        403, text=f"<html>denied: /v1/completions?api_key={URL_FORM}</html>"
    ),
    "json-escaped in a text body": lambda r: httpx.Response(
        400, text=f'upstream said {{"key": "{JSON_ESCAPED}"}}'
    ),
    "fullwidth (non-ASCII) form": lambda r: _json(
        401, _error_body(f"clave inválida «{FULLWIDTH}»")
    ),
    "double-encoded JSON in the message": lambda r: _json(
        401, _error_body(json.dumps({"key": KEY}, ensure_ascii=False).replace(KEY, JSON_ESCAPED))
    ),
    "streamed error event": lambda r: httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=(f"data: {json.dumps(_error_body(f'bad key {KEY}'))}\n\ndata: [DONE]\n\n").encode(),
    ),
}


def _assert_hidden(text: str, where: str) -> None:
    for form in FORMS:
        assert form not in text, f"the key ({form!r}) leaked into {where}: {text[:300]!r}"
    assert unicodedata.normalize("NFKC", urllib.parse.unquote(text)).find(KEY) < 0, where


@pytest.mark.parametrize("name", list(SERVERS))
def test_exception_hides_every_form(name: str) -> None:
    client = mock_client(SERVERS[name], api_key=KEY, max_retries=0)

    def call() -> object:
        if name == "streamed error event":
            return list(client.stream("x", max_tokens=2))
        return client.complete("x", max_tokens=2)

    with pytest.raises(APIError) as caught:
        call()
    exc = caught.value
    _assert_hidden(str(exc), "str(e)")
    _assert_hidden(repr(exc), "repr(e)")
    _assert_hidden(json.dumps(exc.body, ensure_ascii=False), "e.body")
    _assert_hidden(json.dumps(exc.headers, ensure_ascii=False), "e.headers")
    _assert_hidden(str(exc.args), "e.args")
    client.close()


def test_redact_error_covers_every_field_and_nested_keys() -> None:
    error = APIError(
        f"m {KEY}",
        status=400,
        type=f"t {URL_FORM}",
        param=KEY,
        code=JSON_ESCAPED,
        body={KEY: [{"deep": FULLWIDTH}], "n": 3},
        headers={"x-key": KEY, KEY: "v"},
    )
    redact_error(error, [KEY])
    everything = json.dumps(
        [str(error), repr(error), error.type, error.body, error.headers], ensure_ascii=False
    )
    _assert_hidden(everything, "the redacted error")
    assert error.body["n"] == 3
    assert redact_text("nothing secret here", [KEY]) == "nothing secret here"


def test_sweep_error_column_parquet_and_cache_hide_the_key(tmp_path: Path) -> None:
    def echo_everything(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return _json(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
        return _json(
            401,
            _error_body(f"bad {KEY} / {URL_FORM} / {JSON_ESCAPED} / {FULLWIDTH}"),
            **{"x-echo-key": KEY},
        )

    client = mock_client(echo_everything, api_key=KEY, max_retries=0)
    cache = tmp_path / "cache.sqlite"
    # Every request failing the same way stops the sweep: that error hides the key too.
    with pytest.raises(SweepError) as info:
        sweep(client, prompt=["a", "b"], max_tokens=2, cache=cache, progress=False)
    _assert_hidden(str(info.value) + repr(info.value), "the SweepError")
    with pytest.warns(SweepWarning) as warned:
        result = sweep(
            client, prompt=["a", "b"], max_tokens=2, cache=cache, progress=False, fail_fast=None
        )
    _assert_hidden(" ".join(str(w.message) for w in warned), "the SweepWarning")
    assert result.n_failed == 2
    assert result.requests["error"].notna().all()
    _assert_hidden(result.requests.to_json(force_ascii=False), "the requests frame")
    _assert_hidden(result.choices.to_json(force_ascii=False), "the choices frame")
    _assert_hidden(json.dumps(result.capabilities, ensure_ascii=False), "capabilities")
    out = result.to_parquet(tmp_path / "study")
    for path in out.iterdir():
        _assert_hidden(path.read_bytes().decode("latin-1"), f"{path.name}'s bytes")
    for path in tmp_path.glob("cache.sqlite*"):
        _assert_hidden(path.read_bytes().decode("latin-1"), f"{path.name}'s bytes")
    raw = sqlite3.connect(str(cache))
    stored = [v for (v,) in raw.execute("SELECT value FROM meta")]
    stored += [
        zlib.decompress(v).decode() for (v,) in raw.execute("SELECT response FROM responses")
    ]
    raw.close()
    _assert_hidden(json.dumps(stored, ensure_ascii=False), "the cache's rows")
    client.close()


def test_widget_error_box_hides_the_key() -> None:
    from nbcompletions.widgets._display import error_html

    error = APIError(f"bad {URL_FORM}", status=401, param=KEY)
    _assert_hidden(error_html(error, [KEY]), "the widget's error box")
    crash = RuntimeError(f"unexpected: {KEY}")
    _assert_hidden(error_html(crash, [KEY]), "the widget's error box")
