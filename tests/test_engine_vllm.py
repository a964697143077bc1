"""The engine as a faithful peer (issue 9): the end-of-text token in the logprobs, and vLLM's
sampling fields top_k, min_p and repetition_penalty, each checked by what it does."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import numpy as np
import pytest

from nbcompletions import CompletionRequest, Limits, RequestError
from nbcompletions.model._engine import Engine
from nbcompletions.model._gpt2 import forward_full, log_softmax
from nbcompletions.model._sampling import adjust_logits, sample

PROMPT = "To be, or not to be"
EOT = "<|endoftext|>"


def run(engine: Engine, **fields: Any) -> dict[str, Any]:
    fields.setdefault("prompt", PROMPT)
    response = engine.complete(CompletionRequest(**fields, limits=Limits.vllm()))
    json.dumps(response, allow_nan=False)
    return response


def texts(response: dict[str, Any]) -> list[str]:
    return [c["text"] for c in response["choices"]]


# -- end of text in the logprobs ------------------------------------------------------------------
def test_echo_lists_a_generated_end_of_text_with_its_raw_logprob(engine: Engine) -> None:
    # lm-evaluation-harness scores with echo, max_tokens=1 and drops the last entry as "the token
    # generated": when that token is <|endoftext|> and is left out, it silently scores the wrong
    # token. Forced here with logit_bias; the logprob reported is the model's, before the bias.
    prompt_ids = engine.encode(PROMPT)
    force = {str(engine.eot_token_id): 100}
    response = run(engine, echo=True, logprobs=1, max_tokens=1, temperature=0, logit_bias=force)
    (choice,) = response["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT
    assert choice["finish_reason"] == "stop"
    assert len(lp["tokens"]) == len(prompt_ids) + 1
    assert lp["tokens"][-1] == EOT
    assert lp["text_offset"][-1] == len(PROMPT)
    raw = log_softmax(forward_full(engine.weights, np.array([prompt_ids]))[0, -1])
    assert lp["token_logprobs"][-1] == pytest.approx(float(raw[engine.eot_token_id]), abs=1e-4)
    assert lp["top_logprobs"][-1][EOT] == lp["token_logprobs"][-1]
    # What the harness keeps (token_logprobs[ctxlen:-1]) is the prompt's own scoring.
    scored = run(engine, echo=True, logprobs=1, max_tokens=0)
    assert lp["token_logprobs"][:-1] == scored["choices"][0]["logprobs"]["token_logprobs"]


def test_end_of_text_after_text_is_listed_where_the_text_ends(engine: Engine) -> None:
    # Sampled with end-of-text made likely: the first seed (of a fixed list) whose completion has
    # some text and then ends on end-of-text.
    eot = engine.eot_token_id
    found = None
    for seed in range(200):
        response = run(
            engine, prompt="", max_tokens=12, logprobs=0, seed=seed, logit_bias={str(eot): 8}
        )
        choice = response["choices"][0]
        if choice["finish_reason"] == "stop" and choice["text"]:
            found = seed
            break
    assert found is not None, "no seed ended on end-of-text after some text"
    lp = choice["logprobs"]
    assert lp["tokens"][-1] == EOT
    assert EOT not in lp["tokens"][:-1]
    assert lp["text_offset"][-1] == len(choice["text"])  # the empty prompt has no characters
    assert len(lp["tokens"]) == response["usage"]["completion_tokens"]
    # A stream of the same request carries the same logprobs.
    streamed = engine.stream(
        CompletionRequest(
            prompt="", max_tokens=12, logprobs=0, seed=found, logit_bias={str(eot): 8}, stream=True
        )
    )
    tokens = [
        t
        for chunk in streamed
        for c in chunk["choices"]
        if c["logprobs"]
        for t in c["logprobs"]["tokens"]
    ]
    assert tokens == lp["tokens"]


def test_a_stop_string_cut_lists_no_end_of_text(engine: Engine) -> None:
    response = run(engine, max_tokens=8, logprobs=0, temperature=0, stop=[" "])
    assert EOT not in response["choices"][0]["logprobs"]["tokens"]


# -- vLLM's samplers, by what they do --------------------------------------------------------------
def test_top_k_1_is_greedy_at_any_temperature(engine: Engine) -> None:
    greedy = run(engine, prompt=[PROMPT, "My lord"], max_tokens=8, temperature=0)
    for seed in (1, 2):
        sampled = run(
            engine,
            prompt=[PROMPT, "My lord"],
            max_tokens=8,
            temperature=1.5,
            seed=seed,
            extra={"top_k": 1},
        )
        assert texts(sampled) == texts(greedy)


def test_top_k_keeps_the_k_most_likely_tokens() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)) * 3
    top3 = np.argsort(-logits, axis=1)[:, :3]
    picks = np.stack([sample(logits, 1.0, 1.0, rng, top_k=3) for _ in range(400)], axis=1)
    for row in range(4):
        assert set(picks[row].tolist()) == set(top3[row].tolist())  # all three, nothing else


def test_min_p_drops_tokens_below_min_p_times_the_best() -> None:
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs)
    rng = np.random.default_rng(1)
    picks = {int(sample(logits, 1.0, 1.0, rng, min_p=0.25)[0]) for _ in range(500)}
    assert picks == {0, 1, 2}  # 0.05 < 0.25 * 0.5; 0.15 >= 0.125
    picks = {int(sample(logits, 1.0, 1.0, rng, min_p=1.0)[0]) for _ in range(50)}
    assert picks == {0}
    # min_p is measured after temperature, as vLLM applies it.
    hot = {int(sample(logits, 2.0, 1.0, rng, min_p=0.25)[0]) for _ in range(500)}
    assert hot == {0, 1, 2, 3}  # at T=2 p becomes ~sqrt(p): 0.05 is then 0.32 of the best, kept


def test_samplers_off_leave_the_random_stream_unchanged(engine: Engine) -> None:
    plain = run(engine, max_tokens=8, temperature=1.0, seed=7)
    off = run(
        engine,
        max_tokens=8,
        temperature=1.0,
        seed=7,
        extra={"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0},
    )
    minus_one = run(engine, max_tokens=8, temperature=1.0, seed=7, extra={"top_k": -1})
    assert texts(plain) == texts(off) == texts(minus_one)


def test_repetition_penalty_follows_vllm_and_transformers() -> None:
    logits = np.array([[2.0, -1.0, 0.5, 3.0]])
    seen = np.array([[True, True, False, False]])
    mu = adjust_logits(logits, None, None, 0.0, 0.0, seen=seen, repetition_penalty=2.0)
    # Seen tokens: a positive logit is divided, a negative one multiplied; unseen ones untouched.
    assert mu.tolist() == [[1.0, -2.0, 0.5, 3.0]]


# transformers' own processor, in a Python that has torch (the dev extra has none): one process,
# one JSON line per step in, the penalised argmax out.
_HF_PROCESSOR = """
import json, sys, torch, transformers
processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=float(sys.argv[1]))
for line in sys.stdin:
    step = json.loads(line)
    logits = torch.tensor([step["logits"]], dtype=torch.float64)
    scores = processor(torch.tensor([step["context"]]), logits)
    print(int(scores[0].argmax()), flush=True)
