"""CPU per generated token at n=1: the embedded numpy model against llama.cpp on the same weights.

Run: ``python benchmarks/bench_vs_llamacpp.py [--tokens 128] [--rounds 5] [--baseline DIR]``

llama.cpp runs through llama-cpp-python in its own virtual environment: ``NBC_LLAMACPP_PYTHON``
names its interpreter, else ``.venv-llamacpp/bin/python`` at the checkout's root is used; without
either the benchmark says so and exits 0. The shipped model is converted to GGUF with f16 weights
(``tests/peers/to_gguf.py``, like ``convert_hf_to_gguf.py --outtype f16``).

Both sides run as long-lived worker processes and take turns, one completion each per round, so
they see the same load (measured side by side): ``--tokens`` tokens from the same prompt at
temperature 1 with the end-of-text token banned by logit_bias (every completion has exactly that
many tokens), one thread each (llama.cpp ``n_threads=1``; our engine limits BLAS to one thread).
Each completion's ``time.process_time()`` (the prefill included) is divided by its completion
tokens; the best of ``--rounds`` per side is compared (target: ours <= llama.cpp's).
``--baseline DIR`` adds a third worker running another checkout's engine (e.g. main), taking turns
with the other two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "HAMLET:\nTo be, or not to be,"

# Each worker reads one JSON line per round ({"seed": int}) and answers one JSON line.
_OURS = """
import json, sys, time
from nbcompletions import CompletionRequest
from nbcompletions.model import load_engine
engine = load_engine()
ban = {str(engine.eot_token_id): -100}
def run(seed):
    request = CompletionRequest(prompt=PROMPT, max_tokens=TOKENS, temperature=1.0, seed=seed,
                                logit_bias=ban)
    cpu = time.process_time()
    out = engine.complete(request)
    return time.process_time() - cpu, out["usage"]["completion_tokens"]
run(0)  # warm-up
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cpu, tokens = run(json.loads(line)["seed"])
    print(json.dumps({"cpu": cpu, "tokens": tokens}), flush=True)
"""

_LLAMA = """
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=GGUF, n_ctx=256, n_threads=1, n_threads_batch=1, n_batch=256,
            verbose=False, seed=1)
eot = llm.token_eos()
def run(seed):
    cpu = time.process_time()
    out = llm.create_completion(PROMPT, max_tokens=TOKENS, temperature=1.0, seed=seed,
                                logit_bias={eot: -100.0})
    return time.process_time() - cpu, out["usage"]["completion_tokens"]
run(0)  # warm-up
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cpu, tokens = run(json.loads(line)["seed"])
    print(json.dumps({"cpu": cpu, "tokens": tokens}), flush=True)
"""


def _llama_python() -> Path | None:
    named = os.environ.get("NBC_LLAMACPP_PYTHON")
    candidates = [Path(named).absolute()] if named else [ROOT / ".venv-llamacpp" / "bin" / "python"]
    return next((path for path in candidates if path.exists()), None)


class _Worker:
    def __init__(self, python: str, code: str, env: dict[str, str], cwd: str | Path) -> None:
        # `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH: each
        # worker starts in the checkout it measures, or the baseline would import this one.
        self.proc = subprocess.Popen(
            [python, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
        )
        self._read()  # {"ready": true} once loaded and warmed up

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def round(self, seed: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"seed": seed}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", help="another checkout to measure beside this one")
    args = parser.parse_args()
    llama_python = _llama_python()
    if llama_python is None:
        print("skipped: no llama-cpp-python (set NBC_LLAMACPP_PYTHON or make .venv-llamacpp)")
        return
    header = f"PROMPT = {PROMPT!r}\nTOKENS = {args.tokens}\n"
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "nbc-f16.gguf"
        subprocess.run(
            [
                str(llama_python),
                str(ROOT / "tests" / "peers" / "to_gguf.py"),
                str(ROOT / "nbcompletions" / "model" / "files"),
                str(gguf),
            ],
            check=True,
        )
        # One thread each: llama.cpp n_threads=1, our decode step unsplit (NBC_THREADS=1).
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NBC_THREADS": "1"}
        workers = {
            "ours": _Worker(sys.executable, header + _OURS, env, ROOT),
            "llama.cpp": _Worker(
                str(llama_python),
                header + f"GGUF = {str(gguf)!r}\n" + _LLAMA,
                dict(os.environ),
                tmp,
            ),
        }
        if args.baseline:
            base_env = {**env, "PYTHONPATH": str(Path(args.baseline).resolve())}
            workers["baseline"] = _Worker(
                sys.executable, header + _OURS, base_env, Path(args.baseline).resolve()
            )
        per_token: dict[str, list[float]] = {name: [] for name in workers}
        try:
            for seed in range(1, args.rounds + 1):
                for name, worker in workers.items():
                    got = worker.round(seed)
                    if got["tokens"] != args.tokens:
                        raise RuntimeError(f"{name} generated {got['tokens']} tokens")
                    per_token[name].append(got["cpu"] / got["tokens"])
        finally:
            for worker in workers.values():
                worker.close()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"{args.tokens} tokens at temperature 1, end-of-text banned, one thread each, "
        f"best of {args.rounds}, taking turns"
    )
    for name, values in per_token.items():
        spread = ", ".join(f"{v * 1e3:.2f}" for v in values)
        print(f"  {name:9s} CPU per token {min(values) * 1e3:.2f} ms (rounds: {spread})")
    ratio = min(per_token["ours"]) / min(per_token["llama.cpp"])
    print(f"  ours / llama.cpp f16 = {ratio:.2f}x (target <= 1)")
    if "baseline" in per_token:
        base = min(per_token["baseline"]) / min(per_token["llama.cpp"])
        print(f"  baseline / llama.cpp f16 = {base:.2f}x")


if __name__ == "__main__":
    main()
