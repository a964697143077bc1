"""How fast the plots are built for a long completion, and how much the browser has to take in.

    python benchmarks/bench_plots.py [--tokens 10000] [--png DIR]

A synthetic 10,000-token response with 5 logprobs per position goes through the real
``to_frames``; each plot is built (best of 3) and serialised with ``fig.to_json()`` (what Jupyter
sends to the browser). Side by side in the same run, ``plotly.express.line`` draws the same
probabilities with the same hover columns, as the baseline a user would reach for; the ratios are
ours / plotly express. ``--png DIR`` also renders the figures to PNG with kaleido (needs a Chrome:
Debian's ``chromium`` is found on PATH) and the highlight HTML with ``chromium --headless
--screenshot``, so they can be looked at.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nbcompletions import plots
from nbcompletions._frames import to_frames

VOCAB_SIZE = 50257
WORDS = [" the", " king", ",", " and", "\n", " thou", " art", " <b>", " &", " O", "ROMEO", ":"]


def synthetic_response(n_tokens: int, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """An OpenAI-shaped response with logprobs for n_tokens generated tokens."""
    rng = np.random.default_rng(seed)
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for _ in range(n_tokens):
        probs = np.sort(rng.dirichlet(np.full(k + 3, 0.5)))[::-1][:k]
        words = [str(w) for w in rng.choice(WORDS, size=k, replace=False)]
        top = {w: float(np.log(p)) for w, p in zip(words, probs, strict=True)}
        chosen = words[min(int(rng.geometric(0.6)) - 1, k - 1)]
        tokens.append(chosen)
        token_logprobs.append(top[chosen])
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(chosen)
    text = "".join(tokens)
    return {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "text": text,
                "finish_reason": "length",
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top_logprobs,
                    "text_offset": offsets,
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": n_tokens, "total_tokens": n_tokens + 1},
    }


def best_of(repeats: int, build: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = build()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--png", type=Path, default=None, help="render PNGs into this folder")
    args = parser.parse_args(argv)

    import plotly.express as px

    start = time.perf_counter()
    choices, tokens, alternatives = to_frames(
        synthetic_response(args.tokens),
        {"logprobs": 5, "n": 1, "prompt": "x"},
        vocab_size=VOCAB_SIZE,
    )
    print(
        f"to_frames: {args.tokens:,} tokens, {len(alternatives):,} alternatives in "
        f"{time.perf_counter() - start:.2f} s"
    )

    sweep_frame = choices.loc[choices.index.repeat(60)].reset_index(drop=True)
    rng = np.random.default_rng(1)
    sweep_frame["temperature"] = np.repeat(np.linspace(0, 2, 6), 10)
    sweep_frame["mean_logprob"] = -1 - sweep_frame["temperature"] + rng.normal(0, 0.2, 60)
    sweep_frame["error"] = None

    figures: dict[str, Callable[[], Any]] = {
        "token_probabilities": lambda: plots.token_probabilities(tokens),
        "token_probabilities svg": lambda: plots.token_probabilities(tokens, render_mode="svg"),
        "entropy": lambda: plots.entropy(tokens),
        "alternatives (max_positions=100)": lambda: plots.alternatives(alternatives),
        "rank_histogram": lambda: plots.rank_histogram(tokens),
        "mean_ci (60 rows)": lambda: plots.mean_ci(sweep_frame, x="temperature", y="mean_logprob"),
        "px.line baseline": lambda: px.line(
            tokens, x="position", y="prob", hover_data=["token", "logprob", "rank"], markers=True
        ),
    }
    print(f"\n{'figure':34} {'build s':>8} {'to_json s':>9} {'json KB':>9} {'trace':>10}")
    results: dict[str, tuple[float, float, int]] = {}
    built: dict[str, Any] = {}
    for name, build in figures.items():
        seconds, fig = best_of(3, build)
        json_seconds, payload = best_of(3, fig.to_json)
        results[name] = (seconds, json_seconds, len(payload))
        built[name] = fig
        print(
            f"{name:34} {seconds:8.3f} {json_seconds:9.3f} {len(payload) / 1024:9.0f} "
            f"{type(fig.data[0]).__name__:>10}"
        )

    html_seconds, page = best_of(3, lambda: plots.highlight(tokens, alternatives=alternatives))
    print(
        f"{'highlight (HTML, max 5000 tokens)':34} {html_seconds:8.3f} {'':9} "
        f"{len(page.html.encode()) / 1024:9.0f} {'html':>10}"
    )
    full_seconds, full_page = best_of(
        1, lambda: plots.highlight(tokens, alternatives=alternatives, max_positions=args.tokens)
    )
    print(
        f"{'highlight (all tokens)':34} {full_seconds:8.3f} {'':9} "
        f"{len(full_page.html.encode()) / 1024:9.0f} {'html':>10}"
    )

    ours, baseline = results["token_probabilities"], results["px.line baseline"]
    print(
        f"\nratios, token_probabilities / px.line (same {args.tokens:,} points, same hover "
        "columns):"
    )
    print(
        f"  build time {ours[0] / baseline[0]:.2f}x, to_json time {ours[1] / baseline[1]:.2f}x,"
        f" JSON size {ours[2] / baseline[2]:.2f}x"
    )
    svg = results["token_probabilities svg"]
    print(
        f"  WebGL / SVG JSON size {ours[2] / svg[2]:.2f}x (the browser cost is in the DOM: "
        "SVG makes one node per marker, WebGL none)"
    )
    trace = json.loads(built["token_probabilities"].to_json())["data"][0]

    def encoding(value: Any) -> str:
        return f"base64 {value['dtype']}" if isinstance(value, dict) else "a JSON list"

    print(
        f"  x travels as {encoding(trace['x'])}, y as {encoding(trace['y'])}, customdata as "
        f"{encoding(trace.get('customdata'))}"
    )

    if args.png is not None:
        render(args.png, built, page)
    return 0


def render(folder: Path, built: dict[str, Any], page: plots.HighlightedText) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import kaleido  # noqa: F401
    except ImportError:
        print("\nkaleido is not installed: pip install kaleido (and a Chrome/Chromium) for PNGs")
    else:
        for name in (
            "token_probabilities",
            "entropy",
            "alternatives (max_positions=100)",
            "rank_histogram",
            "mean_ci (60 rows)",
        ):
            target = folder / (name.split(" ")[0] + ".png")
            start = time.perf_counter()
            fig = built[name]
            if name.startswith("alternatives"):
                built[name].update_layout(width=900)
            fig.write_image(target, width=fig.layout.width or 1100, height=fig.layout.height or 500)
            print(f"wrote {target} in {time.perf_counter() - start:.1f} s")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium on PATH: the highlight screenshot is skipped")
        return
    with tempfile.TemporaryDirectory() as scratch:
        html_path = page.save(Path(scratch) / "highlight.html")
        target = folder / "highlight.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={target}",
                "--window-size=1100,900",
                html_path.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        print(f"wrote {target}")


if __name__ == "__main__":
    sys.exit(main())
