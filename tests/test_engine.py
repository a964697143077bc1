"""The generation engine: every sampling rule checked by what it does, on the shipped model (when
its weights are built) and on a tiny random model (always)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nbcompletions import CompletionRequest, RequestError
from nbcompletions.model import load_engine
from nbcompletions.model._engine import DecodeBatch, Engine
from nbcompletions.model._gpt2 import forward_full
from nbcompletions.model._rows import Row
from nbcompletions.model._sampling import adjust_logits, sample

PROMPT = "To be, or not to be"


def run(engine: Engine, **fields: Any) -> dict[str, Any]:
    fields.setdefault("prompt", PROMPT)
    response = engine.complete(CompletionRequest(**fields))
    json.dumps(response, allow_nan=False)  # never NaN or Infinity on the wire
    return response


def no_eot(engine: Engine, **bias: float) -> dict[str, float]:
    """A logit_bias that bans end-of-text, so completions run their full length."""
    return {str(engine.eot_token_id): -100, **bias}


def texts(response: dict[str, Any]) -> list[str]:
    return [c["text"] for c in response["choices"]]


def greedy_ids(engine: Engine, prompt: str, steps: int, banned: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding by hand from our own full forward pass (no cache, no engine)."""
    ids = engine.encode(prompt)
    out: list[int] = []
    for _ in range(steps):
        logits = forward_full(engine.weights, np.array([ids + out]))[0, -1].astype(np.float64)
        logits[list(banned)] = -np.inf
        out.append(int(np.argmax(logits)))
    return out


# -- sampling rules -------------------------------------------------------------------------------


def test_greedy_is_the_argmax_of_our_forward(engine: Engine) -> None:
    response = run(engine, temperature=0, max_tokens=8, logprobs=0, logit_bias=no_eot(engine))
    want = greedy_ids(engine, PROMPT, 8, banned=(engine.eot_token_id,))
    choice = response["choices"][0]
    assert choice["logprobs"]["tokens"] == [engine.token_str(t) for t in want]
    assert choice["text"] == engine.decode(want)
    assert choice["finish_reason"] == "length"


