"""Statistics that parameter studies report.

DataFrame in, new DataFrame out; inputs are never mutated.

- `per_choice(choices, tokens=None)`: length, distinct-1/2, repetition rate, mean logprob and
  perplexity for every choice.
- `summarize(df, by=..., value=...)`: mean and a confidence interval per group (over the repeats
  of a sweep's grid points) that stays inside the metric's range: Wilson for proportions, a
  seeded percentile bootstrap for means.
- `calibration(tokens, alternatives)`: how often tokens were sampled against the probability the
  endpoint reported for them.
- `reliability(frame, prob=..., correct=...)`: how often answers were right against the
  probability given them (answer-level calibration), per group of a sweep axis.

Every function checks the columns it needs first and raises a ValueError naming what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from ._columns import require_columns

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "INTERVALS",
    "bootstrap_interval",
    "calibration",
    "distinct_n",
    "per_choice",
    "reliability",
    "repetition_rate",
    "summarize",
    "wilson_interval",
]

#: n of the n-grams behind `repetition_rate` (seq-rep-4 of Welleck et al. 2019, "Neural Text
#: Generation with Unlikelihood Training").
REPETITION_N = 4


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a column name or a list of column names; got {value!r}")
    return list(value)


# -- text statistics ----------------------------------------------------------------------


def distinct_n(units: Sequence[Any], n: int) -> float:
    """Distinct n-grams / all n-grams in one sequence; NaN when it has fewer than n units."""
    total = len(units) - n + 1
    if total <= 0:
        return math.nan
    grams = {tuple(units[i : i + n]) for i in range(total)}
    return len(grams) / total


def repetition_rate(units: Sequence[Any], n: int = REPETITION_N) -> float:
    """Share of n-grams repeating an earlier n-gram of the sequence (seq-rep-n); NaN if short."""
    ratio = distinct_n(units, n)
    return math.nan if math.isnan(ratio) else 1.0 - ratio


def _text_stats(units: Sequence[Any]) -> tuple[float, float, float]:
    return distinct_n(units, 1), distinct_n(units, 2), repetition_rate(units)


def _key_columns(*frames: pd.DataFrame) -> list[str]:
    # A sweep's frames identify a choice by (request_id, index); a single completion's by index.
    if all("request_id" in f.columns for f in frames):
        return ["request_id", "index"]
    return ["index"]


def per_choice(choices: pd.DataFrame, tokens: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-choice text statistics, added as columns to a copy of ``choices``.

    Added: ``n_chars``, ``n_words`` (whitespace-separated words), ``distinct_1``, ``distinct_2``
    (distinct word n-grams / word n-grams), ``repetition_rate`` (share of word 4-grams that repeat
    an earlier 4-gram of the same text; seq-rep-4 of Welleck et al. 2019). Statistics of a text too
    short to have an n-gram are NaN, not 0: nothing was measured. ``n_tokens``, ``mean_logprob`` and
    ``perplexity`` are kept from the frames (computed from ``sum_logprob`` when only that is there,
    NaN when unknown).

    With ``tokens`` (the tokens frame of the same completions) the n-gram statistics are also
    computed over the model's generated tokens (echoed prompt tokens are left out):
    ``token_distinct_1``, ``token_distinct_2``, ``token_repetition_rate``. Words are comparable
    across models; model tokens are what the sampler actually repeated.
    """
    require_columns(choices, ["text"], function="per_choice", frame_name="choices")
    out: pd.DataFrame = choices.copy()
    stats = []
    chars: list[float] = []
    words_count: list[float] = []
    for text in out["text"].tolist():
        if isinstance(text, str):
            words = text.split()
            chars.append(len(text))
            words_count.append(len(words))
            stats.append(_text_stats(words))
        else:  # a failed request's row: nothing was generated
            chars.append(math.nan)
            words_count.append(math.nan)
            stats.append((math.nan, math.nan, math.nan))
    out["n_chars"] = pd.array(chars, dtype="Float64").astype(float)
    out["n_words"] = pd.array(words_count, dtype="Float64").astype(float)
    arr = np.array(stats, dtype=float).reshape(-1, 3)
    out["distinct_1"] = arr[:, 0]
    out["distinct_2"] = arr[:, 1]
    out["repetition_rate"] = arr[:, 2]
    if "n_tokens" not in out.columns:
        out["n_tokens"] = math.nan
    if "mean_logprob" not in out.columns:
        if "sum_logprob" in out.columns:
            n_tok = pd.to_numeric(out["n_tokens"], errors="coerce").astype(float)
            out["mean_logprob"] = out["sum_logprob"].astype(float) / n_tok.where(n_tok > 0)
        else:
            out["mean_logprob"] = math.nan
    if "perplexity" not in out.columns:
        out["perplexity"] = np.exp(-out["mean_logprob"].astype(float))

    if tokens is not None:
        keys = _key_columns(choices, tokens)
        require_columns(tokens, [*keys, "token"], function="per_choice", frame_name="tokens")
        generated = tokens
        if "echo" in tokens.columns:
            generated = tokens[~tokens["echo"].fillna(False).astype(bool)]
        if "position" in generated.columns:
            generated = generated.sort_values([*keys, "position"], kind="stable")
        per_key: dict[Any, tuple[float, float, float]] = {}
        for key, group in generated.groupby(keys, sort=False, dropna=True):
            units = [t for t in group["token"].tolist() if isinstance(t, str)]
            per_key[key if isinstance(key, tuple) else (key,)] = _text_stats(units)
        nan3 = (math.nan, math.nan, math.nan)
        rows = [per_key.get(tuple(k), nan3) for k in out[keys].itertuples(index=False, name=None)]
        tarr = np.array(rows, dtype=float).reshape(-1, 3)
        out["token_distinct_1"] = tarr[:, 0]
        out["token_distinct_2"] = tarr[:, 1]
        out["token_repetition_rate"] = tarr[:, 2]
    return out


