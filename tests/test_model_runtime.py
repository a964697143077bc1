"""The numpy GPT-2: the cache, ragged batches, the pure functions (parity: test_model_reference)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from model_fixture import build_tiny_model

from nbcompletions.model import FILES_DIR, load_engine
from nbcompletions.model._gpt2 import (
    KVCache,
    Linear,
    forward,
    forward_full,
    gelu_erf,
    gelu_tanh,
    linear,
    load_weights,
    log_softmax,
    normalise,
)
from nbcompletions.model._tokenizer import REMEMBERED_CHARS, ByteTokenizer, token_display


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module", params=["tiny", "shipped"])
def model_dir(request: pytest.FixtureRequest, tiny_dir: Path) -> Path:
    if request.param == "tiny":
        return tiny_dir
    return FILES_DIR


def _ids(vocab: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


# Parity with transformers' logits: tests/test_model_reference.py (a recorded reference always,
# live under NBC_TORCH_PYTHON), so this file needs no torch.


def test_cached_decoding_equals_full_forward(model_dir: Path) -> None:
    weights = load_weights(model_dir)
    steps = min(40, weights.config.n_positions)
    ids = _ids(weights.config.vocab_size, (3, steps), seed=1)
    full = forward_full(weights, ids)
    cache = KVCache.empty(weights.config, 3, steps)
    parts = [forward(weights, ids[:, :10], cache)]
    parts += [forward(weights, ids[:, t : t + 1], cache) for t in range(10, steps)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4, rtol=0)


def test_ragged_rows_decode_like_separate_runs(tiny_dir: Path) -> None:
    """Prompts of different lengths share a decode batch; each row must see only its own past."""
    weights = load_weights(tiny_dir)
    short, long_ = (
        _ids(weights.config.vocab_size, (1, 5), 2),
        _ids(weights.config.vocab_size, (1, 11), 3),
    )
    sources = []
    for prompt in (short, long_):
        cache = KVCache.empty(weights.config, 1, prompt.shape[1])
        forward(weights, prompt, cache)
        sources.append((cache, 2))
    batch = KVCache.stack(sources, capacity=20)
    nxt = np.array([[7], [8], [9], [10]])
    got = forward(weights, nxt, batch)[:, 0]  # (4, V)
    for row, (prompt, token) in enumerate([(short, 7), (short, 8), (long_, 9), (long_, 10)]):
        want = forward_full(weights, np.concatenate([prompt, [[token]]], axis=1))[0, -1]
        np.testing.assert_allclose(got[row], want, atol=1e-4, rtol=0)
    # Dropping rows keeps the survivors' caches intact.
    kept = batch.select(np.array([1, 3]))
    got2 = forward(weights, np.array([[11], [12]]), kept)[:, 0]
    want2 = forward_full(weights, np.concatenate([long_, [[10, 12]]], axis=1))[0, -1]
    np.testing.assert_allclose(got2[1], want2, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 40])
def test_linear_equals_the_plain_matmul(rows: int) -> None:
    """Every batch size gives x @ w + b, with the leading axes folded into one matmul."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((300, 520)).astype(np.float32)
    b = rng.standard_normal(520).astype(np.float32)
    x = rng.standard_normal((rows, 1, 300)).astype(np.float32)
    got = linear(x, Linear.of(w, b))
    assert got.shape == (rows, 1, 520)
    np.testing.assert_allclose(got, x @ w + b, atol=1e-4, rtol=1e-5)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """The textbook layer norm, as reference: normalise over the last axis, scale and shift."""
    centered = x - x.mean(axis=-1, keepdims=True)
    out: np.ndarray = centered / np.sqrt((centered**2).mean(axis=-1, keepdims=True) + eps) * g + b
    return out