def test_logprobs_are_the_raw_model_distribution(engine: Engine) -> None:
    ids = engine.encode(PROMPT)
    logits = forward_full(engine.weights, np.array([ids]))[0, -1].astype(np.float64)
    raw = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    forced = int(np.argsort(logits)[len(logits) // 2])  # a middling token, forced by the bias
    response = run(engine, max_tokens=1, logprobs=3, temperature=0.5, logit_bias={str(forced): 100})
    lp = response["choices"][0]["logprobs"]
    assert lp["tokens"] == [engine.token_str(forced)]
    # Reported before bias and temperature: the model's own probability of the forced token.
    assert lp["token_logprobs"][0] == pytest.approx(raw[forced], abs=1e-4)
    top = lp["top_logprobs"][0]
    assert len(top) == 4  # the 3 most likely plus the sampled one
    best = np.argsort(-raw)[:3]
    for t in best:
        assert top[engine.token_str(int(t))] == pytest.approx(raw[t], abs=1e-4)


def test_banned_token_never_appears(engine: Engine) -> None:
    favourite = greedy_ids(engine, PROMPT, 1)[0]
    fields = dict(n=60, max_tokens=3, temperature=0.7, logprobs=0, seed=7)
    free = run(engine, **fields)
    banned = run(engine, logit_bias={str(favourite): -100}, **fields)
    fav = engine.token_str(favourite)

    def first_tokens(r: dict[str, Any]) -> list[str]:
        return [c["logprobs"]["tokens"][0] for c in r["choices"] if c["logprobs"]["tokens"]]

    assert fav in first_tokens(free)  # the most likely token does come up without the ban ...
    assert all(fav not in c["logprobs"]["tokens"] for c in banned["choices"])  # ... never with it


def test_banning_every_token_is_refused_and_one_left_is_always_picked(engine: Engine) -> None:
    """With every token banned there is nothing to sample: a 400 naming logit_bias, not a banned
    token (the sampler's NaNs picked the vocabulary's last one). One token left is picked every
    time, greedy or sampled, plain or with logprobs."""
    every = {str(t): -100 for t in range(engine.vocab_size)}
    for fields in ({}, {"temperature": 0}, {"logprobs": 2}, {"stream": True}):
        with pytest.raises(RequestError, match="bans every token") as info:
            run(engine, n=2, max_tokens=3, logit_bias=every, **fields)
        assert info.value.param == "logit_bias"
    # Nothing is sampled at max_tokens 0: the echo is still scored.
    echoed = run(engine, max_tokens=0, echo=True, logprobs=0, logit_bias=every)
    assert echoed["choices"][0]["text"] == PROMPT
    kept = engine.encode("J")[-1]
    one_left = {key: bias for key, bias in every.items() if key != str(kept)}
    for fields in ({}, {"temperature": 0}, {"logprobs": 2}):
        response = run(engine, n=3, max_tokens=4, seed=5, logit_bias=one_left, **fields)
        assert [c["text"] for c in response["choices"]] == [engine.token_str(kept) * 4] * 3


def test_plus_100_bias_forces_a_token(engine: Engine) -> None:
    target = engine.encode(" be")[-1]
    response = run(engine, n=4, max_tokens=5, seed=3, logprobs=0, logit_bias={str(target): 100})
    for choice in response["choices"]:
        assert choice["logprobs"]["tokens"] == [engine.token_str(target)] * 5


def test_frequency_and_presence_penalties_reduce_repeats(engine: Engine) -> None:
    prompt = "the the the the the the the the the the"

    def repeats(**penalty: float) -> int:
        r = run(
            engine,
            prompt=prompt,
            temperature=0,
            max_tokens=24,
            logprobs=0,
            logit_bias=no_eot(engine),
            **penalty,
        )
        tokens = r["choices"][0]["logprobs"]["tokens"]
        return len(tokens) - len(set(tokens))

    plain = repeats()
    assert plain >= 3  # greedy decoding of a repetitive prompt repeats itself
    assert repeats(frequency_penalty=2.0) < plain
    assert repeats(presence_penalty=2.0) < plain


def test_penalty_formula_is_openais() -> None:
    logits = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    counts = np.array([[0.0, 1.0, 3.0, 0.0]])
    bias = np.array([0.0, 0.0, 0.0, -np.inf])
    mu = adjust_logits(logits, bias, counts, frequency_penalty=0.5, presence_penalty=0.25)
    # mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
    np.testing.assert_allclose(mu[0, :3], [1.0, 2.0 - 0.5 - 0.25, 3.0 - 1.5 - 0.25])
    assert mu[0, 3] == -np.inf
    rng = np.random.Generator(np.random.PCG64(0))
    assert set(sample(np.repeat(mu, 200, axis=0), 1.0, 1.0, rng).tolist()) <= {0, 1, 2}


def test_tiny_top_p_is_greedy(engine: Engine) -> None:
    greedy = run(engine, temperature=0, max_tokens=10)
    for seed in (1, 2, 3):
        assert texts(run(engine, temperature=1.0, top_p=1e-9, max_tokens=10, seed=seed)) == texts(
            greedy
        )


def test_top_p_keeps_sampling_inside_the_nucleus(engine: Engine) -> None:
    ids = engine.encode(PROMPT)
    logits = forward_full(engine.weights, np.array([ids]))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = {
        engine.token_str(int(t))
        for t in order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1]
    }
    response = run(engine, n=60, max_tokens=1, top_p=0.5, seed=11, logprobs=0, logit_bias={})
    seen = {c["logprobs"]["tokens"][0] for c in response["choices"] if c["logprobs"]["tokens"]}
    assert seen <= nucleus


def test_seed_reproducible_and_different_seeds_differ(engine: Engine) -> None:
    fields = dict(n=3, max_tokens=12, temperature=1.0, logit_bias=no_eot(engine))
    a = texts(run(engine, seed=42, **fields))
    assert texts(run(engine, seed=42, **fields)) == a
    others = [texts(run(engine, seed=s, **fields)) for s in (43, 44)]
    assert any(o != a for o in others)
    assert texts(run(engine, seed=-5, **fields)) == texts(run(engine, seed=-5, **fields))


def _boundary_stop(engine: Engine) -> tuple[str, str]:
    """A greedy completion and a stop string that spans the boundary between two of its tokens."""
    response = run(engine, temperature=0, max_tokens=12, logprobs=0, logit_bias=no_eot(engine))
    tokens = response["choices"][0]["logprobs"]["tokens"]
    full = response["choices"][0]["text"]
    for i in [*range(2, len(tokens) - 1), 0, 1]:  # prefer a cut after a few tokens
        left, right = tokens[i], tokens[i + 1]
        if left and right and not left.startswith("bytes:") and not right.startswith("bytes:"):
            stop = left[-1] + right[0]
            # It must span the boundary where it first occurs.
            first = full.find(stop)
            offset = sum(len(t) for t in tokens[: i + 1])
            if first == offset - 1:
                return full, stop
    pytest.skip("no two neighbouring text tokens in the greedy completion")


def test_stop_across_token_boundary_is_cut(engine: Engine) -> None:
    full, stop = _boundary_stop(engine)
    response = run(
        engine,
        temperature=0,
        max_tokens=12,
        logprobs=0,
        stop=[stop, "\x00never"],
        logit_bias=no_eot(engine),
    )
    choice = response["choices"][0]
    assert choice["text"] == full[: full.find(stop)]
    assert stop not in choice["text"]
    assert choice["finish_reason"] == "stop"
    # The logprobs keep the tokens that started before the cut: the token holding the stop's start.
    assert "".join(choice["logprobs"]["tokens"]).startswith(choice["text"])


def test_stop_is_never_half_emitted_while_streaming(engine: Engine) -> None:
    full, stop = _boundary_stop(engine)
    fields: dict[str, Any] = dict(
        prompt=PROMPT, temperature=0, max_tokens=12, logit_bias=no_eot(engine)
    )
    emitted = ""
    for chunk in engine.stream(CompletionRequest(stream=True, stop=stop, **fields)):
        emitted += chunk["choices"][0]["text"]
        assert stop[0] not in emitted[len(full[: full.find(stop)]) :]
    assert emitted == full[: full.find(stop)]
    # A stop string that starts matching but never completes is held back, then released in full.
    decoy = stop[0] + "\x00"
    emitted = "".join(
        c["choices"][0]["text"]
        for c in engine.stream(CompletionRequest(stream=True, stop=decoy, **fields))
    )
    assert emitted == full


def test_best_of_returns_highest_mean_logprob_candidates(engine: Engine) -> None:
    fields = dict(max_tokens=6, temperature=1.0, seed=5, logprobs=0, logit_bias=no_eot(engine))
    pool = run(engine, n=5, **fields)["choices"]  # the same 5 candidates best_of=5 draws
    means = [float(np.mean(c["logprobs"]["token_logprobs"])) for c in pool]
    ranked = [pool[i]["text"] for i in np.argsort(means, kind="stable")[::-1]]
    best = run(engine, n=2, best_of=5, **fields)
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert texts(best) == ranked[:2]
    assert best["usage"]["completion_tokens"] == 5 * 6  # every candidate's tokens count


def test_best_of_with_several_prompts_reindexes_per_prompt(engine: Engine) -> None:
    response = run(
        engine, prompt=["To be", "Now is the winter"], n=2, best_of=3, max_tokens=4, seed=1
    )
    assert [c["index"] for c in response["choices"]] == [0, 1, 2, 3]


def test_echo_with_logprobs(engine: Engine) -> None:
    response = run(engine, echo=True, logprobs=2, max_tokens=4, seed=0)
    choice = response["choices"][0]
    lp = choice["logprobs"]
    n_prompt = len(engine.encode(PROMPT))
    assert choice["text"].startswith(PROMPT)
    assert lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][:n_prompt]) == PROMPT
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert lp["text_offset"][:n_prompt] == [
        len(engine.decode(engine.encode(PROMPT)[:i])) for i in range(n_prompt)
    ]


