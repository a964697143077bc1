"""What the model package answers about a model id without loading it (for sweeps and widgets)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_weights

import nbcompletions.model as model_package
from nbcompletions.model import MODEL_ID, count_tokens, weights_fingerprint


def test_weights_fingerprint_is_a_digest_of_the_shipped_weights() -> None:
    needs_weights()
    weights = model_package.FILES_DIR / "model.safetensors"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert weights_fingerprint(MODEL_ID) == expected
    assert weights_fingerprint("gpt-3.5-turbo-instruct") is None
    assert weights_fingerprint(None) is None


def test_weights_fingerprint_follows_the_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    monkeypatch.setattr(model_package, "FILES_DIR", folder)
    assert weights_fingerprint(MODEL_ID) is None  # no weights: nothing to key a cache on
    (folder / "model.safetensors").write_bytes(b"weights one")
    first = weights_fingerprint(MODEL_ID)
    (folder / "model.safetensors").write_bytes(b"weights two, a different size")
    assert first == hashlib.sha256(b"weights one").hexdigest()[:16]
    assert (
        weights_fingerprint(MODEL_ID)
        == hashlib.sha256(b"weights two, a different size").hexdigest()[:16]
    )


def test_count_tokens_agrees_with_the_engine(embedded_engine: Any) -> None:
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    assert count_tokens(MODEL_ID, text) == len(embedded_engine.encode(text))
    assert count_tokens(MODEL_ID, "") == 0
    assert count_tokens("some-other-model", text) is None


def test_asking_loads_neither_numpy_model_nor_weights() -> None:
    # A budget estimate on every keystroke of the SweepBuilder must not load the model.
    code = (
        "import sys; from nbcompletions.model import MODEL_ID, count_tokens;"
        "assert count_tokens(MODEL_ID, 'To be') > 0;"
        "assert 'nbcompletions.model._engine' not in sys.modules;"
        "assert 'nbcompletions.model._gpt2' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
