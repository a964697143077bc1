"""How fast `to_frames` turns a big logprobs response into DataFrames, side by side with baselines.

    python benchmarks/bench_frames.py [--tokens 200000] [--alternatives 5] [--choices 20]
                                      [--repeats 5] [--append-tokens 200] [--shuffled]

One run measures, on the same synthetic payload (OpenAI shape, every position with a top_logprobs
dict of ``--alternatives`` entries that includes the chosen token most of the time):

- ``json.loads`` of the payload (the yardstick: frames should cost at most 1.5x of it);
- ``to_frames`` on the parsed dict (all three frames, every column, entropy bounds included);
- bytes to frames as the client does it: ``nbcompletions._parse.loads`` (orjson where installed,
  the stdlib otherwise) then ``to_frames``; the target is less time than stdlib ``json.loads`` of
  the same bytes alone;
- the naive baseline: a Python loop over tokens and alternatives building one dict per row, then one
  ``pd.DataFrame(rows)`` per frame. It computes only the plain columns (no rank, entropy, top mass),
  so it is the kindest version of the naive approach; the target is to be at least 5x faster;
- optionally, row-appending with ``df.loc[len(df)] = row`` on the first ``--append-tokens`` tokens
  only, extrapolated linearly to the full payload (it is far too slow to run in full).

Medians over ``--repeats`` runs; the ratios are printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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

from nbcompletions._frames import to_frames
from nbcompletions._parse import JSON_PARSER, loads


def make_payload(
    n_tokens: int, n_alternatives: int, n_choices: int, seed: int = 0, shuffled: bool = False
) -> str:
    """A Completions response body with logprobs, as the server would send it."""
    rng = np.random.default_rng(seed)
    pool = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz ,.'"), size=int(length)))
        for length in rng.integers(1, 9, size=5000)
    ]
    pool = list(dict.fromkeys(pool))
    per_choice = n_tokens // n_choices
    choices = []
    for index in range(n_choices):
        logits = rng.normal(size=(per_choice, n_alternatives + 1)) * 2.0
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)) - 0.3
        logprobs.sort(axis=1)
        logprobs = logprobs[:, ::-1]
        ids = rng.integers(0, len(pool), size=(per_choice, n_alternatives + 1))
        tokens, token_logprobs, tops, offsets = [], [], [], []
        offset = 0
        for row in range(per_choice):
            names = list(dict.fromkeys(pool[i] for i in ids[row]))[:n_alternatives]
            values = [float(v) for v in logprobs[row, : len(names)]]
            # The chosen token is one of the alternatives 90% of the time, else outside the top k.
            if rng.random() < 0.9:
                pick = int(rng.integers(0, len(names)))
                token, token_logprob = names[pick], values[pick]
            else:
                token, token_logprob = pool[int(rng.integers(0, len(pool)))], values[-1] - 1.0
            tokens.append(token)
            token_logprobs.append(token_logprob)
            pairs = list(zip(names, values, strict=True))
            if shuffled:  # vLLM-like: the lists are not in probability order
                pairs = [pairs[i] for i in rng.permutation(len(pairs))]
            tops.append(dict(pairs))
            offsets.append(offset)
            offset += len(token)
        choices.append(
            {
                "text": "".join(tokens),
                "index": index,
                "finish_reason": "length",
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": tops,
                    "text_offset": offsets,
                },
            }
        )
    body = {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": "bench",
        "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": n_tokens, "total_tokens": n_tokens + 5},
    }
    return json.dumps(body)


def naive_frames(body: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plain per-token loop: one dict per row, then one DataFrame per frame."""
    token_rows = []
    alternative_rows = []
    for choice in body["choices"]:
        logprobs = choice["logprobs"]
        for position, token in enumerate(logprobs["tokens"]):
            logprob = logprobs["token_logprobs"][position]
            token_rows.append(
                {
                    "index": choice["index"],
                    "position": position,
                    "token": token,
                    "logprob": logprob,
                    "prob": math.exp(logprob),
                    "text_offset": logprobs["text_offset"][position],
                }
            )
            for alternative, alt_logprob in (logprobs["top_logprobs"][position] or {}).items():
                alternative_rows.append(
                    {
                        "index": choice["index"],
                        "position": position,
                        "token": alternative,
                        "logprob": alt_logprob,
                        "prob": math.exp(alt_logprob),
                        "chosen": alternative == token,
                    }
                )
    return pd.DataFrame(token_rows), pd.DataFrame(alternative_rows)


