"""nbcompletions.metrics on hand-built frames (exact values) and on the embedded model's output."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from nbcompletions import metrics


def test_per_choice_text_statistics_exact() -> None:
    choices = pd.DataFrame({
        "index": [0, 1, 2],
        "text": ["the cat the cat the cat", "a b c d e", None],
        "n_tokens": [6, 5, pd.NA],
        "sum_logprob": [-6.0, -10.0, np.nan],
    })
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
    assert math.isnan(out.loc[0, "distinct_2"])
    assert math.isnan(out.loc[1, "distinct_1"])
    assert out.loc[0, "distinct_1"] == 1.0


def test_per_choice_over_model_tokens() -> None:
    choices = pd.DataFrame({"index": [0], "text": ["abab"]})
    tokens = pd.DataFrame({
        "index": [0, 0, 0, 0, 0],
        "position": [0, 1, 2, 3, 4],
        "token": ["P", "a", "b", "a", "b"],
        "echo": [True, False, False, False, False],
    })
    out = metrics.per_choice(choices, tokens)
    assert out.loc[0, "token_distinct_1"] == pytest.approx(2 / 4)
    assert out.loc[0, "token_distinct_2"] == pytest.approx(2 / 3)


def test_per_choice_names_missing_column() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
        metrics.per_choice(pd.DataFrame({"txt": ["x"]}))


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 1, 12.7062047), (0.975, 4, 2.7764451), (0.975, 19, 2.0930241),
    (0.995, 9, 3.2498355), (0.95, 30, 1.6972609), (0.975, 10_000, 1.9602012),
])
def test_t_quantile_matches_tables(p: float, df: int, expected: float) -> None:
    assert metrics.t_quantile(p, df) == pytest.approx(expected, rel=1e-6)
    assert metrics.t_quantile(1 - p, df) == pytest.approx(-expected, rel=1e-6)


def test_summarize_mean_and_t_interval() -> None:
    df = pd.DataFrame({
        "temperature": [0.5] * 5 + [1.0] * 2 + [1.5],
        "score": [1.0, 2.0, 3.0, 4.0, 5.0, 10.0, np.nan, 7.0],
    })
    out = metrics.summarize(df, by="temperature", value="score")
    assert out.columns.tolist() == ["temperature", "metric", "n", "mean", "std", "sem", "ci_low",
                                    "ci_high"]
    first = out.iloc[0]
    assert first["n"] == 5
    assert first["mean"] == pytest.approx(3.0)
    sem = np.std([1, 2, 3, 4, 5], ddof=1) / math.sqrt(5)
    assert first["ci_high"] - first["mean"] == pytest.approx(2.7764451 * sem, rel=1e-6)
    # One real value (the NaN of a failed request is left out): no interval.
    second = out.iloc[1]
    assert second["n"] == 1
    assert math.isnan(second["ci_low"])
    assert out["metric"].unique().tolist() == ["score"]


def test_summarize_several_values_long_form_and_errors() -> None:
    df = pd.DataFrame({"g": ["a", "a", "b", "b"], "x": [1, 2, 3, 4], "y": [0, 0, 1, 1]})
    out = metrics.summarize(df, by=["g"], value=["x", "y"])
    assert out["metric"].tolist() == ["x", "x", "y", "y"]
    assert out["mean"].tolist() == [1.5, 3.5, 0.0, 1.0]
    whole = metrics.summarize(df, value="x")
    assert whole.loc[0, "n"] == 4
    with pytest.raises(ValueError, match=r"missing column\(s\) \['temp'\]"):
        metrics.summarize(df, by="temp", value="x")
    with pytest.raises(ValueError, match="ci must be"):
        metrics.summarize(df, by="g", value="x", ci=95)


def test_calibration_bins_and_sampled_token_outside_top_k() -> None:
    tokens = pd.DataFrame({
        "index": [0, 0, 0, 0],
        "position": [0, 1, 2, 3],
        "prob": [np.nan, 0.9, 0.15, 0.05],
        "echo": [True, False, False, False],
    })
    alternatives = pd.DataFrame({
        "index": [0] * 7,
        "position": [0, 1, 1, 2, 2, 3, 3],
        "prob": [0.5, 0.9, 0.05, 0.8, 0.15, 0.7, 0.2],
        "chosen": [False, True, False, False, True, False, False],
    })
    out = metrics.calibration(tokens, alternatives, bins=10)
    # Position 0 is an echoed prompt token: excluded. Position 3's sampled token (p=0.05) was not
    # among the alternatives: it is added as a chosen event.
    counts = dict(zip(out["bin"], out["count"], strict=True))
    assert counts == {0: 2, 1: 1, 2: 1, 7: 1, 8: 1, 9: 1}
    observed = dict(zip(out["bin"], out["observed"], strict=True))
    assert observed[0] == 0.5  # 0.05 (not chosen) and 0.05 (the added sampled token)
    assert observed[9] == 1.0
    assert observed[8] == 0.0
    row = out[out["bin"] == 9].iloc[0]
    assert row["prob_low"] == pytest.approx(0.9)
    assert row["observed_low"] < 1.0 <= row["observed_high"] + 1e-12


def test_calibration_validates() -> None:
    tokens = pd.DataFrame({"index": [0], "position": [0], "prob": [0.5]})
    with pytest.raises(ValueError, match="chosen"):
        metrics.calibration(tokens, pd.DataFrame({"index": [0], "position": [0], "prob": [0.5]}))
    with pytest.raises(ValueError, match="bins must be"):
        metrics.calibration(tokens, tokens.assign(chosen=True), bins=0)


def test_metrics_on_a_real_sweep(embedded_client: Any) -> None:
    from nbcompletions import sweep

    result = sweep(embedded_client, prompt=["To be", "My lord"], temperature=[1.0, 0.5],
                   max_tokens=6, logprobs=5, repeats=2, progress=False, probe=False)
    per = metrics.per_choice(result.choices, result.tokens)
    assert len(per) == 8
    assert per["n_chars"].notna().all()
    assert ((per["distinct_1"] > 0) & (per["distinct_1"] <= 1)).all()
    assert per["token_distinct_1"].notna().all()
    table = metrics.calibration(result.tokens, result.alternatives, bins=5, by="temperature")
    assert set(table["temperature"]) == {0.5, 1.0}
    # Every generated position contributes exactly one sampled token, found among the
    # alternatives or added from the tokens frame.
    generated = result.tokens[~result.tokens["echo"]]
    for temperature, group in table.groupby("temperature"):
        expected = int((generated["temperature"] == temperature).sum())
        assert int(group["n_chosen"].sum()) == expected
    assert ((table["observed"] >= 0) & (table["observed"] <= 1)).all()
    summary = metrics.summarize(per, by=["prompt_id", "temperature"],
                                value=["distinct_1", "mean_logprob"])
    assert len(summary) == 2 * 2 * 2
    assert (summary["n"] == 2).all()
    assert (summary["ci_low"] <= summary["mean"]).all()
