"""The embedded model: a small GPT-2 trained on Shakespeare, run in numpy.

``load_engine()`` returns the `Engine` that serves Completions requests. Nothing heavy happens at
import: the weights load on the first ``load_engine()`` call for a given folder, and later calls for
the same folder return the same engine.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ._engine import Engine

__all__ = ["FILES_DIR", "MODEL_ID", "Engine", "load_engine"]

#: The model id that responses and /v1/models carry.
MODEL_ID = "nbc-shakespeare"
#: Where the shipped files live: config.json, model.safetensors, tokenizer.json, README.md.
FILES_DIR = Path(__file__).resolve().parent / "files"

_engines: dict[Path, Engine] = {}
_lock = threading.Lock()


def load_engine(path: str | Path | None = None) -> Engine:
    """The engine for the model files in ``path`` (default: the shipped model); loads once per dir.

    Raises FileNotFoundError naming the folder when its files are missing.
    """
    folder = FILES_DIR if path is None else Path(path).resolve()
    with _lock:
        engine = _engines.get(folder)
        if engine is None:
            missing = [
                name
                for name in ("config.json", "model.safetensors", "tokenizer.json")
                if not (folder / name).is_file()
            ]
            if missing:
                raise FileNotFoundError(f"model files missing in {folder}: {', '.join(missing)}")
            from ._engine import Engine

            engine = Engine.from_dir(folder, model_id=MODEL_ID if folder == FILES_DIR else None)
            _engines[folder] = engine
    return engine


def __getattr__(name: str) -> object:
    if name == "Engine":
        from ._engine import Engine

        return Engine
    raise AttributeError(f"module 'nbcompletions.model' has no attribute {name!r}")