# -- confidence intervals -------------------------------------------------------------------------

#: The intervals `summarize` can draw: ``"auto"`` takes Wilson for a bool column (a proportion)
#: and the bootstrap for any other.
INTERVALS = ("auto", "wilson", "bootstrap")

#: Resamples behind a bootstrap interval: the 2.5% and 97.5% percentiles of 2,000 means move by
#: well under a tenth of the interval's width from one seed to another.
BOOTSTRAP_RESAMPLES = 2000

#: The bootstrap's default seed: the same frame gives the same interval in every run.
BOOTSTRAP_SEED = 0


def wilson_interval(successes: Any, trials: Any, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion, elementwise; always inside [0, 1] (NaN for 0 trials).

    Unlike the normal approximation p ± z·se it neither leaves [0, 1] nor collapses to a point
    at 0 or 1 successes (Brown, Cai and DasGupta 2001 recommend it for small n). The quantile is
    the standard library's `statistics.NormalDist`.
    """
    n = np.asarray(trials, dtype=float)
    k = np.asarray(successes, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        z = NormalDist().inv_cdf(0.5 + ci / 2.0)
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # Exactly 0 at 0 successes and 1 at n (rounding left 3e-17 above the mean of 0).
    low = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan)


def bootstrap_interval(
    values: Any,
    ci: float = 0.95,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN, NaN below 2 values).

    The means of resamples lie between the smallest and the largest value, so the interval
    never leaves the range the metric can take (a rate stays in [0, 1]). With a handful of
    repeats it is narrower than Student's t interval (it cannot see spread the sample lacks), and
    values that are all equal give a zero-width interval. Seeded: the same data, the same
    interval.
    """
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if data.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - ci / 2.0, 0.5 + ci / 2.0])
    return float(low), float(high)


def _interval_method(interval: str, column: pd.Series, name: str) -> str:
    """The interval `summarize` draws for one value column (see `INTERVALS`)."""
    is_bool = pd.api.types.is_bool_dtype(column)
    if interval == "auto":
        return "wilson" if is_bool else "bootstrap"
    if interval == "wilson" and not is_bool:
        numeric = pd.to_numeric(column, errors="coerce").dropna()
        if not numeric.isin([0, 1]).all():
            raise ValueError(
                f"summarize(): interval='wilson' is for proportions, but column {name!r} holds "
                "values other than 0 and 1; use interval='bootstrap' (or 'auto') for a mean"
            )
    return interval


