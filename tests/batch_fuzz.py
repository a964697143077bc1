"""A fuzzer for the Batch API surface: JSONL input files with wrong types, sizes, nesting, duplicate
custom_ids and bad encodings, in well-formed or broken multipart bodies, run through upload,
create, wait and download, for completions and chat files. The rule is the live
fuzzer's: no response with status 500 and no output or error line with status 500.

`fuzzed_body` and `run_routes` are the live fuzzer: odd bodies posted straight to each route
(completions, chat, responses, tokenize, detokenize).

Used by tests/test_batch_fuzz.py (a few dozen files) and benchmarks/bench_batch_fuzz.py (5,000).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
from typing import Any

import httpx

MODEL = "nbc-shakespeare"
TERMINAL = ("completed", "failed", "expired", "cancelled")
FIELDS = (
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
    "top_k",
    "messages",
    "\u00e9\u0000",
)


#: Each route's fields, and the valid body the fuzzer starts from (raw JSON text per field).
CHAT_FIELDS = (
    "messages",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "max_tokens",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "logit_bias",
    "prompt_logprobs",
    "top_k",
    "prompt",
)
RESPONSES_FIELDS = (
    "input",
    "instructions",
    "include",
    "top_logprobs",
    "max_output_tokens",
    "stream",
)
TOKENIZE_FIELDS = (
    "prompt",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "return_token_strs",
    "tokens",
    "model",
)
MESSAGES = [{"role": "user", "content": "Who art thou?"}]
_ODD_MESSAGES = [
    [],
    [{}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [[{"type": "text", "text": "a"}]]}],
    [{"role": "assistant", "content": "<|endoftext|>" * 3}, {"role": "user", "content": "\ud800"}],
    [{"role": "system", "content": "x" * 3000}],
    [{"role": "user", "content": "O"}] * 50,
]
ROUTES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "/v1/completions": ({"model": MODEL, "prompt": "To be", "max_tokens": 2}, FIELDS),
    "/v1/chat/completions": ({"model": MODEL, "messages": MESSAGES, "max_tokens": 2}, CHAT_FIELDS),
    "/v1/responses": (
        {"model": MODEL, "input": "To be", "max_output_tokens": 2},
        RESPONSES_FIELDS,
    ),
    "/tokenize": ({"model": MODEL, "messages": MESSAGES}, TOKENIZE_FIELDS),
    "/detokenize": ({"tokens": [1, 2, 3]}, ("tokens", "model")),
}


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _odd_value(rng: random.Random) -> str:
    """Raw JSON text of an odd value (some not JSON at all)."""
    choices = [
        "null",
        "true",
        "-1",
        "0",
        "1",
        "3",
        "-0.0",
        "5e-324",
        "1e308",
        "1e999",
        "NaN",
        "-Infinity",
        "1" + "0" * rng.choice((20, 400)),
        '""',
        '"x"',
        '"\\ud800"',
        '"\\u0000"',
        "[]",
        "{}",
        "[[]]",
        '[""]',
        "[-1]",
        "[1, 2, 99999999]",
        '{"50256": -100}',
        '{"a": 1}',
        '{"1": "x"}',
        '{"include_usage": 7}',
        json.dumps("x" * rng.choice((10, 5000, 300_000))),
        json.dumps(list(range(rng.choice((3, 300, 20_000))))),
        _nested(rng.choice((2, 3, 40, 900, 1100))),
        json.dumps([MODEL]),
        json.dumps({"model": MODEL}),
        json.dumps(MODEL),
    ]
    return rng.choice(choices)


def fuzzed_body(rng: random.Random, route: str = "/v1/completions") -> str:
    """Raw JSON text of a request body for ``route``: valid, with zero to three odd fields (a
    chat's messages odd in their own ways too)."""
    valid, fields = ROUTES[route]
    body = {key: json.dumps(value) for key, value in valid.items()}
    if route == "/v1/completions":
        body["prompt"] = json.dumps(rng.choice(("To be", "", "O", "x" * 300)))
        body["max_tokens"] = str(rng.randint(0, 3))
    for _ in range(rng.randint(0, 3)):
        field = rng.choice(fields)
        odd = field in ("messages", "input") and rng.random() < 0.5
        body[field] = json.dumps(rng.choice(_ODD_MESSAGES)) if odd else _odd_value(rng)
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in body.items()) + "}"