def test_normalise_is_layer_norm_over_sqrt_d() -> None:
    """The forward pass's layer norm leaves scale, shift and sqrt(D) to the next layer's weights."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 2, 256)) * 4 + 7).astype(np.float32)
    g, b = np.ones(256, np.float32), np.zeros(256, np.float32)
    np.testing.assert_allclose(normalise(x, 1e-5) * 16.0, layer_norm(x, g, b, 1e-5), atol=1e-5)


def test_log_softmax_is_stable_and_normalised() -> None:
    x = np.array([[1000.0, 0.0, -1000.0], [1e-3, 2e-3, 3e-3]], np.float32)
    out = log_softmax(x)
    assert np.isfinite(out[:, :2]).all()
    np.testing.assert_allclose(np.exp(out).sum(axis=-1), 1.0, rtol=1e-6)
    assert out[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert out[0, 1] == pytest.approx(-1000.0, rel=1e-6)


def test_gelu_variants_match_their_formulas() -> None:
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    tanh_ref = [
        0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
        for v in x.tolist()
    ]
    erf_ref = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()]
    np.testing.assert_allclose(gelu_tanh(x), tanh_ref, atol=1e-6)
    np.testing.assert_allclose(gelu_erf(x), erf_ref, atol=1e-6)


def test_tokenizer_bytes_round_trip_and_partial_utf8(tiny_dir: Path) -> None:
    tok = ByteTokenizer.from_file(tiny_dir / "tokenizer.json")
    text = "To be, or not — café 日本語 €!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes[i] for i in ids) == text.encode("utf-8")
    assert tok.token_strings[tok.token_id("<|endoftext|>") or 0] == "<|endoftext|>"
    partial = [tok.token_strings[i] for i in ids if tok.token_strings[i].startswith("bytes:")]
    assert partial, "the fixture text must produce tokens that are partial UTF-8"
    assert token_display(b"\xe2\x80") == "bytes:\\xe2\\x80"
    assert token_display(b" \xe6") == "bytes: \\xe6"
    assert token_display("é".encode()) == "é"


def test_the_tokenizer_remembers_recent_texts_and_hands_out_copies(tiny_dir: Path) -> None:
    """A chat's template is counted and then planned: the second encode is remembered, and
    what a caller does to the list it got never reaches the next caller."""
    tok = ByteTokenizer.from_file(tiny_dir / "tokenizer.json")
    text = "USER: Who art thou?\nASSISTANT:"
    direct = list(tok.tokenizer.encode(text, add_special_tokens=False).ids)
    first = tok.encode(text)
    first.append(-1)
    assert tok.encode(text) == direct
    assert tok._remembered.cache_info().hits == 1
    long_text = "word " * (REMEMBERED_CHARS // 5 + 1)  # too long to keep: encoded each time
    assert tok.encode(long_text) == list(tok.tokenizer.encode(long_text).ids)
    assert tok._remembered.cache_info().currsize == 1


def test_load_engine_is_lazy_and_cached(tiny_dir: Path) -> None:
    code = (
        "import sys, nbcompletions, nbcompletions.model as m; "
        "assert 'nbcompletions.model._engine' not in sys.modules; "
        "assert 'safetensors' not in sys.modules; assert not m._engines; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    first = load_engine(tiny_dir)
    assert load_engine(str(tiny_dir)) is first
    assert first.vocab_size == 320
    assert first.context_length == 64


def test_load_engine_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_engine(tmp_path)


@pytest.mark.slow
def test_inference_runs_without_torch(tiny_dir: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from nbcompletions import CompletionRequest\n"
        "from nbcompletions.model import load_engine\n"
        f"engine = load_engine({str(tiny_dir)!r})\n"
        "out = engine.complete(CompletionRequest(prompt='To be', max_tokens=3, logprobs=1))\n"
        "assert out['usage']['prompt_tokens'] > 0\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


_WITHOUT_NUMBA = """
import json, sys
sys.modules["numba"] = None  # `import numba` now raises ImportError, as where it is not installed
import nbcompletions as nbc
from nbcompletions.model import _kernels, load_engine
assert not _kernels.available() and load_engine().packed is None
client = nbc.Client(embedded=True)
done = client.complete("ROMEO:", max_tokens=8, seed=1, n=3, logprobs=2)
print(json.dumps({"texts": [c["text"] for c in done.raw["choices"]],
                  "logprobs": done.tokens["logprob"].tolist()}))
"""


@pytest.mark.slow
def test_without_numba_a_completion_runs_in_numpy_and_matches() -> None:
    """numba is the `fast` extra: where it does not import, the public client's embedded
    completion runs on the numpy forward pass, says nothing about compiling, and gives the same
    texts (and logprobs to float32 rounding) as this process, compiled or not."""
    import json

    import nbcompletions as nbc

    if not (FILES_DIR / "model.safetensors").exists():
        pytest.skip("the embedded model's weights are not built yet")
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_NUMBA],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiling" not in done.stderr
    got = json.loads(done.stdout)
    expected = nbc.Client(embedded=True).complete("ROMEO:", max_tokens=8, seed=1, n=3, logprobs=2)
    assert got["texts"] == [c["text"] for c in expected.raw["choices"]]
    assert got["logprobs"] == pytest.approx(expected.tokens["logprob"].tolist(), abs=1e-4)


@pytest.mark.slow
def test_a_slow_load_says_so_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tiny_dir: Path
) -> None:
    import time

    from nbcompletions.model import _engine, _notice
    from nbcompletions.model._gpt2 import read_tensors
    from nbcompletions.model._kernels import available

    real_read = read_tensors

    def slow_read(path: Path) -> Any:
        time.sleep(0.5)  # as a compile would, or a loaded machine
        return real_read(path)

    monkeypatch.setattr(_notice, "LOAD_NOTICE_AFTER_S", 0.05)
    monkeypatch.setattr(_engine, "read_tensors", slow_read)
    _engine.Engine.from_dir(tiny_dir, compiled=False)
    err = capfd.readouterr().err
    assert err.startswith(_notice.LOAD_NOTICE + "\n")
    assert "nbcompletions: the embedded model is ready (0." in err
    _engine.Engine.from_dir(tiny_dir)
    notice = _notice.COMPILE_NOTICE if available() else _notice.LOAD_NOTICE
    assert capfd.readouterr().err.startswith(notice + "\n")


def test_a_quick_load_says_nothing(capfd: pytest.CaptureFixture[str], tiny_dir: Path) -> None:
    from nbcompletions.model import _engine

    _engine.Engine.from_dir(tiny_dir, compiled=False)  # milliseconds: a tiny model
    assert capfd.readouterr().err == ""


def test_load_engine_says_it_once(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """load_engine announces from before numba's import; the from_dir inside says nothing more."""
    import time

    from nbcompletions.model import _engine, _notice
    from nbcompletions.model._gpt2 import read_tensors

    folder = build_tiny_model(tmp_path)
    real_read = read_tensors

    def slow_read(path: Path) -> Any:
        time.sleep(0.5)
        return real_read(path)

    monkeypatch.setattr(_notice, "LOAD_NOTICE_AFTER_S", 0.05)
    monkeypatch.setattr(_engine, "read_tensors", slow_read)
    load_engine(folder)
    err = capfd.readouterr().err
    assert err.count("nbcompletions: loading the embedded model") == 1, err
    assert err.count("is ready") == 1, err