def append_rows(body: dict[str, Any], max_tokens: int) -> int:
    """Row-appending with df.loc on the first max_tokens tokens; returns how many tokens it did."""
    tokens_frame = pd.DataFrame(
        columns=["index", "position", "token", "logprob", "prob", "text_offset"]
    )
    alternatives_frame = pd.DataFrame(
        columns=["index", "position", "token", "logprob", "prob", "chosen"]
    )
    done = 0
    logprobs = body["choices"][0]["logprobs"]
    for position, token in enumerate(logprobs["tokens"][:max_tokens]):
        logprob = logprobs["token_logprobs"][position]
        tokens_frame.loc[len(tokens_frame)] = [
            0,
            position,
            token,
            logprob,
            math.exp(logprob),
            logprobs["text_offset"][position],
        ]
        for alternative, alt_logprob in logprobs["top_logprobs"][position].items():
            alternatives_frame.loc[len(alternatives_frame)] = [
                0,
                position,
                alternative,
                alt_logprob,
                math.exp(alt_logprob),
                alternative == token,
            ]
        done += 1
    return done


def timed(function: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--alternatives", type=int, default=5)
    parser.add_argument("--choices", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--shuffled",
        action="store_true",
        help="top_logprobs dicts in random order (vLLM-like) instead of sorted",
    )
    parser.add_argument(
        "--append-tokens",
        type=int,
        default=200,
        help="tokens for the df.loc row-append baseline (0 to skip)",
    )
    args = parser.parse_args(argv)

    payload = make_payload(args.tokens, args.alternatives, args.choices, shuffled=args.shuffled)
    body = json.loads(payload)
    payload_bytes = payload.encode("utf-8")  # what arrives on the wire
    n_tokens = sum(len(c["logprobs"]["tokens"]) for c in body["choices"])
    n_alternatives = sum(len(d) for c in body["choices"] for d in c["logprobs"]["top_logprobs"])
    print(f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}")
    print(f"response parser: {JSON_PARSER}")
    print(
        f"payload: {len(payload) / 1e6:.1f} MB, {len(body['choices'])} choices, "
        f"{n_tokens:,} tokens, {n_alternatives:,} alternatives "
        f"({'shuffled' if args.shuffled else 'sorted'} lists); {args.repeats} repeats"
    )

    _, tokens_frame, alternatives_frame = to_frames(body)  # warm-up, and a sanity check
    if len(tokens_frame) != n_tokens or len(alternatives_frame) != n_alternatives:
        raise SystemExit("to_frames lost rows: the benchmark would measure the wrong thing")

    times: dict[str, list[float]] = {
        "json.loads": [],
        "to_frames": [],
        "bytes->frames": [],
        "naive loop": [],
    }
    for _ in range(args.repeats):  # interleaved, so machine load hits every contender alike
        times["json.loads"].append(timed(lambda: json.loads(payload_bytes)))
        times["to_frames"].append(timed(lambda: to_frames(body)))
        times["bytes->frames"].append(timed(lambda: to_frames(loads(payload_bytes))))
        times["naive loop"].append(timed(lambda: naive_frames(body)))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{name:>12}: median {medians[name] * 1e3:8.1f} ms   "
            f"(runs: {', '.join(f'{v * 1e3:.0f}' for v in values)})"
        )

    if args.append_tokens:
        start = time.perf_counter()
        done = append_rows(body, args.append_tokens)
        elapsed = time.perf_counter() - start
        extrapolated = elapsed / done * n_tokens
        medians["df.loc append (extrapolated)"] = extrapolated
        print(
            f"df.loc append: {elapsed:.2f} s for {done} tokens -> about {extrapolated:.0f} s for "
            f"{n_tokens:,} tokens (linear extrapolation, one run)"
        )

    frames_vs_json = medians["to_frames"] / medians["json.loads"]
    naive_vs_frames = medians["naive loop"] / medians["to_frames"]
    floor = medians["bytes->frames"] / medians["json.loads"]
    print(
        f"bytes->frames ({JSON_PARSER} + to_frames) / stdlib json.loads of the bytes = "
        f"{floor:.2f}  (target < 1): {'OK' if floor < 1 else 'MISSED'}"
    )
    print(
        f"to_frames / json.loads = {frames_vs_json:.2f}  (target <= 1.5): "
        f"{'OK' if frames_vs_json <= 1.5 else 'MISSED'}"
    )
    print(
        f"naive loop / to_frames = {naive_vs_frames:.1f}  (target >= 5): "
        f"{'OK' if naive_vs_frames >= 5 else 'MISSED'}"
    )
    if args.append_tokens:
        print(
            f"df.loc append (extrapolated) / to_frames = "
            f"{medians['df.loc append (extrapolated)'] / medians['to_frames']:.0f}"
        )


if __name__ == "__main__":
    main()