def _line(rng: random.Random, custom_id: str, url: str) -> bytes:
    parts = {
        "custom_id": json.dumps(custom_id),
        "method": '"POST"',
        "url": json.dumps(url),
        "body": fuzzed_body(rng, url),
    }
    roll = rng.random()
    if roll < 0.05:
        parts[rng.choice(list(parts))] = _odd_value(rng)
    elif roll < 0.08:
        del parts[rng.choice(list(parts))]
    elif roll < 0.10:
        parts["extra"] = _odd_value(rng)
    text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in parts.items()) + "}"
    roll = rng.random()
    if roll < 0.02:
        return text[: rng.randint(0, len(text))].encode()  # cut short: not JSON
    if roll < 0.03:
        return b"[" + text.encode() + b"]"
    if roll < 0.04:
        return text.encode()[:5] + b"\xff\xfe\x80" + text.encode()[5:]  # not UTF-8
    if roll < 0.05:
        return text.encode("utf-16")
    if roll < 0.06:
        return text.encode() + b"\x00"
    return text.encode()


def fuzzed_file(rng: random.Random, url: str = "/v1/completions") -> bytes:
    """One JSONL input file of ``url`` lines: 1 to 6, each possibly broken, in one of several
    framings."""
    count = rng.randint(1, 6)
    ids = [f"r{i}" for i in range(count)]
    if rng.random() < 0.05 and count > 1:
        ids[-1] = ids[0]  # a duplicate custom_id
    lines = [_line(rng, custom_id, url) for custom_id in ids]
    if rng.random() < 0.03:
        lines.insert(
            rng.randrange(len(lines) + 1), b'{"custom_id": "big"' + b" " * 1_100_000 + b"}"
        )
    if rng.random() < 0.05:
        lines.insert(rng.randrange(len(lines) + 1), b"   ")
    newline = rng.choice((b"\n", b"\n", b"\r\n", b"\r"))
    content = newline.join(lines) + rng.choice((newline, b""))
    roll = rng.random()
    if roll < 0.03:
        content = b"\xef\xbb\xbf" + content  # a byte-order mark
    elif roll < 0.05:
        content = b""
    return content


def _multipart(rng: random.Random, content: bytes) -> tuple[bytes, str] | None:
    """A hand-made multipart body around ``content``, broken in one way; None (one time in
    two) to let httpx build a correct one."""
    if rng.random() < 0.5:
        return None
    boundary = "fz" + str(rng.randint(0, 10**6))
    purpose = b'--%s\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    file = b'--%s\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
    parts = [purpose % boundary.encode(), file % boundary.encode() + content + b"\r\n"]
    ending = b"--%s--\r\n" % boundary.encode()
    roll = rng.random()
    if roll < 0.2:
        parts.pop(1)  # no file part
    elif roll < 0.3:
        parts.pop(0)  # no purpose
    elif roll < 0.4:
        parts.append(parts[1])  # the file twice
    elif roll < 0.5:
        ending = b""  # no closing boundary
    elif roll < 0.6:
        parts[1] = parts[1].replace(b"\r\n\r\n", b"\r\n", 1)  # no end of headers
    body = b"".join(parts) + ending
    if rng.random() < 0.2:
        body = body[: rng.randint(0, len(body))]
    kind = rng.choice(
        (
            f"multipart/form-data; boundary={boundary}",
            f'multipart/form-data; boundary="{boundary}"',
            "multipart/form-data",
            "multipart/form-data; boundary=other",
            "text/plain",
        )
    )
    return body, kind


