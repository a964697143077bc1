"""Follow a client through ``sweep()``: which of the package's modules it enters, and how often the
flow climbs back to a higher layer, in this checkout and in an older one, side by side.

Run: ``python benchmarks/walk_sweep.py --old /path/to/older/checkout`` (without ``--old``: this
checkout alone).

Each checkout runs, in its own process, one small sweep (2 prompts x 2 temperatures x 2 repeats,
probe on, a SQLite cache, then the same call again from the cache) against canned answers
(``httpx.MockTransport``: only the client side runs). ``sys.setprofile`` (and
``threading.setprofile`` for the event loop's thread) records every call into and return to a
function of ``nbcompletions``; the module that holds the innermost such frame is where the flow
is; code being loaded (a module's or a class's body, run by an import) is not the flow. The
layers are the checkout's own ``tests/test_layers.py`` (a subpackage is one unit).

A climb is a call from a module to one in a higher layer: a callback, a method of an object a
lower layer was handed (a protocol), a coroutine or callback run by the loop. A return from a
lower layer into the module that called down is not a climb, it ends a call down; these returns
are counted apart (the distinct calls down: how far a module reaches). Issue 18 counted both as
climbs ("climbs, as issue 18 counted"). An await that suspends (the chain of coroutines
unwinding to the event loop) and its resumption are not steps of the flow. Reported: the modules
entered, the distinct climbs and calls down (from -> to) and per module the climbs into it.
"""

from __future__ import annotations

import argparse
import ast
import dis
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
#: Code flags of frames that suspend (at await or yield) and resume later.
SUSPENDABLE = (
    inspect.CO_COROUTINE
    | inspect.CO_GENERATOR
    | inspect.CO_ASYNC_GENERATOR
    | inspect.CO_ITERABLE_COROUTINE
)


def layers_of(tree: Path) -> dict[str, int]:
    """``LAYERS`` of ``tree``'s tests/test_layers.py, read without importing it."""
    source = (tree / "tests" / "test_layers.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "LAYERS" for t in targets):
                assert node.value is not None
                layers: dict[str, int] = ast.literal_eval(node.value)
                return layers
    raise SystemExit(f"no LAYERS in {tree}/tests/test_layers.py")


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def canned(request: Any) -> Any:
    import httpx

    body = json.loads(request.content or b"{}")
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
    n = body.get("n") or 1
    tokens = [" a", " b"]
    choice = {
        "text": "".join(tokens),
        "finish_reason": "length",
        "logprobs": {
            "tokens": tokens,
            "token_logprobs": [-0.5, -0.7],
            "top_logprobs": [{" a": -0.5, " c": -1.0}, {" b": -0.7, " d": -1.2}],
            "text_offset": [0, 2],
        },
    }
    choices = [{**choice, "index": i} for i in range(n)]
    usage = {"prompt_tokens": 3, "completion_tokens": 2 * n, "total_tokens": 3 + 2 * n}
    return httpx.Response(200, json={"id": "c", "choices": choices, "usage": usage})


def walk() -> dict[str, Any]:
    """The walk of one checkout (the one on sys.path), in this process."""
    import httpx

    import nbcompletions as nbc

    steps: Counter[tuple[str, str, str]] = Counter()  # (from, to, "call" or "return")
    where: dict[int, str] = {}  # thread -> module the flow is in

    def module_of(frame: Any) -> str | None:
        """The client-side module of the innermost package function on the stack; None while
        a module is being imported (its body and what it calls: loading code, not the flow)."""
        while frame is not None:
            if not frame.f_code.co_flags & inspect.CO_OPTIMIZED:
                return None  # a module's or a class's body: run by an import
            name = frame.f_globals.get("__name__", "")
            client_side = ".server" not in name and ".model" not in name
            if name.startswith("nbcompletions.") and client_side:
                return str(name)
            frame = frame.f_back
        return None

    def suspended(frame: Any) -> bool:
        """A coroutine or generator frame stopped at a yield (an await), not returning."""
        if not frame.f_code.co_flags & SUSPENDABLE or frame.f_lasti < 0:
            return False
        return bool(dis.opname[frame.f_code.co_code[frame.f_lasti]] == "YIELD_VALUE")

    def profile(frame: Any, event: str, arg: Any) -> None:
        thread = threading.get_ident()
        if event == "return" and suspended(frame):
            where.pop(thread, None)  # to the event loop: the await chain unwinds, no flow
            return
        if event == "call":
            now = module_of(frame)
            resumed = frame.f_lasti >= 0 and bool(frame.f_code.co_flags & SUSPENDABLE)
        elif event == "return":
            now, resumed = module_of(frame.f_back), False
        else:
            return
        before = where.get(thread)
        if now is not None and now != before:
            if before is not None and not resumed:
                steps[(before, now, event)] += 1
            where[thread] = now

    client = nbc.Client("http://walk/v1", model="m", transport=httpx.MockTransport(canned))
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache.sqlite"
        grid: dict[str, Any] = {"prompt": ["To be", "Once"], "temperature": [0.5, 1.0]}
        threading.setprofile(profile)
        sys.setprofile(profile)
        try:
            for _ in range(2):  # sent, then answered from the cache
                nbc.sweep(
                    client, **grid, max_tokens=2, logprobs=1, repeats=2, cache=cache, progress=False
                )
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type,unused-ignore]  # None removes it
    client.close()
    return {"steps": [[a, b, kind, n] for (a, b, kind), n in steps.items()]}