def test_max_tokens_zero_with_echo_scores_the_prompt(engine: Engine) -> None:
    response = run(engine, echo=True, logprobs=1, max_tokens=0)
    choice = response["choices"][0]
    ids = engine.encode(PROMPT)
    assert choice["text"] == PROMPT
    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert response["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }
    # The prompt's logprobs are the model's conditional log-probabilities.
    logits = forward_full(engine.weights, np.array([ids]))[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = [logp[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], want, atol=1e-4)


@pytest.mark.parametrize("as_ids", [False, True])
def test_prompts_times_n_index_layout(engine: Engine, as_ids: bool) -> None:
    words = ["To be", "Now is the winter of", "O Romeo"]  # different lengths: a ragged batch
    prompts: list[Any] = [engine.encode(w) for w in words] if as_ids else words
    response = run(
        engine, prompt=prompts, n=3, temperature=0, max_tokens=5, logit_bias=no_eot(engine)
    )
    choices = response["choices"]
    assert [c["index"] for c in choices] == list(range(9))
    for p, prompt in enumerate(prompts):
        alone = texts(
            run(engine, prompt=prompt, temperature=0, max_tokens=5, logit_bias=no_eot(engine))
        )[0]
        assert [c["text"] for c in choices[p * 3 : (p + 1) * 3]] == [alone] * 3
    prompt_tokens = sum(len(engine.encode(w)) for w in words)
    assert response["usage"]["prompt_tokens"] == prompt_tokens
    assert response["usage"]["completion_tokens"] == 9 * 5


def test_text_offset_counts_prompt_then_completion(engine: Engine) -> None:
    response = run(engine, logprobs=0, max_tokens=8, seed=2, logit_bias=no_eot(engine))
    lp = response["choices"][0]["logprobs"]
    offsets = lp["text_offset"]
    assert offsets[0] == len(PROMPT)  # OpenAI starts at len(prompt) even without echo
    assert offsets == sorted(offsets)
    for i, token in enumerate(lp["tokens"][:-1]):
        if not token.startswith("bytes:") and not lp["tokens"][i + 1].startswith("bytes:"):
            assert offsets[i + 1] - offsets[i] == len(token)


def test_partial_utf8_tokens_are_bytes_strings(tiny_engine: Engine) -> None:
    prompt = "日本語 €"
    response = run(tiny_engine, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    lp = response["choices"][0]["logprobs"]
    partial = [t for t in lp["tokens"] if t.startswith("bytes:")]
    assert partial
    assert all(t.startswith("bytes:\\x") or t.startswith("bytes: \\x") for t in partial)
    raw = b"".join(tiny_engine.vocab.token_bytes[i] for i in tiny_engine.encode(prompt))
    assert raw.decode("utf-8") == response["choices"][0]["text"] == prompt


def test_end_of_text_finishes_with_stop(engine: Engine) -> None:
    response = run(engine, max_tokens=5, logprobs=0, logit_bias={str(engine.eot_token_id): 100})
    choice = response["choices"][0]
    assert choice["text"] == ""
    assert choice["finish_reason"] == "stop"
    # The end token is not text, but the logprobs list it (as OpenAI and vLLM do).
    assert choice["logprobs"]["tokens"] == ["<|endoftext|>"]
    assert response["usage"]["completion_tokens"] == 1


def test_empty_prompt_starts_from_end_of_text(engine: Engine) -> None:
    response = run(engine, prompt="", max_tokens=3, temperature=0, logit_bias=no_eot(engine))
    from_eot = run(
        engine, prompt=[engine.eot_token_id], max_tokens=3, temperature=0, logit_bias=no_eot(engine)
    )
    assert texts(response) == texts(from_eot)
    assert response["usage"]["prompt_tokens"] == 1


def test_logprobs_zero_gives_only_the_sampled_token(engine: Engine) -> None:
    response = run(engine, logprobs=0, max_tokens=4, seed=1)
    lp = response["choices"][0]["logprobs"]
    for token, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert list(top) == [token]


# -- streaming -------------------------------------------------------------------------------------


def test_stream_concatenates_to_the_completion(engine: Engine) -> None:
    fields: dict[str, Any] = dict(n=2, max_tokens=10, seed=9, logprobs=1, echo=True, stop="e,")
    whole = run(engine, **fields)
    got: dict[int, str] = {}
    logprobs: dict[int, dict[str, list[Any]]] = {}
    finish: dict[int, str] = {}
    chunks = list(
        engine.stream(
            CompletionRequest(
                prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **fields
            )
        )
    )
    for chunk in chunks[:-1]:
        json.dumps(chunk, allow_nan=False)
        assert chunk["usage"] is None
        (choice,) = chunk["choices"]
        i = choice["index"]
        got[i] = got.get(i, "") + choice["text"]
        merged = logprobs.setdefault(i, {})
        for key, values in choice["logprobs"].items():
            assert len(values) == len(choice["logprobs"]["tokens"])
            merged.setdefault(key, []).extend(values)
        if choice["finish_reason"]:
            assert i not in finish
            finish[i] = choice["finish_reason"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]
    for c in whole["choices"]:
        assert got[c["index"]] == c["text"]
        assert logprobs[c["index"]] == c["logprobs"]  # tokens, logprobs, alternatives, offsets
        assert finish[c["index"]] == c["finish_reason"]


def test_stream_validation_errors_raise_before_the_first_chunk(engine: Engine) -> None:
    with pytest.raises(RequestError) as info:
        engine.stream(CompletionRequest(prompt=PROMPT, stream=True, suffix="tail"))
    assert info.value.param == "suffix"


# -- errors ----------------------------------------------------------------------------------------


def test_errors_name_the_field(engine: Engine) -> None:
    ctx, vocab = engine.context_length, engine.vocab_size
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(suffix=" and that"), "suffix"),
        (dict(max_tokens=ctx), "max_tokens"),
        (dict(prompt=[1, 2, vocab]), "prompt"),
        (dict(prompt=[[1], [vocab + 5]]), "prompt"),
        (dict(logit_bias={str(vocab): 5}), "logit_bias"),
        # A lone surrogate ("\\ud800" is valid JSON) cannot be encoded as UTF-8 to tokenize.
        (dict(prompt="To \ud800be"), "prompt"),
        (dict(prompt=["To be", "\udfff"]), "prompt"),
    ]
    for fields, param in cases:
        with pytest.raises(RequestError) as info:
            run(engine, **fields)
        assert info.value.param == param
    with pytest.raises(RequestError, match=rf"{ctx}.*{len(engine.encode(PROMPT)) + ctx}"):
        run(engine, max_tokens=ctx)


def test_a_prompt_too_long_by_its_bytes_alone_is_refused_before_tokenizing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 900 KB prompt took ~100 MB and seconds to tokenize only to be refused for the context
    (40 such batch lines grew the server 1.7 GB under --max-memory-mb 128): text of more bytes
    than the context holds at the longest token's bytes each is refused before tokenizing."""
    ctx, vocab = engine.context_length, engine.vocab
    longest = vocab.tokenizer.longest_token_bytes
    assert longest == max(len(piece) for piece in vocab.token_bytes)
    for text in (PROMPT * 40, "a" * 3000, "ä€😀 x" * 500, "<|endoftext|>" * 30):
        assert len(engine.encode(text)) >= vocab.fewest_tokens(len(text.encode())) > 0

    def no_tokenizing(text: str) -> list[int]:
        raise AssertionError("tokenized")

    monkeypatch.setattr(vocab.tokenizer, "encode", no_tokenizing)
    for prompt in ("a" * (ctx * longest + 1), ["To be", "€" * 1_000_000]):
        with pytest.raises(RequestError) as info:
            run(engine, prompt=prompt, max_tokens=1)
        assert info.value.param == "prompt"
        assert f"maximum context length is {ctx} tokens" in str(info.value)
    with pytest.raises(AssertionError, match="tokenized"):  # one byte less: it might fit
        run(engine, prompt="a" * (ctx * longest), max_tokens=1)


def test_concurrent_requests_are_independent(engine: Engine) -> None:
    fields = dict(n=2, max_tokens=8, seed=21, logprobs=1)
    want = texts(run(engine, **fields))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: texts(run(engine, **fields)), range(8)))
    assert results == [want] * 8


