"""Property tests: random valid responses keep the frames' invariants.

Each generated response comes from full next-token distributions over a small vocabulary, so the
true entropy at every position is known and must lie within the reported bounds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbcompletions import CompletionRequest, to_frames

PLAIN = [f"w{i}" for i in range(12)] + [" the", "é", "日本", ","]
VOCAB = [*PLAIN, "bytes:\\xe2\\x80", "bytes:\\x9c"]


@dataclass
class Case:
    body: dict[str, Any]
    request: CompletionRequest | None
    prompt_lengths: list[int]  # per choice, in index order
    entropies: dict[tuple[int, int], float]  # (index, position) -> true entropy


@st.composite
def cases(draw: st.DrawFn) -> Case:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 3))
    n_prompts = draw(st.integers(1, 3))
    echo = draw(st.booleans())
    k = draw(st.integers(0, 5))
    token_id_prompts = draw(st.booleans())
    with_offsets = draw(st.booleans())
    include_chosen = draw(st.sampled_from(["always", "never", "mixed"]))
    know_request = draw(st.booleans()) or echo  # echo cannot be split without the request
    llamacpp = draw(st.booleans()) and not with_offsets
    null_rate = draw(st.sampled_from([0.0, 0.2]))

    prompt_tokens = [
        [PLAIN[i] for i in rng.integers(0, len(PLAIN), size=rng.integers(1, 4))]
        for _ in range(n_prompts)
    ]
    if token_id_prompts:
        prompts: list[list[int]] | list[str] = [
            [int(i) for i in rng.integers(0, 100, size=len(t))] for t in prompt_tokens
        ]
        prompt_field: object = prompts if n_prompts > 1 else prompts[0]
    else:
        prompts = ["".join(t) for t in prompt_tokens]
        prompt_field = prompts if n_prompts > 1 else prompts[0]

    choices = []
    prompt_lengths = []
    entropies: dict[tuple[int, int], float] = {}
    for index in range(n * n_prompts):
        echoed = prompt_tokens[index // n] if echo else []
        n_generated = int(rng.integers(0, 6))
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        tops: list[dict[str, float | None] | None] = []
        for position in range(len(echoed) + n_generated):
            probs = rng.dirichlet(np.full(len(VOCAB), 0.3))
            probs = np.maximum(probs, 1e-12)
            probs /= probs.sum()
            logprobs = np.log(probs)
            if position < len(echoed):
                token = echoed[position]
            else:
                token = VOCAB[int(rng.choice(len(VOCAB), p=probs))]
            chosen_logprob = float(logprobs[VOCAB.index(token)])
            if position == 0 and echo:
                tokens.append(token)
                token_logprobs.append(None)
                tops.append(None)
                continue
            order = np.argsort(-probs, kind="stable")[:k]
            top: dict[str, float | None] | None  # None: the whole list is null
            top = {VOCAB[i]: float(logprobs[i]) for i in order}
            add = {"always": True, "never": False, "mixed": bool(rng.integers(0, 2))}
            if add[include_chosen]:
                top[token] = chosen_logprob
            elif token in top:  # an old-style list that leaves the sampled token out
                del top[token]
            if null_rate and rng.random() < null_rate:
                top = None
            elif top:  # bounds exist where there are alternatives
                entropies[(index, position)] = float(-(probs * logprobs).sum())
            if top and null_rate and rng.random() < null_rate:
                top[next(iter(top))] = None  # a listed entry whose logprob is null
            items = list(top.items()) if top is not None else None
            if items is not None:
                rng.shuffle(items)
                top = dict(items)
            tokens.append(token)
            token_logprobs.append(chosen_logprob)
            tops.append(top)
        prompt_lengths.append(len(echoed))
        if llamacpp:
            logprobs_field: dict[str, Any] = {
                "content": [
                    {
                        "token": t,
                        "logprob": lp,
                        "bytes": None,
                        "top_logprobs": None
                        if d is None
                        else [{"token": a, "logprob": b} for a, b in d.items()],
                    }
                    for t, lp, d in zip(tokens, token_logprobs, tops, strict=True)
                ]
            }
        else:
            logprobs_field = {
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": tops,
            }
            if with_offsets:
                start = 0 if echo else len(prompts[index // n]) if not token_id_prompts else 0
                offsets = []
                for token in tokens:
                    offsets.append(start)
                    start += len(token)
                logprobs_field["text_offset"] = offsets
        choices.append(
            {
                "text": "".join(tokens),
                "index": index,
                "finish_reason": "length" if n_generated == 5 else "stop",
                "logprobs": logprobs_field,
            }
        )
    order = rng.permutation(len(choices))
    body = {
        "id": "cmpl",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [choices[i] for i in order],
    }
    request = (
        CompletionRequest(prompt=prompt_field, n=n, echo=echo, logprobs=k, max_tokens=5)
        if know_request
        else None
    )
    return Case(body, request, prompt_lengths, entropies)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_responses_keep_the_invariants(case: Case) -> None:
    before = copy.deepcopy(case.body)
    choices, tokens, alternatives = to_frames(case.body, case.request, vocab_size=len(VOCAB))
    assert case.body == before

    raw = case.body["choices"]

    def entries(choice: dict[str, Any]) -> list[Any]:
        logprobs = choice["logprobs"]
        if "content" in logprobs:
            return [e["top_logprobs"] for e in logprobs["content"]]
        return list(logprobs["top_logprobs"])

    assert len(tokens) == sum(len(entries(c)) for c in raw)
    assert len(alternatives) == sum(len(d or ()) for c in raw for d in entries(c))
    assert choices["index"].tolist() == sorted(c["index"] for c in raw)

    np.testing.assert_allclose(tokens["prob"], np.exp(tokens["logprob"]), equal_nan=True)
    np.testing.assert_allclose(
        alternatives["prob"], np.exp(alternatives["logprob"]), equal_nan=True
    )
    assert (tokens["rank"].dropna() >= 1).all()
    has_bounds = tokens["entropy_low"].notna()
    assert (tokens["entropy_low"][has_bounds] <= tokens["entropy_high"][has_bounds] + 1e-12).all()
    assert tokens["top_mass"].dropna().between(0, 1 + 1e-9).all()

    # The bounds hold the true entropy of the distribution each position was drawn from.
    for (index, position), true_entropy in case.entropies.items():
        row = tokens[(tokens["index"] == index) & (tokens["position"] == position)].iloc[0]
        assert row["entropy_low"] - 1e-9 <= true_entropy <= row["entropy_high"] + 1e-9

    # Echoed prompt tokens are exactly the generated prompt's, first in each choice.
    echo_counts = tokens.groupby("index")["echo"].sum().reindex(choices["index"], fill_value=0)
    assert echo_counts.tolist() == case.prompt_lengths
    assert choices["prompt_n_tokens"].tolist() == case.prompt_lengths

    # Per-choice sums agree with the tokens frame.
    generated = tokens[~tokens["echo"]].groupby("index")["logprob"].sum(min_count=1)
    prompt = tokens[tokens["echo"]].groupby("index")["logprob"].sum(min_count=1)
    for _, row in choices.iterrows():
        expected = generated.get(row["index"], math.nan)
        assert math.isclose(row["sum_logprob"], expected, abs_tol=1e-9) or (
            math.isnan(row["sum_logprob"]) and math.isnan(expected)
        )
        expected_prompt = prompt.get(row["index"], math.nan)
        assert math.isclose(row["prompt_sum_logprob"], expected_prompt, abs_tol=1e-9) or (
            math.isnan(row["prompt_sum_logprob"]) and math.isnan(expected_prompt)
        )

    # Alternatives: ranks 1..m per position, logprobs not increasing with rank, chosen marks the
    # chosen token, and rank of the chosen token counts the strictly better others.
    merged = alternatives.merge(
        tokens[["index", "position", "token", "logprob", "rank"]],
        on=["index", "position"],
        suffixes=("", "_chosen"),
    )
    assert (merged["chosen"] == (merged["token"] == merged["token_chosen"])).all()
    for (_, _), group in merged.groupby(["index", "position"]):
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        logprobs = group["logprob"].to_numpy()
        known = ~np.isnan(logprobs)
        assert known.tolist() == sorted(known.tolist(), reverse=True)  # null logprobs last
        assert (np.diff(logprobs[known]) <= 0).all()
        chosen_logprob = group["logprob_chosen"].iloc[0]
        if not math.isnan(chosen_logprob):
            better = ((group["logprob"] > chosen_logprob) & ~group["chosen"]).sum()
            assert group["rank_chosen"].iloc[0] == 1 + better

    if case.request is not None:
        n = case.request.effective_n
        assert choices["prompt_index"].tolist() == (choices["index"] // n).tolist()
        assert choices["choice"].tolist() == (choices["index"] % n).tolist()
    else:
        assert choices["prompt_index"].isna().all()


def test_property_generator_covers_echo_and_excluded_tokens() -> None:
    """Guard against a generator that silently stops producing the interesting cases."""
    seen = {"echo": False, "excluded": False, "null": False}

    @settings(max_examples=60, deadline=None, database=None)
    @given(cases())
    def probe(case: Case) -> None:
        seen["echo"] |= any(case.prompt_lengths)
        for choice in case.body["choices"]:
            logprobs = choice["logprobs"]
            if "tokens" not in logprobs:
                continue
            for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
                seen["null"] |= top is None
                seen["excluded"] |= top is not None and token not in top

    probe()
    assert seen == {"echo": True, "excluded": True, "null": True}
    assert pd.__version__  # the suite runs on pandas 2 and 3 alike
