"""The ``nbcompletions`` command line and `serve()`: arguments, keys, logs, clean shutdown."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port

import nbcompletions.server
from nbcompletions._cli import build_parser, main
from nbcompletions.server import serve
from nbcompletions.server._serve import is_loopback


def test_help_names_the_serve_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out
    assert "OpenAI" in out


def test_serve_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--host",
        "--port",
        "--api-key",
        "--max-tokens-cap",
        "--max-body-bytes",
        "--log-level",
        "--compat",
        "--allow-host",
        "--allow-origin",
        "--body-timeout",
        "--max-batch-file-bytes",
        "--max-batch-file-requests",
        "--max-batch-stored-bytes",
        "--max-batch-lines-in-flight",
        "--batch-window",
        "NBCOMPLETIONS_API_KEY",
        "127.0.0.1",
    ):
        assert option in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: nbcompletions" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["serve", "--port", "70000"], "65535"),
        (["serve", "--port", "http"], "65535"),
        (["serve", "--max-tokens-cap", "0"], ">= 1"),
        (["serve", "--max-request-tokens", "0"], ">= 1"),
        (["serve", "--max-memory-mb", "x"], ">= 1"),
        (["serve", "--log-level", "loud"], "invalid choice"),
        # An unset shell variable ("--api-key $KEY") must not start a server without a key.
        (["serve", "--api-key", ""], "non-empty"),
        (["serve", "--api-key", "  "], "non-empty"),
        # A non-ASCII key could never authenticate anyone (headers travel as latin-1 bytes).
        (["serve", "--api-key", "sk-caf\u00e9-secret"], "printable ASCII"),
        (["serve", "--body-timeout", "0"], "seconds > 0"),
        (["serve", "--body-timeout", "soon"], "seconds > 0"),
        (["serve", "--compat", "tgi"], "invalid choice"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_saying_why(
    capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err
    assert "secret" not in err


def test_serve_arguments_reach_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(nbcompletions.server, "serve", lambda **kwargs: calls.append(kwargs))
    assert (
        main(
            [
                "serve",
                "--port",
                "0",
                "--api-key",
                "k1",
                "--max-tokens-cap",
                "64",
                "--max-body-bytes",
                "5000",
                "--log-level",
                "warning",
                "--no-access-log",
            ]
        )
        == 0
    )
    assert calls == [
        {
            "host": "127.0.0.1",
            "port": 0,
            "api_key": "k1",
            "max_tokens_cap": 64,
            "max_body_bytes": 5000,
            "log_level": "warning",
            "budget": nbcompletions.server.WorkBudget(),
            "access_log": False,
        }
    ]
    calls.clear()
    assert main(["serve"]) == 0
    assert calls[0]["api_key"] is None  # serve() reads NBCOMPLETIONS_API_KEY itself
    assert calls[0]["max_tokens_cap"] == nbcompletions.server.DEFAULT_MAX_TOKENS_CAP
    assert "compat" not in calls[0]
    assert "body_timeout_s" not in calls[0]
    calls.clear()
    argv = ["serve", "--compat", "vllm", "--allow-host", "my.box", "--allow-host", "other.box"]
    argv += ["--allow-origin", "https://lab.example", "--body-timeout", "2.5"]
    assert main(argv) == 0
    assert calls[0]["compat"] == "vllm"
    assert calls[0]["allow_hosts"] == ["my.box", "other.box"]
    assert calls[0]["allow_origins"] == ["https://lab.example"]
    assert calls[0]["body_timeout_s"] == 2.5


def test_serve_work_budget_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(nbcompletions.server, "serve", lambda **kwargs: calls.append(kwargs))
    argv = ["serve", "--max-request-tokens", "4096", "--max-memory-mb", "256", "--max-waiting", "8"]
    assert main(argv) == 0
    assert calls[0]["budget"] == nbcompletions.server.WorkBudget(
        max_request_tokens=4096, max_memory_bytes=256 << 20, max_waiting=8
    )


_BATCH_FLAGS = {
    "--max-batch-file-bytes": "max_file_bytes",
    "--max-batch-file-requests": "max_file_requests",
    "--max-batch-stored-bytes": "max_stored_bytes",
    "--max-batch-lines-in-flight": "max_lines_in_flight",
    "--batch-window": "completion_window_s",
}


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--max-batch-file-bytes", "0", "must be an integer >= 1; got 0"),
        ("--max-batch-file-requests", "-5", "must be an integer >= 1; got -5"),
        ("--max-batch-stored-bytes", "2GB", "must be an integer >= 1; got '2GB'"),
        ("--max-batch-lines-in-flight", "1.5", "must be an integer >= 1; got '1.5'"),
        ("--batch-window", "0", "must be a number of seconds > 0; got 0"),
        ("--batch-window", "inf", "must be a number of seconds > 0; got inf"),
        ("--batch-window", "a day", "must be a number of seconds > 0; got 'a day'"),
    ],
)
def test_bad_batch_limits_name_the_flag_the_range_and_the_value(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
    allowed: str,
) -> None:
    monkeypatch.setattr(nbcompletions.server, "serve", lambda **kwargs: pytest.fail("served"))
    with pytest.raises(SystemExit) as info:
        main(["serve", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: {allowed}" in capsys.readouterr().err


def test_serve_batch_limit_flags_reach_the_app(
    monkeypatch: pytest.MonkeyPatch, uvicorn_configs: list[Any]
) -> None:
    monkeypatch.setattr(
        nbcompletions.server, "serve", lambda **kwargs: serve(engine=_Engine(), **kwargs)
    )
    argv = ["serve", "--max-batch-file-bytes", "5000", "--max-batch-file-requests", "7"]
    argv += ["--max-batch-stored-bytes", "90000", "--max-batch-lines-in-flight", "3"]
    argv += ["--batch-window", "2.5"]
    assert main(argv) == 0
    assert uvicorn_configs[-1].app.state.nbcompletions_batches.limits == (
        nbcompletions.server.BatchLimits(
            max_file_bytes=5000,
            max_file_requests=7,
            max_stored_bytes=90000,
            max_lines_in_flight=3,
            completion_window_s=2.5,
        )
    )
    # One flag changes one limit; the rest keep BatchLimits' defaults.
    assert main(["serve", "--max-batch-lines-in-flight", "2"]) == 0
    assert uvicorn_configs[-1].app.state.nbcompletions_batches.limits == (
        nbcompletions.server.BatchLimits(max_lines_in_flight=2)
    )
    assert main(["serve"]) == 0
    assert uvicorn_configs[-1].app.state.nbcompletions_batches.limits == (
        nbcompletions.server.BatchLimits()
    )


def test_batch_limit_flags_show_batch_limits_own_defaults() -> None:
    import argparse
    import dataclasses
    import re

    parser = build_parser()
    serve_parser = next(
        action.choices["serve"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    helps = {a.option_strings[0]: a.help or "" for a in serve_parser._actions if a.option_strings}
    defaults = {f.name: f.default for f in dataclasses.fields(nbcompletions.server.BatchLimits)}
    for flag, field in _BATCH_FLAGS.items():
        shown = re.search(r"\(default: (\d+)", helps[flag])
        assert shown is not None, flag
        assert float(shown.group(1)) == defaults[field], flag


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


class _Engine:
    model_id = "stand-in"

    def complete(self, request: Any) -> dict[str, Any]:
        raise AssertionError("no request is served in these tests")

    def stream(self, request: Any) -> Any:
        raise AssertionError("no request is served in these tests")


@pytest.fixture
def uvicorn_configs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Stops `serve()` just before uvicorn binds a socket; collects the configs it would run."""
    import uvicorn

    configs: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: configs.append(self.config))
    monkeypatch.delenv("NBCOMPLETIONS_API_KEY", raising=False)
    return configs


