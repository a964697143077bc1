"""The compiled decode step (model/_kernels.py) against the numpy forward pass it replaces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nbcompletions import CompletionRequest
from nbcompletions.model import FILES_DIR, _kernels
from nbcompletions.model._engine import DecodeBatch, Engine
from nbcompletions.model._gpt2 import KVCache, forward

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="numba is not installed")


@pytest.fixture(scope="module", params=["tiny", "shipped"])
def model_dir(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Path:
    if request.param == "tiny":
        return tiny_model_dir
    if not (FILES_DIR / "model.safetensors").exists():
        pytest.skip("the embedded model's weights are not built yet")
    return FILES_DIR


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> tuple[Engine, Engine]:
    """The same model twice: compiled decode steps, and numpy only."""
    compiled = Engine.from_dir(model_dir, threads=1)
    plain = Engine.from_dir(model_dir, compiled=False)
    assert compiled.packed is not None
    assert plain.packed is None
    return compiled, plain


def _prefilled(engine: Engine, ids: np.ndarray, lengths: list[int]) -> KVCache:
    """A cache whose row b holds the first lengths[b] tokens of ids[b] (ragged rows)."""
    config = engine.weights.config
    cache = KVCache.empty(config, len(ids), ids.shape[1] + 1)
    for b, n in enumerate(lengths):
        one = KVCache.empty(config, 1, ids.shape[1] + 1)
        forward(engine.weights, ids[b : b + 1, :n], one)
        for layer in range(config.n_layer):
            cache.k[layer][b] = one.k[layer][0]
            cache.v[layer][b] = one.v[layer][0]
        cache.lengths[b] = n
    return cache


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_decode_step_matches_the_numpy_forward_pass(
    engines: tuple[Engine, Engine], rows: int
) -> None:
    compiled, _ = engines
    packed = compiled.packed
    assert packed is not None
    rng = np.random.default_rng(rows)
    ids = rng.integers(0, compiled.vocab_size, (rows, 12))
    lengths = [int(n) for n in rng.integers(1, 12, rows)]  # ragged: each row at its own position
    tokens = ids[np.arange(rows), lengths]
    reference = _prefilled(compiled, ids, lengths)
    expected = forward(compiled.weights, tokens[:, None], reference)[:, 0]  # numpy, (rows, V)

    start = _prefilled(compiled, ids, lengths)
    k, v = np.stack(start.k), np.stack(start.v)  # (L, rows, H, capacity, K)
    logits = np.full((rows, compiled.vocab_size), np.nan, np.float32)
    _kernels.decode(packed, tokens, k, v, start.lengths, logits, 0, rows)

    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * max(scale, 1.0))
    # The new key and value land where the numpy pass puts them.
    for layer in range(compiled.weights.config.n_layer):
        np.testing.assert_allclose(k[layer], reference.k[layer], rtol=0, atol=1e-5)
        np.testing.assert_allclose(v[layer], reference.v[layer], rtol=0, atol=1e-5)
    assert (start.lengths == lengths).all()  # the caller advances lengths, not the step


def test_a_rows_result_does_not_depend_on_the_batch(engines: tuple[Engine, Engine]) -> None:
    """Bit for bit: a row decoded alone, in a batch of 7 or in a split batch: the same logits."""
    compiled, _ = engines
    packed = compiled.packed
    assert packed is not None
    rng = np.random.default_rng(7)
    rows = 7
    ids = rng.integers(0, compiled.vocab_size, (rows, 10))
    lengths = [int(n) for n in rng.integers(1, 10, rows)]
    tokens = ids[np.arange(rows), lengths]
    cache = _prefilled(compiled, ids, lengths)

    def step(ranges: list[tuple[int, int]]) -> np.ndarray:
        k, v = np.stack(cache.k), np.stack(cache.v)
        logits = np.empty((rows, compiled.vocab_size), np.float32)
        for lo, hi in ranges:
            _kernels.decode(packed, tokens, k, v, cache.lengths, logits, lo, hi)
        return logits

    together = step([(0, rows)])
    assert np.array_equal(step([(r, r + 1) for r in range(rows)]), together)
    assert np.array_equal(step([(0, 3), (3, rows)]), together)


def _requests(engine: Engine) -> list[CompletionRequest]:
    ban = {str(engine.eot_token_id): -100}
    return [
        CompletionRequest(prompt="To be", max_tokens=12, temperature=0, logprobs=3, echo=True),
        CompletionRequest(prompt="O Romeo", max_tokens=10, n=3, seed=4, logprobs=2, logit_bias=ban),
        CompletionRequest(prompt=["Now is", "the winter"], max_tokens=6, temperature=0, logprobs=1),
    ]


def _logprobs(response: dict[str, Any]) -> list[float]:
    return [
        v for c in response["choices"] for v in c["logprobs"]["token_logprobs"] if v is not None
    ]


def test_engine_output_matches_numpy_decoding(engines: tuple[Engine, Engine]) -> None:
    compiled, plain = engines
    for request in _requests(compiled):
        fast, slow = compiled.complete(request), plain.complete(request)
        assert [c["text"] for c in fast["choices"]] == [c["text"] for c in slow["choices"]]
        np.testing.assert_allclose(_logprobs(fast), _logprobs(slow), rtol=0, atol=1e-4)
        json.dumps(fast, allow_nan=False)


@pytest.mark.slow
def test_threads_split_rows_without_changing_a_number(model_dir: Path) -> None:
    one = Engine.from_dir(model_dir, threads=1)
    three = Engine.from_dir(model_dir, threads=3)
    for request in _requests(one):
        first, second = one.complete(request), three.complete(request)
        assert first["choices"] == second["choices"]
    # Twelve rows over three threads (four each) and over four (three each): both compiled.
    four = Engine.from_dir(model_dir, threads=4)
    request = CompletionRequest(prompt="To be", n=12, max_tokens=5, seed=1, logprobs=0)
    assert three.complete(request)["choices"] == four.complete(request)["choices"]
    # Through a batch as the server runs it: two jobs sharing the step, each as it was alone.
    # Two jobs sharing the steps as the server runs them (15 rows), split four and eight ways.
    other = CompletionRequest(prompt="O Romeo", n=3, max_tokens=8, seed=2, logprobs=0)
    outcomes = []
    for engine in (four, Engine.from_dir(model_dir, threads=8)):
        jobs = [engine.job(request, stream=False), engine.job(other, stream=False)]
        DecodeBatch(engine).run(jobs)
        outcomes.append([job.response()["choices"] for job in jobs])
    assert outcomes[0] == outcomes[1]


def test_models_the_step_cannot_run_keep_the_numpy_path(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """float32 weights (or another activation): no compiled step, same answers."""
    from safetensors.numpy import load_file, save_file

    f32 = tmp_path / "f32"
    shutil.copytree(tiny_model_dir, f32)
    tensors = load_file(str(f32 / "model.safetensors"))
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(f32 / "model.safetensors"))
    engine = Engine.from_dir(f32)
    assert engine.packed is None
    request = CompletionRequest(prompt="To be", max_tokens=6, temperature=0)
    assert (
        engine.complete(request)["choices"][0]["text"]
        == (Engine.from_dir(tiny_model_dir).complete(request)["choices"][0]["text"])
    )

    relu = tmp_path / "relu"
    shutil.copytree(tiny_model_dir, relu)
    config = json.loads((relu / "config.json").read_text())
    config["activation_function"] = "relu"
    (relu / "config.json").write_text(json.dumps(config))
    assert Engine.from_dir(relu).packed is None


def test_compiled_sampling_picks_what_numpy_picks() -> None:
    """The same logits and draws give the same tokens (bans, temperatures, 1 or many rows)."""
    from nbcompletions.model import _sampling

    checked = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        rows = 1 + seed % 5
        mu = rng.standard_normal((rows, 512)) * (1 + seed % 7)
        mu[:, rng.integers(0, 512, 20)] = -np.inf  # banned tokens
        temperature = [0.3, 0.7, 1.0, 1.5][seed % 4]
        draws = np.random.default_rng(seed).random(rows)
        compiled = _kernels.sample_plain(mu, temperature, draws)
        assert compiled is not None
        z = np.exp(mu / temperature - (mu / temperature).max(axis=1, keepdims=True))
        cum = np.cumsum(z, axis=1)
        expected = _sampling._pick(cum, draws * cum[:, -1])
        assert compiled.tolist() == expected.tolist()
        # And through `sample`, which draws from the generator itself.
        through = _sampling.sample(mu, temperature, 1.0, np.random.default_rng(seed))
        assert through.tolist() == expected.tolist()
        checked += rows
    assert checked > 800
    # A row with no finite logit is left to numpy.
    assert _kernels.sample_plain(np.full((1, 8), -np.inf), 1.0, np.zeros(1)) is None


def test_sampling_the_batch_in_place_picks_what_the_copies_pick() -> None:
    """`sample_slots` reads float32 logits by slot and adds the bias itself: the same tokens as
    adjust_logits' float64 copy through `sample_plain`, with and without a bias."""
    from nbcompletions.model import _sampling

    for seed in range(200):
        rng = np.random.default_rng(seed)
        logits = (rng.standard_normal((9, 512)) * (1 + seed % 5)).astype(np.float32)
        slots = rng.permutation(9)[: 1 + seed % 8]
        bias = None
        if seed % 2:
            banned = {int(t): -100.0 for t in rng.integers(0, 512, 30)}
            bias = _sampling.bias_vector({**banned, 7: 3.5}, 512)
        temperature = [0.3, 0.7, 1.0, 1.5][seed % 4]
        draws = rng.random(len(slots))
        mu = _sampling.adjust_logits(logits[slots], bias, None, 0.0, 0.0)
        expected = _kernels.sample_plain(mu, temperature, draws)
        got = _kernels.sample_slots(logits, slots, bias, temperature, draws)
        assert got is not None
        assert expected is not None
        assert got.tolist() == expected.tolist()
    every = _sampling.bias_vector(dict.fromkeys(range(8), -100.0), 8)
    assert _kernels.sample_slots(np.zeros((1, 8), np.float32), np.zeros(1, np.int64), every, 1.0,
                                 np.zeros(1)) is None  # fmt: skip