def _group_stats(
    frame: pd.DataFrame, by_cols: list[str], method: str, ci: float, seed: int
) -> pd.DataFrame:
    """n, mean, std, sem and the interval of ``frame["_value"]`` per group of ``by_cols``."""
    groups = (
        frame.groupby(by_cols, sort=True, dropna=False, observed=True)["_value"]
        if by_cols
        else [((), frame["_value"])]
    )
    rows = []
    for key, values in groups:
        data = values.to_numpy(dtype=float)
        n = data.size
        mean = float(data.mean()) if n else math.nan
        std = float(data.std(ddof=1)) if n >= 2 else math.nan
        if method == "wilson":
            low, high = (float(v) for v in wilson_interval(data.sum(), n, ci))
        else:
            low, high = bootstrap_interval(data, ci, seed=seed)
        keys = key if isinstance(key, tuple) else (key,)
        rows.append((*keys, n, mean, std, std / math.sqrt(n) if n else math.nan, low, high))
    columns = [*by_cols, "n", "mean", "std", "sem", "ci_low", "ci_high"]
    stats: pd.DataFrame = pd.DataFrame(rows, columns=columns)
    stats["n"] = stats["n"].astype("int64")
    return stats


def _drop_failed(df: pd.DataFrame, error: str | None) -> tuple[pd.DataFrame, int]:
    if error is None:
        return df, 0
    marks = df[error]
    failed = marks.notna().to_numpy() & (marks.astype(str) != "").to_numpy()
    kept: pd.DataFrame = df[~failed]
    return kept, int(failed.sum())