def summarize(tree: Path, steps: list[list[Any]]) -> dict[str, Any]:
    layers = layers_of(tree)
    modules = {m for a, b, _, _ in steps for m in (a, b)}
    up = [
        (a, b, kind) for a, b, kind, _ in steps if layers.get(unit(b), 0) > layers.get(unit(a), 0)
    ]
    calls = sorted((a, b) for a, b, kind in up if kind == "call")
    returns = sorted((a, b) for a, b, kind in up if kind == "return")
    into = Counter(b for _, b, kind in up if kind == "call")
    into_counted = Counter(b for _, b, _ in up)
    return {
        "modules": sorted(modules),
        "calls": calls,
        "returns": returns,
        "into": into,
        "into_counted": into_counted,
    }


def run(tree: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import json, sys; sys.path.insert(0, sys.argv[1]); import walk_sweep as w; " \
        "print(json.dumps(w.walk()))"  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env=env,
        cwd=tempfile.gettempdir(),  # not inside a checkout: PYTHONPATH decides which is walked
        check=True,
        capture_output=True,
        text=True,
    )
    steps: list[list[Any]] = json.loads(out.stdout.strip().splitlines()[-1])["steps"]
    return summarize(tree, steps)


def short(module: str) -> str:
    return module.removeprefix("nbcompletions.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="an older checkout to walk beside this one")
    parser.add_argument("--verbose", action="store_true", help="list the climbs")
    args = parser.parse_args()
    trees = ([("old", args.old)] if args.old else []) + [("new", HERE)]
    walks = {name: run(tree) for name, tree in trees}
    names = [name for name, _ in trees]
    print("walk of a client through sweep() (2x2x2 grid, probe, cache; then the same call again)")
    print(f"{'':38}" + "".join(f"{name:>10}" for name in names))
    rows: list[tuple[str, Callable[[dict[str, Any]], int]]] = [
        ("modules entered", lambda w: len(w["modules"])),
        ("climbs (a lower layer calls up)", lambda w: len(w["calls"])),
        ("calls down (distinct from -> to)", lambda w: len(w["returns"])),
        ("climbs, as issue 18 counted (both)", lambda w: len(w["calls"]) + len(w["returns"])),
    ]
    for label, value in rows:
        print(f"{label:38}" + "".join(f"{value(walks[n]):>10}" for n in names))
    for key, label in (("into", "climbs into"), ("into_counted", "as counted, into")):
        for module in sorted({m for n in names for m in walks[n][key]}, key=short):
            counts = "".join(f"{walks[n][key].get(module, 0):>10}" for n in names)
            print(f"{'  ' + label + ' ' + short(module):38}" + counts)
    for name in names:
        print(f"{name} modules: " + " ".join(short(m) for m in walks[name]["modules"]))
        if args.verbose:
            for kind, what in (("calls", "climbs"), ("returns", "calls down")):
                for a, b in walks[name][kind]:
                    shown = (
                        f"{short(a)} -> {short(b)}"
                        if kind == "calls"
                        else f"{short(b)} -> {short(a)}"
                    )
                    print(f"  {name} {what}: {shown}")


if __name__ == "__main__":
    main()