def test_response_envelope(engine: Engine) -> None:
    response = run(engine, max_tokens=2)
    assert response["id"].startswith("cmpl-")
    assert response["object"] == "text_completion"
    assert response["model"] == engine.model_id
    assert response["system_fingerprint"].startswith("nbc-")
    assert isinstance(response["created"], int)
    assert run(engine, max_tokens=2)["id"] != response["id"]


def test_shipped_engine_identity(tmp_path: Path) -> None:
    engine = load_engine()
    assert engine.model_id == "nbc-shakespeare"
    assert engine.token_str(engine.eot_token_id) == "<|endoftext|>"


# -- stop strings, property-based ------------------------------------------------------------------

pieces = st.lists(
    st.sampled_from(["a", "b", "ab", "ba", " ", "é", "\xe2", "\x82\xac", "\xc3"]),
    min_size=1,
    max_size=12,
)


@pytest.mark.slow
@given(
    parts=pieces,
    stops=st.lists(st.text(alphabet="ab é€", min_size=1, max_size=3), min_size=1, max_size=4),
)
@example(parts=["\xe2", "\x82\xac", "a", "a"], stops=["a", "€aa"])  # "a" completes first
@example(parts=[" ", "ba"], stops=["b", " ba"])  # one token completes both: "b" ends first
@settings(max_examples=300, deadline=None)
def test_streamed_release_never_leaks_a_stop(parts: list[str], stops: list[str]) -> None:
    """Whatever the tokens and stop strings, the streamed text is the final text, and no emitted
    prefix ever holds a stop string or text past the final cut."""
    plan = SimpleNamespace(max_tokens=len(parts), stops=stops)
    row = Row(0, 0, plan)  # type: ignore[arg-type]  # a stand-in plan: only two fields read
    emitted = ""
    snapshots = []
    released = 0
    for token, piece in enumerate(parts, start=1):
        row.add(token, piece.encode("latin-1"), -1.0, None, eot=0)
        delta, first, end = row.release()
        assert first == released
        released = end
        emitted += delta
        snapshots.append(emitted)
        assert not any(stop in emitted for stop in stops)
        if row.finished:
            break
    assert row.finished
    assert emitted == row.final_text
    assert all(row.final_text.startswith(snapshot) for snapshot in snapshots)
    assert released == row.kept_tokens
    whole = b"".join(p.encode("latin-1") for p in parts).decode("utf-8", errors="replace")
    assert whole.startswith(row.final_text)
    # Generation stops as soon as a stop string is complete: the one whose first occurrence ends
    # first wins (a longer stop that would start earlier but end later never completes).
    found = [(whole.find(s) + len(s), whole.find(s)) for s in stops if s in whole]
    if found and row.finish_reason == "stop":
        first_end = min(end for end, _ in found)
        cut = min(start for end, start in found if end == first_end)
        assert row.final_text == whole[:cut]