async def run_file(
    http: httpx.AsyncClient,
    content: bytes,
    outcomes: collections.Counter[str],
    raw: tuple[bytes, str] | None = None,
    endpoint: str = "/v1/completions",
) -> None:
    """Upload, create, wait and download one file, counting what happened in ``outcomes``;
    AssertionError on a 500 anywhere."""
    if raw is None:
        uploaded = await http.post(
            "/v1/files",
            files={"file": ("fuzz.jsonl", content, "application/jsonl")},
            data={"purpose": "batch"},
        )
    else:
        body, kind = raw
        uploaded = await http.post("/v1/files", content=body, headers={"content-type": kind})
    assert uploaded.status_code != 500, uploaded.text[:300]
    outcomes[f"upload {uploaded.status_code}"] += 1
    if uploaded.status_code != 200:
        return
    created = await http.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": endpoint,
            "completion_window": "24h",
        },
    )
    assert created.status_code != 500, created.text[:300]
    outcomes[f"create {created.status_code}"] += 1
    if created.status_code != 200:
        return
    card = await _wait(http, created.json()["id"])
    outcomes[f"batch {card['status']}"] += 1
    for key in ("output_file_id", "error_file_id"):
        if card[key] is None:
            continue
        download = await http.get(f"/v1/files/{card[key]}/content")
        assert download.status_code == 200, download.text[:300]
        for text in download.content.splitlines():
            line: dict[str, Any] = json.loads(text)
            status = (line.get("response") or {}).get("status_code")
            assert status != 500, line
            outcomes[f"line {status or line['error']['code']}"] += 1
        await http.delete(f"/v1/files/{card[key]}")
    await http.delete(f"/v1/files/{uploaded.json()['id']}")


async def _wait(http: httpx.AsyncClient, batch_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        card: dict[str, Any] = (await http.get(f"/v1/batches/{batch_id}")).json()
        if card["status"] in TERMINAL:
            return card
        assert loop.time() < deadline, f"batch {batch_id} stuck in {card['status']}"
        await asyncio.sleep(0.01)


async def run_files(
    http: httpx.AsyncClient,
    count: int,
    *,
    seed: int,
    concurrency: int = 16,
    endpoint: str = "/v1/completions",
) -> collections.Counter[str]:
    """Run ``count`` fuzzed files of ``endpoint`` lines (``concurrency`` at once); the outcomes
    counted."""
    rng = random.Random(seed)
    files = [fuzzed_file(rng, endpoint) for _ in range(count)]
    bodies = [_multipart(rng, content) for content in files]
    outcomes: collections.Counter[str] = collections.Counter()
    gate = asyncio.Semaphore(concurrency)

    async def one(content: bytes, raw: tuple[bytes, str] | None) -> None:
        async with gate:
            await run_file(http, content, outcomes, raw, endpoint)

    await asyncio.gather(*(one(c, raw) for c, raw in zip(files, bodies, strict=True)))
    outcomes["files"] = count
    return outcomes


async def run_routes(
    http: httpx.AsyncClient, count: int, *, seed: int, concurrency: int = 8
) -> collections.Counter[str]:
    """Post ``count`` fuzzed bodies to each route of `ROUTES` (streams read to the end); the
    outcomes counted as "route status"; AssertionError on a 500 or an error event."""
    rng = random.Random(seed)
    bodies = [(route, fuzzed_body(rng, route)) for route in ROUTES for _ in range(count)]
    outcomes: collections.Counter[str] = collections.Counter()
    gate = asyncio.Semaphore(concurrency)

    async def one(route: str, body: str) -> None:
        async with gate:
            headers = {"content-type": "application/json"}
            response = await http.post(route, content=body.encode(), headers=headers)
            assert response.status_code != 500, (route, body[:300], response.text[:300])
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                assert '"server_error"' not in response.text, (route, body[:300])
            outcomes[f"{route} {response.status_code}"] += 1

    await asyncio.gather(*(one(route, body) for route, body in bodies))
    return outcomes