def test_serving_beyond_loopback_without_a_key_warns(
    uvicorn_configs: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="nbcompletions"):
        serve(host="0.0.0.0", port=8123, engine=_Engine())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "without an API key" in warnings[0].getMessage()
    assert uvicorn_configs[0].host == "0.0.0.0"
    assert "http://0.0.0.0:8123/v1" in caplog.text


def test_key_from_the_environment_is_used_and_never_logged(
    uvicorn_configs: list[Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCOMPLETIONS_API_KEY", "sk-env-key-77")
    with caplog.at_level(logging.DEBUG, logger="nbcompletions"):
        serve(host="0.0.0.0", port=8123, engine=_Engine())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "bearer key required" in caplog.text
    assert "sk-env-key-77" not in caplog.text
    state = uvicorn_configs[0].app.state.nbcompletions
    assert "api_key=set" in repr(state)
    assert "sk-env-key-77" not in repr(state)


def test_serve_preloads_the_engine_and_stays_on_loopback(uvicorn_configs: list[Any]) -> None:
    serve(engine=_Engine())
    (config,) = uvicorn_configs
    assert config.host == "127.0.0.1"
    assert config.port == 8000
    assert config.app.state.nbcompletions.engine_loaded


def test_serve_rejects_bad_settings(uvicorn_configs: list[Any]) -> None:
    with pytest.raises(ValueError, match="port must be an integer from 0 to 65535; got 99999"):
        serve(port=99999, engine=_Engine())
    with pytest.raises(ValueError, match="log_level"):
        serve(log_level="loud", engine=_Engine())
    assert uvicorn_configs == []


def test_missing_model_files_fail_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_files(**kwargs: Any) -> None:
        raise FileNotFoundError("model files missing in /nowhere: model.safetensors")

    monkeypatch.setattr(nbcompletions.server, "serve", no_files)
    assert main(["serve"]) == 1
    assert "model files missing in /nowhere" in capsys.readouterr().err


def test_console_script_help() -> None:
    script = shutil.which("nbcompletions", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the package is not installed (pip install -e .): no console script")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "serve" in result.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("stop", "status"),
    [
        # uvicorn shuts down gracefully, then re-raises the signal: SIGTERM ends the process by that
        # signal (as `kill` expects); Ctrl-C ends it with the shell's 130, without a traceback.
        # uvicorn before 0.29 exited 0 instead.
        (signal.SIGTERM, {0, -signal.SIGTERM}),
        (signal.SIGINT, {0, 130}),
    ],
)
@pytest.mark.slow
def test_serve_process_logs_its_url_and_shuts_down_cleanly(
    tmp_path: Path, embedded_engine: Any, stop: int, status: set[int]
) -> None:
    # embedded_engine: skips, as it does, while the weights are missing (serve preloads them).
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "NBCOMPLETIONS_API_KEY": "sk-process-key-9"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbcompletions", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(stop)
        assert proc.wait(timeout=30) in status, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"http://127.0.0.1:{port}/v1" in text
    assert "sk-process-key-9" not in text
    assert "Traceback" not in text
    assert "Finished server process" in text  # uvicorn's last line on a clean shutdown


def test_a_key_from_the_environment_that_http_cannot_carry_exits_2(
    uvicorn_configs: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NBCOMPLETIONS_API_KEY", "sk-caf\u00e9-secret")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "api_key must be printable ASCII" in err
    assert "secret" not in err
    assert uvicorn_configs == []  # refused before anything started


async def _status(app: Any, host: str) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        return (await client.get("/health", headers={"host": host})).status_code


async def test_a_loopback_serve_checks_the_host_and_others_do_not(
    uvicorn_configs: list[Any],
) -> None:
    serve(engine=_Engine())
    serve(engine=_Engine(), allow_hosts=["my.box"])
    serve(host="0.0.0.0", engine=_Engine())
    loopback, allowed, everywhere = (config.app for config in uvicorn_configs)
    assert await _status(loopback, "127.0.0.1:8000") == 200
    assert await _status(loopback, "rebound.example:8000") == 403
    assert await _status(allowed, "my.box:8000") == 200
    assert await _status(everywhere, "rebound.example:8000") == 200


def test_connection_flags_show_serves_own_defaults_and_reach_uvicorn(
    monkeypatch: pytest.MonkeyPatch, uvicorn_configs: list[Any]
) -> None:
    import argparse
    import re

    from nbcompletions.server import _serve

    parser = build_parser()
    serve_parser = next(
        action.choices["serve"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    helps = {a.option_strings[0]: a.help or "" for a in serve_parser._actions if a.option_strings}
    for flag, default in (
        ("--header-timeout", _serve.DEFAULT_HEADER_TIMEOUT_S),
        ("--keep-alive-timeout", _serve.DEFAULT_KEEP_ALIVE_TIMEOUT_S),
        ("--max-connections", _serve.DEFAULT_MAX_CONNECTIONS),
    ):
        shown = re.search(r"\(default: (\d+)", helps[flag])
        assert shown is not None, flag
        assert float(shown.group(1)) == default, flag
    monkeypatch.setattr(
        nbcompletions.server, "serve", lambda **kwargs: serve(engine=_Engine(), **kwargs)
    )
    argv = ["serve", "--header-timeout", "7", "--keep-alive-timeout", "9"]
    assert main([*argv, "--max-connections", "5"]) == 0
    config = uvicorn_configs[-1]
    assert config.timeout_keep_alive == 9
    assert config.http.guard.header_timeout_s == 7
    assert config.http.guard.max_connections == 5
    with pytest.raises(SystemExit):
        main(["serve", "--max-connections", "0"])