# -- continuous batching ---------------------------------------------------------------------------

#: Requests that differ in everything a batch could mix up: prompt lengths, n, best_of, sampler,
#: penalties, stop strings, echo, logprobs, max_tokens.
BATCHED_REQUESTS: list[dict[str, Any]] = [
    dict(prompt=PROMPT, n=3, max_tokens=12, seed=1, logprobs=2),
    dict(prompt="HAMLET:\n", max_tokens=20, seed=2, temperature=0.7, top_p=0.9),
    dict(prompt=["O", "To be, or not"], n=2, max_tokens=6, seed=3, echo=True, logprobs=1),
    dict(prompt="the the the", max_tokens=9, seed=4, frequency_penalty=1.5, presence_penalty=0.5),
    dict(prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0, stop=["e,", "\n"]),
    dict(prompt="ROMEO:", best_of=3, n=2, max_tokens=5, seed=5),
    dict(prompt="Whether", max_tokens=0, echo=True, logprobs=3),
]


def _comparable(response: dict[str, Any]) -> list[tuple[Any, ...]]:
    out = []
    for c in response["choices"]:
        lp = c["logprobs"]
        tokens = lp and lp["tokens"]
        values = lp and [v for v in lp["token_logprobs"] if v is not None]
        out.append((c["index"], c["text"], c["finish_reason"], tokens, values))
    return out


