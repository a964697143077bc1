"""How fast a Chat Completions answer becomes frames, side by side with stdlib ``json.loads``.

    python benchmarks/bench_chat_frames.py [--tokens 20000] [--alternatives 5] [--choices 20]
                                           [--repeats 5]

One run measures, on the same synthetic chat answer (OpenAI's shape: ``logprobs.content`` entries
with ``token``, ``logprob``, ``bytes`` and ``top_logprobs`` lists of ``{token, logprob, bytes}``;
1% of the tokens are halves of a split character, whose ``token`` shows ``\\xNN`` escapes, and
0.5% of the entries carry OpenAI's -9999.0):

- stdlib ``json.loads`` of the bytes (the yardstick);
- bytes to chat frames as the client does it: ``nbcompletions._parse.loads`` (orjson where
  installed) then `chat_frames` (all three frames, every column, entropy bounds, role, refusal,
  api, below_cap); target: at most 1.0x ``json.loads``;
- the same tokens as a Completions answer, bytes to frames (``to_frames``), for reference
  (benchmarks/bench_frames.py has it at about 0.6x).

Medians over ``--repeats`` interleaved runs; the ratios are printed at the end. ``--cpu`` times
with the process's CPU time, for a machine other work shares.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbcompletions._chat_frames import chat_frames
from nbcompletions._frames import to_frames
from nbcompletions._parse import JSON_PARSER, loads


def _entry(token: str, logprob: float, raw: bytes, shown: str | None = None) -> dict[str, Any]:
    return {"token": shown or token, "logprob": logprob, "bytes": list(raw)}


def make_payloads(
    n_tokens: int, n_alternatives: int, n_choices: int, seed: int = 0
) -> tuple[bytes, bytes]:
    """(chat answer, the same tokens as a Completions answer), as JSON bytes."""
    rng = np.random.default_rng(seed)
    pool = list(
        dict.fromkeys(
            "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz ,.'"), size=int(length)))
            for length in rng.integers(1, 9, size=5000)
        )
    )
    per_choice = n_tokens // n_choices
    chat_choices, completion_choices = [], []
    for index in range(n_choices):
        logits = rng.normal(size=(per_choice, n_alternatives)) * 2.0
        logprobs = np.sort(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)) - 0.3)
        logprobs = logprobs[:, ::-1]
        content, tokens, token_logprobs, tops = [], [], [], []
        for row in range(per_choice):
            names = list(dict.fromkeys(pool[i] for i in rng.integers(0, len(pool), n_alternatives)))
            values = [float(v) for v in logprobs[row, : len(names)]]
            if rng.random() < 0.005:
                values[-1] = -9999.0
            pick = int(rng.integers(0, len(names)))
            top = [_entry(t, v, t.encode()) for t, v in zip(names, values, strict=True)]
            chosen = dict(top[pick])
            if rng.random() < 0.01:  # half of a character: shown as \xNN escapes
                chosen = _entry("", values[pick], b"\xf0\x9f", "\\xf0\\x9f")
            content.append({**chosen, "top_logprobs": top})
            tokens.append(names[pick])
            token_logprobs.append(values[pick])
            tops.append(dict(zip(names, values, strict=True)))
        text = "".join(tokens)
        chat_choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": {"content": content, "refusal": None},
                "finish_reason": "length",
            }
        )
        completion_choices.append(
            {
                "index": index,
                "text": text,
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": tops,
                },
                "finish_reason": "length",
            }
        )
    head = {"id": "x", "created": 0, "model": "m"}
    chat = {**head, "object": "chat.completion", "choices": chat_choices}
    completion = {**head, "object": "text_completion", "choices": completion_choices}
    return json.dumps(chat).encode(), json.dumps(completion).encode()


def timed(function: Callable[[], Any], clock: Callable[[], float]) -> float:
    gc.collect()
    start = clock()
    function()
    return clock() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--alternatives", type=int, default=5)
    parser.add_argument("--choices", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time with the process's CPU time instead of the wall clock (on a shared machine)",
    )
    args = parser.parse_args(argv)
    clock = time.process_time if args.cpu else time.perf_counter

    chat, completion = make_payloads(args.tokens, args.alternatives, args.choices)
    print(f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}")
    print(f"response parser: {JSON_PARSER}")
    print(
        f"chat answer: {len(chat) / 1e6:.1f} MB; the same as a completion: "
        f"{len(completion) / 1e6:.1f} MB; {args.tokens:,} tokens x {args.alternatives} "
        f"alternatives, {args.choices} choices; {args.repeats} repeats; "
        f"{'process CPU time' if args.cpu else 'wall clock'}"
    )
    _, tokens, _ = chat_frames(loads(chat))  # warm-up, and a sanity check
    rows = args.tokens // args.choices * args.choices
    if len(tokens) != rows or not tokens["below_cap"].any():
        raise SystemExit("chat_frames lost rows: the benchmark would measure the wrong thing")
    if not tokens["token"].str.startswith("bytes:").any():
        raise SystemExit("no split character was read from bytes")

    times: dict[str, list[float]] = {
        "chat json.loads": [],
        "chat bytes->frames": [],
        "completion json.loads": [],
        "completion bytes->frames": [],
    }
    for _ in range(args.repeats):  # interleaved, so machine load hits every contender alike
        times["chat json.loads"].append(timed(lambda: json.loads(chat), clock))
        times["chat bytes->frames"].append(timed(lambda: chat_frames(loads(chat)), clock))
        times["completion json.loads"].append(timed(lambda: json.loads(completion), clock))
        times["completion bytes->frames"].append(timed(lambda: to_frames(loads(completion)), clock))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{name:>24}: median {medians[name] * 1e3:8.1f} ms   "
            f"(runs: {', '.join(f'{v * 1e3:.0f}' for v in values)})"
        )
    chat_ratio = medians["chat bytes->frames"] / medians["chat json.loads"]
    completion_ratio = medians["completion bytes->frames"] / medians["completion json.loads"]
    print(
        f"chat: bytes->frames / stdlib json.loads of the same bytes = {chat_ratio:.2f} "
        f"(target <= 1.0): {'OK' if chat_ratio <= 1.0 else 'MISSED'}"
    )
    print(f"completion: bytes->frames / stdlib json.loads = {completion_ratio:.2f} (reference)")


if __name__ == "__main__":
    main()
