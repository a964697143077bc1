"""The package's own imports: no cycles, and layers that import one way (STYLE.md, principle 1).

Read from the source with `ast`, so every import counts: module level, inside functions (lazy) and
under ``TYPE_CHECKING``. A new module must be given its layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbcompletions

PACKAGE = Path(nbcompletions.__file__).parent

#: Layers, lowest first; a module may import its own layer and the layers below it.
LAYERS: dict[str, int] = {
    # protocol: types, request side, response side, secrets, errors and their normalisation
    "_version": 0,
    "_checks": 0,
    "_types": 0,
    "_errors": 0,
    "_request": 0,
    "_chat": 0,
    "_parse": 0,
    "_gc_pause": 0,
    "_corrections": 0,
    "_secrets": 0,
    "_retry": 0,
    "_usage": 0,
    # the embedded model and our server sit on the protocol alone (checked below too)
    "model": 1,
    "server": 1,
    # talking to an endpoint: transport, one response, frames, scoring and endpoint checks
    "_loop": 2,
    "_transport": 2,
    "_streaming": 2,
    "_completion": 2,
    "_frames": 2,
    "_chat_frames": 2,
    "_visible": 2,
    "_endpoint": 2,
    "_settings": 2,
    "_client": 2,
    "_scoring": 2,
    "_reply_scoring": 2,
    "_chat_conformance": 2,
    "_conformance": 2,
    "_conformance_checks": 2,
    "_conformance_report": 2,
    "_conformance_consequences": 2,
    "_model_card": 2,
    "_conformance_sampling": 2,
    "_conformance_accounting": 2,
    "_profiles": 2,
    "_governance": 2,
    # studies: plan, run, store, analyse
    "_grid": 3,
    "_sweep": 3,
    "_sweep_result": 3,
    "_batch": 3,
    "_batch_file": 3,
    "_batch_ledger": 3,
    # the sweep's stages: plan, source, sender, sink, finish (and the dataset and frames they use)
    "sweeps": 3,
    "_cache": 3,
    "_columns": 3,
    "metrics": 3,
    "_compare": 3,
    "_manifest": 3,
    # what people see
    "plots": 4,
    "widgets": 4,
    # entry points
    "__init__": 5,
    "__main__": 5,
    "_cli": 5,
}
#: What the server and the model may import besides themselves.
SERVER_MAY_IMPORT = {"_checks", "_errors", "_request", "_parse", "_secrets", "_types", "model"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, modules: set[str]) -> list[str]:
    if node.level == 0:
        if not (node.module or "").startswith("nbcompletions"):
            return []
        base = node.module or ""
    else:
        anchor = module.split(".")
        if not is_package:
            anchor.pop()
        if node.level > 1:
            anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:
        # `from . import _sampling` imports a module; `from ._app import create_app` a name.
        submodule = f"{base}.{alias.name}"
        targets.append(submodule if submodule in modules else base)
    return targets


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``nbcompletions.server._app`` and so on)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        module = _module_name(path)
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                edges.update(_resolve(module, path.name == "__init__.py", node, modules))
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("nbcompletions."))
        edges.discard(module)
        graph[module] = {e for e in edges if e in modules}
    return graph


def _unit(module: str) -> str:
    """The layer unit: a top-level module, or a subpackage as a whole."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "nbcompletions._parse" in graph["nbcompletions._frames"]
    assert "nbcompletions._request" in graph["nbcompletions.server._app"]
    assert "nbcompletions.model._kernels" in graph["nbcompletions.model._sampling"]  # from . import
    assert "nbcompletions.model._plan" in graph["nbcompletions.model._engine"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_every_module_has_a_layer() -> None:
    units = {_unit(module) for module in import_graph()}
    missing = sorted(units - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_layers_import_one_way() -> None:
    wrong = []
    for module, targets in import_graph().items():
        unit = _unit(module)
        for target in targets:
            other = _unit(target)
            if other == unit:
                continue
            if LAYERS.get(other, 0) > LAYERS.get(unit, 0):
                wrong.append(f"{module} -> {target}")
            elif unit in ("server", "model") and other not in SERVER_MAY_IMPORT:
                wrong.append(f"{module} -> {target} (the server and model use the protocol only)")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))