def _assert_same_completion(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["usage"] == want["usage"]
    for g, w in zip(_comparable(got), _comparable(want), strict=True):
        assert g[:4] == w[:4]  # index, text, finish_reason, tokens: exactly the same
        if w[4] is not None:
            # The logits of a row come out of a bigger matmul when others share the batch: the
            # same up to float32 rounding, never a different token.
            assert g[4] == pytest.approx(w[4], abs=1e-4)


def test_each_request_gets_the_same_completion_alone_or_batched_with_others(
    engine: Engine,
) -> None:
    alone = [run(engine, **fields) for fields in BATCHED_REQUESTS]
    jobs = [engine.job(CompletionRequest(**fields), stream=False) for fields in BATCHED_REQUESTS]
    batch = DecodeBatch(engine)
    # Staggered: requests join a batch that is already decoding, and rows of every length mix.
    batch.admit(jobs[:2])
    batch.step()
    batch.step()
    batch.admit(jobs[2:5])
    batch.step()
    assert batch.rows > sum(len(job.rows) for job in jobs[:2])  # they really decode together
    batch.admit(jobs[5:])
    while batch.jobs:
        batch.step()
    assert all(job.done for job in jobs)
    for job, want in zip(jobs, alone, strict=True):
        _assert_same_completion(job.response(), want)
    assert batch.rows == 0


def test_streamed_jobs_in_a_shared_batch_give_the_streams_they_give_alone(engine: Engine) -> None:
    requests = [
        CompletionRequest(stream=True, stream_options={"include_usage": True}, **fields)
        for fields in BATCHED_REQUESTS
        if "best_of" not in fields
    ]
    alone = [list(engine.stream(request)) for request in requests]
    jobs = [engine.job(request, stream=True) for request in requests]
    batch = DecodeBatch(engine)
    got: list[list[dict[str, Any]]] = [[] for _ in jobs]
    batch.admit(jobs)
    while True:
        for i, job in enumerate(jobs):
            got[i].extend(job.take())
        if not batch.jobs:
            break
        batch.step()

    def text_and_finish(chunks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [
            (c["index"], c["text"], c["finish_reason"], c["logprobs"] and c["logprobs"]["tokens"])
            for chunk in chunks
            for c in chunk["choices"]
        ]

    for mine, theirs in zip(got, alone, strict=True):
        assert text_and_finish(mine) == text_and_finish(theirs)
        assert mine[-1]["usage"] == theirs[-1]["usage"]


def test_a_removed_job_stops_at_once_and_the_others_carry_on(engine: Engine) -> None:
    keep_fields: dict[str, Any] = dict(
        prompt=PROMPT, n=2, max_tokens=10, seed=11, logit_bias=no_eot(engine)
    )
    want = run(engine, **keep_fields)
    keep = engine.job(CompletionRequest(**keep_fields), stream=False)
    drop = engine.job(
        CompletionRequest(prompt="ROMEO:", n=4, max_tokens=40, logit_bias=no_eot(engine)),
        stream=False,
    )
    batch = DecodeBatch(engine)
    batch.admit([drop, keep])
    batch.step()
    batch.step()
    assert drop.steps == 2
    assert batch.rows == 6
    batch.remove(drop)
    assert batch.rows == 2  # its rows left the batch before any further step
    while batch.jobs:
        batch.step()
    assert drop.steps == 2
    assert not drop.done
    _assert_same_completion(keep.response(), want)


def test_work_and_memory_of_a_job_follow_the_budget_formula(engine: Engine) -> None:
    request = CompletionRequest(prompt=[[1, 2, 3], [4]], n=2, best_of=3, max_tokens=5)
    job = engine.job(request, stream=False)
    assert job.work_tokens == 3 * (3 + 5) + 3 * (1 + 5)
    config = engine.weights.config
    per_position = config.n_layer * 2 * config.n_embd * 4
    assert engine.kv_bytes_per_position == per_position
    assert job.memory_bytes == job.work_tokens * per_position + 6 * engine.row_bytes


@pytest.mark.parametrize("tiny", [5e-324, 1e-300, 1e-101])
def test_a_temperature_too_small_to_divide_by_is_greedy_on_every_path(
    engine: Engine, tiny: float
) -> None:
    # The compiled sampler divided by it (overflow: the last token, 'bunes', over and over).
    for fields in ({}, {"logprobs": 2}, {"n": 2}):
        want = run(engine, temperature=0, max_tokens=6, seed=3, **fields)
        got = run(engine, temperature=tiny, max_tokens=6, seed=3, **fields)
        assert texts(got) == texts(want)
