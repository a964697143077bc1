"""nbcompletions.metrics on hand-built frames (exact values) and on the embedded model's output."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from nbcompletions import metrics


def test_per_choice_text_statistics_exact() -> None:
    choices = pd.DataFrame(
        {
            "index": [0, 1, 2],
            "text": ["the cat the cat the cat", "a b c d e", None],
            "n_tokens": [6, 5, pd.NA],
            "sum_logprob": [-6.0, -10.0, np.nan],
        }
    )
    before = choices.copy()
    out = metrics.per_choice(choices)
    pd.testing.assert_frame_equal(choices, before)  # the input is untouched
    assert out["n_chars"].tolist()[:2] == [23.0, 9.0]
    assert out["n_words"].tolist()[:2] == [6.0, 5.0]
    # "the cat the cat the cat": 2 distinct words of 6; bigrams (the cat)(cat the) of 5.
    assert out.loc[0, "distinct_1"] == pytest.approx(2 / 6)
    assert out.loc[0, "distinct_2"] == pytest.approx(2 / 5)
    # 4-grams: [the cat the cat], [cat the cat the], [the cat the cat] -> 2 distinct of 3.
    assert out.loc[0, "repetition_rate"] == pytest.approx(1 - 2 / 3)
    assert out.loc[1, "distinct_1"] == 1.0
    assert out.loc[1, "repetition_rate"] == 0.0
    assert out.loc[0, "mean_logprob"] == pytest.approx(-1.0)
    assert out.loc[1, "perplexity"] == pytest.approx(math.exp(2.0))
    # A failed request's row has nothing measured.
    assert out.loc[2, ["n_chars", "distinct_1", "repetition_rate"]].isna().all()


def test_per_choice_short_text_is_nan_not_zero() -> None:
    out = metrics.per_choice(pd.DataFrame({"text": ["one", ""]}))
    short_distinct_2, empty_distinct_1 = out.loc[0, "distinct_2"], out.loc[1, "distinct_1"]
    assert isinstance(short_distinct_2, float)
    assert isinstance(empty_distinct_1, float)
    assert math.isnan(short_distinct_2)
    assert math.isnan(empty_distinct_1)
    assert out.loc[0, "distinct_1"] == 1.0


def test_per_choice_over_model_tokens() -> None:
    choices = pd.DataFrame({"index": [0], "text": ["abab"]})
    tokens = pd.DataFrame(
        {
            "index": [0, 0, 0, 0, 0],
            "position": [0, 1, 2, 3, 4],
            "token": ["P", "a", "b", "a", "b"],
            "echo": [True, False, False, False, False],
        }
    )
    out = metrics.per_choice(choices, tokens)
    assert out.loc[0, "token_distinct_1"] == pytest.approx(2 / 4)
    assert out.loc[0, "token_distinct_2"] == pytest.approx(2 / 3)


def test_per_choice_names_missing_column() -> None:
    with pytest.raises(ValueError, match=r"per_choice\(\): column 'text' not in the choices frame"):
        metrics.per_choice(pd.DataFrame({"txt": ["x"]}))


def test_wilson_interval_matches_published_values_and_stays_in_range() -> None:
    # Newcombe (1998), table I: 0 of 10 -> (0, 0.2775); 10 of 10 -> (0.7225, 1); 81 of 263 ->
    # (0.2553, 0.3662).
    low, high = metrics.wilson_interval([0, 10, 81], [10, 10, 263])
    np.testing.assert_allclose(low, [0.0, 0.7225, 0.2553], atol=5e-5)
    np.testing.assert_allclose(high, [0.2775, 1.0, 0.3662], atol=5e-5)
    assert (low >= 0).all()
    assert (high <= 1).all()
    empty_low, _ = metrics.wilson_interval(0, 0)
    assert math.isnan(float(empty_low))


def test_bootstrap_interval_is_seeded_and_within_the_data() -> None:
    values = [0.2, 0.4, 0.5, 0.9, 1.0]
    low, high = metrics.bootstrap_interval(values)
    assert (low, high) == metrics.bootstrap_interval(values)
    assert 0.2 <= low < np.mean(values) < high <= 1.0
    assert (low, high) != metrics.bootstrap_interval(values, seed=1)
    assert all(math.isnan(v) for v in metrics.bootstrap_interval([0.5]))


def test_summarize_mean_and_bootstrap_interval() -> None:
    df = pd.DataFrame(
        {
            "temperature": [0.5] * 5 + [1.0] * 2 + [1.5],
            "score": [1.0, 2.0, 3.0, 4.0, 5.0, 10.0, np.nan, 7.0],
        }
    )
    out = metrics.summarize(df, by="temperature", value="score")
    assert out.columns.tolist() == [
        "temperature",
        "metric",
        "n",
        "mean",
        "std",
        "sem",
        "ci_low",
        "ci_high",
    ]
    assert out.attrs["interval"] == {"score": "bootstrap"}
    first = out.iloc[0]
    assert first["n"] == 5
    assert first["mean"] == pytest.approx(3.0)
    assert first["sem"] == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1) / math.sqrt(5))
    assert (first["ci_low"], first["ci_high"]) == metrics.bootstrap_interval([1, 2, 3, 4, 5])
    # One real value (the NaN of a failed request is left out): no interval.
    second = out.iloc[1]
    assert second["n"] == 1
    assert math.isnan(second["ci_low"])
    assert out["metric"].unique().tolist() == ["score"]


def test_summarize_intervals_of_bounded_metrics_stay_in_range() -> None:
    # The cases of issue 20: distinct_1 near 1 got upper bounds of 1.011-1.031 from Student t,
    # and a repetition rate of 0 in all repeats but one got a lower bound of -0.0079.
    df = pd.DataFrame(
        {
            "g": ["a"] * 5 + ["b"] * 5 + ["c"] * 3,
            "distinct_1": [1.0, 1.0, 0.97, 1.0, 0.95, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.9, 1.0],
            "repetition_rate": [0.0, 0.0, 0.0, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.9],
            "correct": [True] * 5 + [False] * 5 + [True, False, True],
        }
    )
    out = metrics.summarize(df, by="g", value=["distinct_1", "repetition_rate", "correct"])
    assert out.attrs["interval"] == {
        "distinct_1": "bootstrap",
        "repetition_rate": "bootstrap",
        "correct": "wilson",
    }
    assert (out["ci_low"] >= 0).all()
    assert (out["ci_high"] <= 1).all()
    assert (out["ci_low"] <= out["mean"]).all()
    assert (out["mean"] <= out["ci_high"]).all()
    rates = out[out["metric"] == "repetition_rate"].set_index("g")
    assert rates.loc["a", "ci_low"] == 0.0
    assert rates.loc["a", "ci_high"] > 0.0
    # All five correct (or none): Wilson still gives an interval of positive width.
    correct = out[out["metric"] == "correct"].set_index("g")
    assert correct.loc["a", "ci_high"] == 1.0
    assert correct.loc["a", "ci_low"] < 1.0
    assert correct.loc["b", "ci_low"] == 0.0
    assert correct.loc["b", "ci_high"] > 0.0
    wilson = metrics.summarize(
        df.assign(hit=df["correct"].astype(int)), value="hit", interval="wilson"
    )
    assert wilson.attrs["interval"] == {"hit": "wilson"}
    with pytest.raises(ValueError, match=r"interval='wilson' is for proportions.*'distinct_1'"):
        metrics.summarize(df, value="distinct_1", interval="wilson")
    with pytest.raises(
        ValueError, match=r"interval must be one of \['auto', 'wilson', 'bootstrap'\]; got 't'"
    ):
        metrics.summarize(df, value="distinct_1", interval="t")


def test_summarize_several_values_long_form_and_errors() -> None:
    df = pd.DataFrame({"g": ["a", "a", "b", "b"], "x": [1, 2, 3, 4], "y": [0, 0, 1, 1]})
    out = metrics.summarize(df, by=["g"], value=["x", "y"])
    assert out["metric"].tolist() == ["x", "x", "y", "y"]
    assert out["mean"].tolist() == [1.5, 3.5, 0.0, 1.0]
    whole = metrics.summarize(df, value="x")
    assert whole.loc[0, "n"] == 4
    with pytest.raises(ValueError, match=r"summarize\(\): column 'temp' not in the df frame"):
        metrics.summarize(df, by="temp", value="x")
    with pytest.raises(ValueError, match="ci must be"):
        metrics.summarize(df, by="g", value="x", ci=95)


def test_summarize_leaves_out_failed_requests_and_groups_list_values() -> None:
    # What plots.mean_ci draws: failed rows and rows without a value are left out and counted,
    # and a request field holding lists (stop) still groups.
    df = pd.DataFrame(
        {
            "stop": [["\\n"], ["\\n"], ["."], ["."], ["."]],
            "score": [1.0, 3.0, 5.0, math.nan, 100.0],
            "error": [None, None, None, None, "APIError (500): boom"],
        }
    )
    out = metrics.summarize(df, by="stop", value="score", error="error")
    assert out["stop"].tolist() == ["['.']", "['\\\\n']"]
    assert out["n"].tolist() == [1, 2]
    assert out["mean"].tolist() == [5.0, 2.0]
    assert out.attrs["n_failed"] == 1
    assert out.attrs["n_missing"] == {"score": 1}
    with pytest.raises(ValueError, match=r"column 'failed' not in the df frame"):
        metrics.summarize(df, by="stop", value="score", error="failed")


def test_calibration_bins_and_sampled_token_outside_top_k() -> None:
    tokens = pd.DataFrame(
        {
            "index": [0, 0, 0, 0],
            "position": [0, 1, 2, 3],
            "prob": [np.nan, 0.9, 0.15, 0.05],
            "echo": [True, False, False, False],
        }
    )
    # k = 2. Position 3's sampled token (p=0.05) is outside the top 2 and, as OpenAI and vLLM do,
    # appended as a third entry.
    alternatives = pd.DataFrame(
        {
            "index": [0] * 8,
            "position": [0, 1, 1, 2, 2, 3, 3, 3],
            "prob": [0.5, 0.9, 0.05, 0.8, 0.15, 0.7, 0.2, 0.05],
            "chosen": [False, True, False, False, True, False, False, True],
        }
    )
    out = metrics.calibration(tokens, alternatives, bins=10)
    # Position 0 is an echoed prompt token: excluded. The appended sampled token is no event: it
    # is there only because it was sampled, and would put bin 0 at 1/2 instead of 0/1.
    counts = dict(zip(out["bin"], out["count"], strict=True))
    assert counts == {0: 1, 1: 1, 2: 1, 7: 1, 8: 1, 9: 1}
    observed = dict(zip(out["bin"], out["observed"], strict=True))
    assert observed[0] == 0.0
    assert observed[9] == 1.0
    assert observed[8] == 0.0
    assert observed[1] == 1.0
    row = out[out["bin"] == 9].iloc[0]
    assert row["prob_low"] == pytest.approx(0.9)
    assert row["observed_low"] < 1.0 <= row["observed_high"] + 1e-12
    # A sweep's frames say k themselves (the logprobs column), even when every position of a
    # completion sampled outside its top k and so has k + 1 entries.
    outside = pd.DataFrame(
        {
            "index": [0] * 3,
            "position": [1] * 3,
            "prob": [0.6, 0.3, 0.02],
            "chosen": [False, False, True],
            "logprobs": [2] * 3,
        }
    )
    table = metrics.calibration(tokens, outside, bins=10)
    assert int(table["count"].sum()) == 2
    assert int(table["n_chosen"].sum()) == 0
    # A server that returns fewer than were asked for (OpenAI caps logprobs at 5): its own k.
    capped = pd.DataFrame(
        {
            "index": [0] * 5,
            "position": [1, 1, 1, 2, 2],
            "prob": [0.6, 0.3, 0.02, 0.5, 0.4],
            "chosen": [False, False, True, True, False],
            "logprobs": [10] * 5,
        }
    )
    table = metrics.calibration(tokens, capped, bins=10)
    assert int(table["count"].sum()) == 4  # position 1's appended token is no event
    assert int(table["n_chosen"].sum()) == 1
    # llama.cpp may leave the sampled token out altogether: the top k still count, unsampled.
    table = metrics.calibration(tokens, outside.iloc[:2].drop(columns="logprobs"), bins=10)
    assert int(table["count"].sum()) == 2
    assert int(table["n_chosen"].sum()) == 0


@pytest.mark.slow
def test_calibration_of_the_embedded_model_at_temperature_one(embedded_client: Any) -> None:
    from nbcompletions import sweep

    # The embedded model samples from exactly the distribution it reports, so at temperature 1
    # the low bin must sit near the diagonal; counting the appended sampled tokens put it at ~4x.
    result = sweep(
        embedded_client,
        prompt=["To be, or not", "ROMEO:"],
        temperature=1.0,
        max_tokens=40,
        logprobs=3,
        repeats=4,
        seed=list(range(4)),
        progress=False,
        probe=False,
    )
    table = metrics.calibration(result.tokens, result.alternatives, bins=5)
    low = table[table["bin"] == 0].iloc[0]
    assert low["count"] > 300
    assert low["observed_low"] <= low["mean_prob"] * 1.5
    assert low["observed"] < 2 * low["mean_prob"]


def test_calibration_validates() -> None:
    tokens = pd.DataFrame({"index": [0], "position": [0], "prob": [0.5]})
    with pytest.raises(ValueError, match="chosen"):
        metrics.calibration(tokens, pd.DataFrame({"index": [0], "position": [0], "prob": [0.5]}))
    with pytest.raises(ValueError, match="bins must be"):
        metrics.calibration(tokens, tokens.assign(chosen=True), bins=0)


def test_metrics_on_a_real_sweep(embedded_client: Any) -> None:
    from nbcompletions import sweep

    # Two seeds, not two unseeded repeats: unseeded, a choice may be empty (end-of-text first) or
    # have no words, and its distinct_1 is then NaN, not in (0, 1].
    result = sweep(
        embedded_client,
        prompt=["To be", "My lord"],
        temperature=[1.0, 0.5],
        max_tokens=6,
        logprobs=5,
        seed=[1, 2],
        progress=False,
        probe=False,
    )
    per = metrics.per_choice(result.choices, result.tokens)
    assert len(per) == 8
    assert per["n_chars"].notna().all()
    assert ((per["distinct_1"] > 0) & (per["distinct_1"] <= 1)).all()
    assert per["token_distinct_1"].notna().all()
    table = metrics.calibration(result.tokens, result.alternatives, bins=5, by="temperature")
    assert set(table["temperature"]) == {0.5, 1.0}
    # Every generated position gives its top 5 as events; the chosen ones are the sampled tokens
    # that ranked in the top 5.
    generated = result.tokens[~result.tokens["echo"]]
    for temperature, group in table.groupby("temperature"):
        mine = generated[generated["temperature"] == temperature]
        assert int(group["count"].sum()) == 5 * len(mine)
        assert int(group["n_chosen"].sum()) == int((mine["rank"] <= 5).sum())
    assert ((table["observed"] >= 0) & (table["observed"] <= 1)).all()
    summary = metrics.summarize(
        per, by=["prompt_id", "temperature"], value=["distinct_1", "mean_logprob"]
    )
    assert len(summary) == 2 * 2 * 2
    assert (summary["n"] == 2).all()
    assert (summary["ci_low"] <= summary["mean"]).all()