"""


def test_repetition_penalty_matches_transformers_greedy(engine: Engine) -> None:
    from test_model_reference import torch_python

    python = torch_python()  # skips (fails under NBC_REQUIRE_TORCH=1) without one
    ids = engine.encode(PROMPT)
    penalty = 1.8
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [python, "-c", _HF_PROCESSOR, str(penalty)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    out: list[int] = []
    try:
        for _ in range(10):
            context = ids + out
            logits = forward_full(engine.weights, np.array([context]))[0, -1].astype(np.float64)
            # Banned, as below, so all 10 tokens are text (JSON has no -inf: a huge negative).
            logits[engine.eot_token_id] = -1e30
            proc.stdin.write(json.dumps({"context": context, "logits": logits.tolist()}) + "\n")
            proc.stdin.flush()
            out.append(int(proc.stdout.readline()))
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()
    no_eot = {str(engine.eot_token_id): -100}
    response = run(
        engine,
        max_tokens=10,
        temperature=0,
        logit_bias=no_eot,
        extra={"repetition_penalty": penalty},
    )
    assert response["choices"][0]["text"] == engine.decode(out)
    plain = run(engine, max_tokens=10, temperature=0, logit_bias=no_eot)
    assert texts(plain) != texts(response)  # the penalty changed the greedy text


def test_the_engine_checks_sampler_ranges(engine: Engine) -> None:
    # The engine reads extra whatever the client's profile was: it checks the ranges itself.
    with pytest.raises(RequestError) as info:
        engine.complete(CompletionRequest(prompt="x", extra={"min_p": 3}))
    assert info.value.param == "min_p"


# -- prompt_logprobs ------------------------------------------------------------------------------
def test_prompt_logprobs_equal_the_echo_scoring_for_every_prompt(engine: Engine) -> None:
    prompts = [PROMPT, "O", "", "To be, or not to be"]
    scored = run(engine, prompt=prompts, echo=True, logprobs=2, max_tokens=0)
    listed = run(engine, prompt=prompts, max_tokens=2, n=2, seed=1, extra={"prompt_logprobs": 2})
    both = run(
        engine, prompt=prompts, echo=True, logprobs=2, max_tokens=0, extra={"prompt_logprobs": 0}
    )
    for p, prompt in enumerate(prompts):
        ids = engine.encode(prompt) or [engine.eot_token_id]
        echo = scored["choices"][p]["logprobs"]["token_logprobs"]
        for choice in (listed["choices"][2 * p], listed["choices"][2 * p + 1], both["choices"][p]):
            entries = choice["prompt_logprobs"]
            assert len(entries) == len(ids)
            assert entries[0] is None
            own = [entry[str(t)]["logprob"] for entry, t in zip(entries[1:], ids[1:], strict=True)]
            # An empty prompt is the end-of-text token alone: echoed as nothing, listed as [None].
            assert [None, *own] == (echo if prompt else [None])
        assert all(len(entry) == 1 for entry in both["choices"][p]["prompt_logprobs"][1:])


def test_prompt_logprobs_are_checked(engine: Engine) -> None:
    for value in (-1, 21, 2.5, True):
        with pytest.raises(RequestError) as info:
            run(engine, max_tokens=1, extra={"prompt_logprobs": value})
        assert info.value.param == "prompt_logprobs"
    with pytest.raises(RequestError, match="stream"):
        engine.stream(CompletionRequest(prompt=PROMPT, stream=True, extra={"prompt_logprobs": 1}))