def test_plain_jobs_sample_as_the_general_path_does(engine: Engine) -> None:
    """A job without penalties, cuts or logprobs samples through `sample_slots`; forcing it
    through the general path (copies, adjust_logits, sample) gives the same completions."""
    requests = [
        CompletionRequest(prompt="To be", n=5, max_tokens=12, seed=3, temperature=0.8),
        CompletionRequest(
            prompt=["O Romeo", "HAMLET:"], n=2, max_tokens=10, seed=4,
            logit_bias={str(engine.eot_token_id): -100, "11": 4},
        ),
    ]  # fmt: skip
    for request in requests:
        fast = engine.job(request, stream=False)
        general = engine.job(request, stream=False)
        assert fast.plain
        general.plain = False
        DecodeBatch(engine).run([fast])
        DecodeBatch(engine).run([general])
        assert fast.response()["choices"] == general.response()["choices"]
    for other in (
        {"logprobs": 0}, {"top_p": 0.9}, {"frequency_penalty": 0.5}, {"best_of": 2},
        {"temperature": 0},
    ):  # fmt: skip
        request = CompletionRequest(prompt="To be", max_tokens=3, **other)
        assert not engine.job(request, stream=False).plain


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "²"])
def test_a_bad_thread_count_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, value: str
) -> None:
    monkeypatch.setenv("NBC_THREADS", value)
    with pytest.raises(ValueError, match=r"NBC_THREADS must be an integer >= 1 .*got") as caught:
        Engine.from_dir(tiny_model_dir)
    assert repr(value) in str(caught.value)
    monkeypatch.delenv("NBC_THREADS")
    with pytest.raises(ValueError, match="threads must be an integer >= 1 or None; got 0"):
        Engine.from_dir(tiny_model_dir, threads=0)
    assert Engine.from_dir(tiny_model_dir, threads=3).threads == 3
