"""Record real request/response pairs from the llama.cpp peer into tests/fixtures/llamacpp/.

Usage (from the repository root, in the dev venv):
    python tests/peers/record_llamacpp.py [--base-url http://127.0.0.1:PORT/v1] [--out DIR]

Without ``--base-url`` it converts the embedded model and starts its own peer (see
``tests/peers/llamacpp.py`` for where the peer's python comes from). Each fixture is one JSON file:
``{"name", "shows", "server", "method", "path", "request", "status", "headers", "response"}`` where
``response`` is the decoded JSON body, or, for a stream, ``{"sse": raw text, "events": [...]}``
with every ``data:`` payload parsed (``"[DONE]"`` kept as the string). These are fixtures for fast
unit tests of the conformance check; tests/test_llamacpp_peer.py asserts the same facts live.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import httpx

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "fixtures" / "llamacpp"
MODEL = "nbc-shakespeare"
PROMPT = "To be, or not to be, that is the question:"
# Greedy, and every llama.cpp-only sampler switched off, so the numbers mean OpenAI's.
GREEDY: dict[str, Any] = {"temperature": 0, "top_k": 0, "min_p": 0, "repeat_penalty": 1}
OPENAI_DEFAULTS: dict[str, Any] = {
    "temperature": 1,
    "top_p": 1,
    "top_k": 0,
    "min_p": 0,
    "repeat_penalty": 1,
}


class Case(NamedTuple):
    name: str
    shows: str
    method: str
    path: str  # relative to the server root, e.g. /v1/completions
    body: dict[str, Any] | str | None  # a str is sent as raw bytes (a malformed body)
    stream: bool = False


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, **fields}


CASES: list[Case] = [
    Case("models", "GET /v1/models: no context length or vocab size", "GET", "/v1/models", None),
    Case(
        "tokenize",
        "POST /extras/tokenize: the peer's own tokenizer endpoint (same ids as ours)",
        "POST",
        "/extras/tokenize",
        {"input": PROMPT},
    ),
    Case(
        "greedy_logprobs",
        "plain greedy completion with logprobs=2; text_offset starts at len(prompt)",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY),
    ),
    Case(
        "echo_logprobs_shifted",
        "echo+logprobs, max_tokens=1: prompt logprobs shifted by one position; last token missing",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, **GREEDY),
    ),
    Case(
        "max_tokens_zero",
        "max_tokens=0 generates until the context (256) is full instead of scoring only",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, echo=True, max_tokens=0, **GREEDY),
    ),
    Case(
        "n_2",
        "n=2 is ignored: one choice",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, n=2, max_tokens=3, seed=1, **OPENAI_DEFAULTS),
    ),
    Case(
        "best_of_2",
        "best_of=2 is ignored: one choice",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, best_of=2, max_tokens=3, seed=1, **OPENAI_DEFAULTS),
    ),
    Case(
        "stream_echo",
        "stream=true with echo=true: the prompt is not echoed",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, echo=True, stream=True, max_tokens=3, **GREEDY),
        stream=True,
    ),
    Case(
        "stream_include_usage",
        "stream_options.include_usage is ignored: no usage chunk",
        "POST",
        "/v1/completions",
        _completion(
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=3,
            **GREEDY,
        ),
        stream=True,
    ),
    Case(
        "stop_token_in_logprobs",
        "stop=',': cut from the text but its token stays in the logprobs",
        "POST",
        "/v1/completions",
        _completion(prompt="To be", stop=[","], max_tokens=6, logprobs=0, **GREEDY),
    ),
    Case(
        "byte_tokens",
        "non-ASCII byte tokens come back as empty strings",
        "POST",
        "/v1/completions",
        _completion(prompt="日本 café", echo=True, logprobs=0, max_tokens=1, **GREEDY),
    ),
    Case(
        "logprobs_10",
        "logprobs=10 (above OpenAI's cap of 5) is honoured",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, max_tokens=1, logprobs=10, **GREEDY),
    ),
    Case(
        "list_of_two_prompts",
        "a list of two prompts: HTTP 500",
        "POST",
        "/v1/completions",
        _completion(prompt=[PROMPT, "Hello"], max_tokens=1, **GREEDY),
    ),
    Case(
        "token_id_prompt",
        "a token-id prompt: HTTP error (prompt must be str or list of str)",
        "POST",
        "/v1/completions",
        _completion(prompt=[429, 310, 12], max_tokens=1, **GREEDY),
    ),
    Case(
        "omitted_sampling_fields",
        "fields left out: llama.cpp's defaults (temperature 0.8, top_p 0.95, top_k 40, ...)",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, max_tokens=8, seed=7),
    ),
    Case(
        "unknown_model",
        "an unknown model name is served by the default model (no 404)",
        "POST",
        "/v1/completions",
        {"model": "no-such-model", "prompt": PROMPT, "max_tokens": 1, **GREEDY},
    ),
    Case(
        "suffix_spliced",
        "suffix is not ignored: token 0 markers and a stray byte go into the prompt (8 tokens)",
        "POST",
        "/v1/completions",
        _completion(
            prompt="To be", suffix=" the end", echo=True, logprobs=0, max_tokens=3, **GREEDY
        ),
    ),
    Case(
        "empty_prompt",
        "an empty prompt: HTTP 500 with an empty message (an assertion in llama.py)",
        "POST",
        "/v1/completions",
        _completion(prompt="", max_tokens=3, **GREEDY),
    ),
    Case(
        "context_length_exceeded",
        "a prompt longer than n_ctx: 400 context_length_exceeded with param 'messages'",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT * 30, max_tokens=1, **GREEDY),
    ),
    Case(
        "malformed_json",
        "a body that is not JSON: plain-text 500 'Internal Server Error'",
        "POST",
        "/v1/completions",
        "not json",
    ),
    Case(
        "bad_logprobs",
        "logprobs=-1: a validation error, its status and body shape",
        "POST",
        "/v1/completions",
        _completion(prompt=PROMPT, max_tokens=1, logprobs=-1),
    ),
]


def _events(raw: str) -> list[Any]:
    events: list[Any] = []
    for line in raw.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def record(root: str, out: Path, version: str) -> list[Path]:
    """Send every case to the server at ``root`` (no /v1) and write one fixture per case."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with httpx.Client(base_url=root, timeout=120) as http:
        for case in CASES:
            if isinstance(case.body, str):
                response = http.request(
                    case.method,
                    case.path,
                    content=case.body.encode(),
                    headers={"content-type": "application/json", "connection": "close"},
                )
            else:
                response = http.request(case.method, case.path, json=case.body)
            body: Any
            if case.stream:
                body = {"sse": response.text, "events": _events(response.text)}
            else:
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
            fixture = {
                "name": case.name,
                "shows": case.shows,
                "server": f"llama-cpp-python {version}",
                "method": case.method,
                "path": case.path,
                "request": case.body,
                "status": response.status_code,
                "headers": {"content-type": response.headers.get("content-type", "")},
                "response": body,
            }
            path = out / f"{case.name}.json"
            path.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", "utf-8")
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="a running peer's …/v1 URL (default: start one)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from peers import llamacpp

    if args.base_url:
        written = record(args.base_url.removesuffix("/v1"), args.out, llamacpp.LLAMACPP_VERSION)
    else:
        python = llamacpp.peer_python()
        if python is None:
            print(llamacpp.HOW_TO_GET, file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            gguf_path = llamacpp.convert_model(python, Path(tmp) / "nbc-shakespeare.gguf")
            proc, base = llamacpp.start_server(python, gguf_path, Path(tmp) / "server.log")
            try:
                written = record(base.removesuffix("/v1"), args.out, llamacpp.LLAMACPP_VERSION)
            finally:
                llamacpp.stop_server(proc)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