def summarize(
    df: pd.DataFrame,
    *,
    by: str | Sequence[str] | None = None,
    value: str | Sequence[str] = "mean_logprob",
    ci: float = 0.95,
    error: str | None = None,
    interval: str = "auto",
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Mean and confidence interval of ``value`` per group of ``by`` (one row per group and value).

    Columns: the ``by`` columns, ``metric`` (the value column's name), ``n`` (non-missing values;
    failed requests' NaN rows are left out), ``mean``, ``std`` (sample, ddof=1), ``sem``,
    ``ci_low``, ``ci_high``.

    ``interval`` picks the interval at level ``ci`` (`INTERVALS`), chosen so that a bounded
    metric's interval stays in its range:

    - ``"wilson"`` (what ``"auto"`` takes for a bool column): the Wilson score interval of a
      proportion, inside [0, 1] at any n, also at 0 or n successes.
    - ``"bootstrap"`` (``"auto"`` for any other column): the percentile bootstrap of the mean,
      `BOOTSTRAP_RESAMPLES` resamples seeded with ``seed``. It lies between the group's smallest
      and largest value, so a rate such as ``distinct_2`` or ``repetition_rate`` never gets an
      interval outside [0, 1]; with few repeats it is narrower than a Student t interval, and it
      is NaN where n < 2 (one sample says nothing about spread).

    The interval drawn per value column is in ``attrs["interval"]`` (``{"score": "bootstrap"}``).
    ``error`` names a column marking failed requests (a sweep's ``error``): rows where it is set
    are left out. ``by`` columns holding lists or dicts (a ``stop`` setting, say) group by their
    ``repr``. What was left out is recorded in the result's ``attrs``: ``n_failed`` (rows with
    ``error`` set) and ``n_missing`` (per value column, rows without a finite value).
    Typical use on a sweep: ``summarize(per_choice(result.choices), by=["prompt_id", "temperature"],
    value="distinct_2", error="error")``.
    """
    by_cols = _as_list(by, "by")
    values = _as_list(value, "value")
    if not values:
        raise ValueError("value must name at least one column")
    if isinstance(ci, bool) or not isinstance(ci, int | float) or not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95); got {ci!r}")
    if interval not in INTERVALS:
        raise ValueError(
            f"summarize(): interval must be one of {list(INTERVALS)}; got {interval!r}"
        )
    require_columns(df, [*by_cols, *values, error], function="summarize", frame_name="df")
    df, n_failed = _drop_failed(df, error)
    keys = df[by_cols].copy()
    for column in by_cols:
        if keys[column].dtype == object:
            keys[column] = keys[column].map(_hashable)
    parts = []
    n_missing: dict[str, int] = {}
    methods: dict[str, str] = {}
    for name in values:
        methods[name] = _interval_method(interval, df[name], name)
        frame = keys.copy() if by_cols else pd.DataFrame(index=df.index)
        frame["_value"] = pd.to_numeric(df[name], errors="coerce").astype(float)
        finite = np.isfinite(frame["_value"])
        n_missing[name] = int((~finite).sum())
        stats = _group_stats(frame[finite], by_cols, methods[name], ci, seed)
        stats.insert(len(by_cols), "metric", name)
        parts.append(stats)
    out: pd.DataFrame = pd.concat(parts, ignore_index=True)
    out.attrs["ci"] = ci
    out.attrs["interval"] = methods
    out.attrs["n_failed"] = n_failed
    out.attrs["n_missing"] = n_missing
    return out


def _hashable(value: Any) -> Any:
    """Request fields such as ``stop`` or ``logit_bias`` hold lists or dicts: group by repr."""
    if isinstance(value, list | dict | tuple | set | np.ndarray):
        return repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return value


# -- calibration --------------------------------------------------------------------------


def calibration(
    tokens: pd.DataFrame,
    alternatives: pd.DataFrame,
    *,
    bins: int = 10,
    by: str | Sequence[str] | None = None,
    ci: float = 0.95,
) -> pd.DataFrame:
    """How often tokens were sampled, against the probability the endpoint reported for them.

    Each of the top-k alternatives at a generated position is one event: the token had reported
    probability ``prob`` and was or was not the sampled one (``chosen``). Events are binned by
    ``prob`` into ``bins`` equal-width bins on [0, 1]; per bin: ``mean_prob`` (average reported
    probability), ``observed`` (fraction sampled), ``count``, ``n_chosen`` and a Wilson interval
    ``observed_low``/``observed_high`` at level ``ci``. A calibrated sampler puts bins on the
    diagonal.

    Details that matter:
    - Echoed prompt tokens are not samples and are left out (``tokens.echo``).
    - Only the top k alternatives are events. OpenAI and vLLM append the sampled token as a k+1-th
      entry when it is outside the top k; counting it would add an event only when a low-probability
      token *was* sampled (never when it was not), so low bins would read far above the diagonal.
      The top k is fixed before sampling, so every one of its tokens is a fair event, sampled or
      not; a position whose sampled token is outside the top k contributes k unsampled events.
      k is the fewest alternatives at any position of the same completion, or the ``logprobs``
      column where the frame has one (a sweep's) and it is smaller: without it k reads one too
      high when every position of a completion sampled outside its top k.
    - Reported probabilities are the model's; sampling at temperature != 1 or top_p < 1 is expected
      to be off the diagonal (group ``by="temperature"`` to see it).

    ``by`` groups by columns present in ``alternatives`` (a sweep's field columns, say).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1; got {bins!r}")
    if isinstance(ci, bool) or not isinstance(ci, int | float) or not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95); got {ci!r}")
    by_cols = _as_list(by, "by")
    keys = [*_key_columns(tokens, alternatives), "position"]
    require_columns(
        alternatives,
        [*keys, "prob", "chosen", *by_cols],
        function="calibration",
        frame_name="alternatives",
    )
    require_columns(tokens, keys, function="calibration", frame_name="tokens")
    alts = _top_k(_sampled_alternatives(tokens, alternatives, keys, by_cols), keys)

    events = pd.DataFrame({col: alts[col].to_numpy() for col in by_cols})
    events["prob"] = alts["prob"].astype(float).to_numpy()
    events["hit"] = alts["chosen"].to_numpy(dtype=bool)
    return _reliability_bins(events, by_cols, bins, ci, hits="n_chosen")


def reliability(
    frame: pd.DataFrame,
    *,
    prob: str,
    correct: str,
    by: str | Sequence[str] | None = None,
    bins: int = 10,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Answer-level calibration: how often answers were right, against the probability given them.

    One row of ``frame`` is one answer: ``prob`` the probability the model gave it (a label
    token's probability, say) and ``correct`` whether it was right (bool). Answers are binned by
    ``prob`` into ``bins`` equal-width bins on [0, 1], per group of ``by`` (a sweep axis such as
    ``temperature``). Columns as `calibration`'s, with ``n_true`` (right answers) in place of
    ``n_chosen``: ``bin``, ``prob_low``, ``prob_high``, ``mean_prob``, ``observed`` (share
    right), its Wilson interval ``observed_low``/``observed_high`` at level ``ci``, ``count``.
    Rows without a probability or a verdict are left out (``attrs["n_missing"]``).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1; got {bins!r}")
    if isinstance(ci, bool) or not isinstance(ci, int | float) or not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be a confidence level between 0 and 1 (e.g. 0.95); got {ci!r}")
    by_cols = _as_list(by, "by")
    require_columns(frame, [prob, correct, *by_cols], function="reliability", frame_name="frame")
    probs = pd.to_numeric(frame[prob], errors="coerce").to_numpy(dtype=float)
    verdicts = frame[correct].astype("boolean")
    if len(probs) and (np.nanmin(probs) < 0 or np.nanmax(probs) > 1):
        raise ValueError(
            f"reliability(): column {prob!r} must hold probabilities in [0, 1]; it holds values "
            f"from {np.nanmin(probs)!r} to {np.nanmax(probs)!r} (a logprob? pass its exp)"
        )
    known = np.isfinite(probs) & verdicts.notna().to_numpy()
    events = pd.DataFrame({col: frame[col].to_numpy()[known] for col in by_cols})
    events["prob"] = probs[known]
    events["hit"] = verdicts.to_numpy(dtype=bool, na_value=False)[known]
    out = _reliability_bins(events, by_cols, bins, ci, hits="n_true")
    out.attrs["n_missing"] = int((~known).sum())
    return out


def _reliability_bins(
    events: pd.DataFrame, by_cols: list[str], bins: int, ci: float, *, hits: str
) -> pd.DataFrame:
    """Events (``prob``, ``hit`` and the ``by`` columns) binned by probability, with the share of
    hits per bin and its Wilson interval."""
    prob = events["prob"].clip(0.0, 1.0).to_numpy()
    events = events.assign(prob=prob, bin=np.minimum((prob * bins).astype(int), bins - 1))
    grouped = events.groupby([*by_cols, "bin"], sort=True, dropna=False, observed=True)
    out = grouped.agg(count=("hit", "size"), **{hits: ("hit", "sum")}, mean_prob=("prob", "mean"))
    out = out.reset_index()
    out["observed"] = out[hits] / out["count"]
    out["prob_low"] = out["bin"] / bins
    out["prob_high"] = (out["bin"] + 1) / bins
    out["observed_low"], out["observed_high"] = wilson_interval(out[hits], out["count"], ci)
    out["count"] = out["count"].astype("int64")
    out[hits] = out[hits].astype("int64")
    columns = [*by_cols, "bin", "prob_low", "prob_high", "mean_prob", "observed"]
    columns += ["observed_low", "observed_high", "count", hits]
    result: pd.DataFrame = out[columns].reset_index(drop=True)
    result.attrs["bins"] = bins
    result.attrs["ci"] = ci
    return result


def _sampled_alternatives(
    tokens: pd.DataFrame, alternatives: pd.DataFrame, keys: list[str], by_cols: list[str]
) -> pd.DataFrame:
    """The alternatives at generated positions (echoed prompt positions left out), with the k
    the request asked for as ``_k`` (NaN where the frame does not say)."""
    alts: pd.DataFrame = alternatives[[*keys, "prob", "chosen", *by_cols]].dropna(
        subset=["position", "prob"]
    )
    asked = (
        pd.to_numeric(alternatives.loc[alts.index, "logprobs"], errors="coerce")
        if "logprobs" in alternatives.columns
        else math.nan
    )
    alts = alts.assign(chosen=alts["chosen"].fillna(False).astype(bool), _k=asked)
    if "echo" not in tokens.columns:
        return alts
    toks = tokens[[*keys, "echo"]].dropna(subset=["position"])
    prompt_keys = toks[toks["echo"].fillna(False).astype(bool)][keys]
    if len(prompt_keys):
        marker = prompt_keys.assign(_prompt=True)
        alts = alts.merge(marker, on=keys, how="left")
        alts = alts[alts["_prompt"].isna()].drop(columns="_prompt")
    return alts


def _top_k(alts: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The rows of ``alts`` among the k most likely at their position (see `calibration`).

    ``alts["_k"]`` is the k the request asked for where known (NaN otherwise)."""
    if alts.empty:
        empty: pd.DataFrame = alts.drop(columns="_k")
        return empty
    # Rank by reported probability within the position; ties keep their frame order.
    rank = alts.groupby(keys, sort=False)["prob"].rank(method="first", ascending=False)
    per_position = alts.groupby(keys, sort=False)["prob"].transform("size")
    fewest = per_position.groupby([alts[c] for c in keys[:-1]], sort=False).transform("min")
    # The k asked for can exceed what the server returns (OpenAI caps logprobs at 5): the fewer.
    k = np.fmin(
        alts["_k"].where(alts["_k"] >= 0).to_numpy(dtype=float), fewest.to_numpy(dtype=float)
    )
    top: pd.DataFrame = alts[rank.to_numpy() <= k].drop(columns="_k")
    return top
