"""The embedded model: a small GPT-2 trained on Shakespeare, run in numpy.

``load_engine()`` returns the `Engine` that serves Completions requests. Nothing heavy happens at
import: the weights load on the first ``load_engine()`` call for a given folder, and later calls for
the same folder return the same engine.

What other parts of the package may ask about a model id without loading the model:
``weights_fingerprint(model_id)`` (a digest of the weights, for cache keys) and
``count_tokens(model_id, text)`` (the tokenizer alone, for budget estimates) and
``vocab_size(model_id)`` (config.json alone). Each answers None for a model id that is not the
embedded model.

``render_chat(messages)`` writes a conversation in the model's chat template (`CHAT_TEMPLATE`, the
Jinja source that tokenizer_config.json carries for transformers and vLLM).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._checks import positive_int
from ._chat_template import CHAT_TEMPLATE, chat_messages, render_chat

if TYPE_CHECKING:  # pragma: no cover
    from ._engine import Engine

__all__ = [
    "CHAT_TEMPLATE",
    "FILES_DIR",
    "MODEL_ID",
    "Engine",
    "chat_messages",
    "count_tokens",
    "end_of_text_id",
    "load_engine",
    "render_chat",
    "trained_positions",
    "vocab_size",
    "weights_fingerprint",
]

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
            from ._notice import announced_load

            # Said from here, not only in from_dir: importing numba takes a second too.
            with announced_load():
                from ._engine import Engine

                model_id = MODEL_ID if folder == FILES_DIR else None
                engine = Engine.from_dir(folder, model_id=model_id)
            _engines[folder] = engine
    return engine


def weights_fingerprint(model_id: str | None) -> str | None:
    """16 hex digits of the SHA-256 of the embedded model's weights; None for any other model id.

    The embedded model keeps its id when it is retrained (or the package upgraded), so a cache of
    its answers needs this in its key. None also when the weights file is missing. The file is
    hashed once per size and modification time.
    """
    if model_id != MODEL_ID:
        return None
    path = FILES_DIR / "model.safetensors"
    try:
        stat = path.stat()
    except OSError:
        return None
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)[:16]


def count_tokens(model_id: str | None, text: str) -> int | None:
    """How many tokens the embedded model's tokenizer makes of ``text``; None for any other model.

    Loads only tokenizer.json (once), not the weights. None also when that file is missing.
    """
    if model_id != MODEL_ID:
        return None
    path = FILES_DIR / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = _load_tokenizer(str(path))
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def vocab_size(model_id: str | None) -> int | None:
    """The embedded model's vocabulary size (from config.json); None for any other model id."""
    if model_id != MODEL_ID:
        return None
    return _config_vocab_size(str(FILES_DIR / "config.json"))


def trained_positions(model_id: str | None) -> int | None:
    """The embedded model's trained context (config.json ``n_positions``); None for any other
    model id. A server that runs it past these positions reads outside its position table
    (llama.cpp asserts and exits)."""
    if model_id != MODEL_ID:
        return None
    return _config_field(str(FILES_DIR / "config.json"), "n_positions")


def end_of_text_id(model_id: str | None) -> int | None:
    """The embedded tokenizer's ``<|endoftext|>`` token id; None for any other model id."""
    if model_id != MODEL_ID:
        return None
    return _special_token_id(str(FILES_DIR / "tokenizer.json"), "<|endoftext|>")


@functools.lru_cache(maxsize=2)
def _config_vocab_size(path: str) -> int | None:
    return _config_field(path, "vocab_size")


@functools.lru_cache(maxsize=4)
def _config_field(path: str, field: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle).get(field)
    except (OSError, ValueError):
        return None
    return positive_int(value)


@functools.lru_cache(maxsize=2)
def _special_token_id(path: str, content: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as handle:
            added = json.load(handle).get("added_tokens")
    except (OSError, ValueError):
        return None
    for token in added if isinstance(added, list) else []:
        if isinstance(token, dict) and token.get("content") == content:
            found = token.get("id")
            return found if isinstance(found, int) and found >= 0 else None
    return None


@functools.lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the lru key, so a file replaced in place is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: str) -> Any:
    # Loaded once: the SweepBuilder widget re-estimates its budget on every keystroke.
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def __getattr__(name: str) -> object:
    if name == "Engine":
        from ._engine import Engine

        return Engine
    raise AttributeError(f"module 'nbcompletions.model' has no attribute {name!r}")
