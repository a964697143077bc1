"""Plots as data: trace types, values, titles and heat-map cells; never pixels."""

from __future__ import annotations

import copy
import html
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcompletions import metrics, plots, visible_token
from nbcompletions.plots._highlight import POPUP_HANDLER

# The contract's columns (nbcompletions/_frames.py), written out so these tests pin the layout.
TOKEN_COLUMNS = [
    "index",
    "prompt_index",
    "choice",
    "position",
    "token",
    "token_display",
    "logprob",
    "prob",
    "text_offset",
    "echo",
    "rank",
    "top_mass",
    "entropy_low",
    "entropy_high",
]
ALTERNATIVE_COLUMNS = [
    "index",
    "position",
    "rank",
    "token",
    "token_display",
    "logprob",
    "prob",
    "chosen",
]

WORDS = ["<b>", " the", "\n", "&amp;", "a\"b'", " x", "  two  spaces", "\t"]


def make_frames(
    n_tokens: int = 8, n_choices: int = 2, k: int = 3, echo_tokens: int = 2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tokens and alternatives frames in the contract's layout, as an echo+logprobs request gives.

    Position 0 of an echoed prompt has a null logprob and no alternatives; a chosen token drawn
    at rank k+1 is one the top-k did not contain.
    """
    rng = np.random.default_rng(seed)
    token_rows, alternative_rows = [], []
    for index in range(n_choices):
        offset = 0
        for position in range(n_tokens):
            echo = position < echo_tokens
            top = np.sort(np.log(rng.dirichlet(np.ones(k + 2))[:k]))[::-1]
            chosen_rank = int(rng.integers(1, k + 2))
            word = WORDS[(position + index) % len(WORDS)]
            if echo and position == 0:
                logprob = np.nan
            elif chosen_rank <= k:
                logprob = top[chosen_rank - 1]
            else:
                logprob = top[-1] - 1.0
            token_rows.append(
                {
                    "index": index,
                    "prompt_index": 0,
                    "choice": index,
                    "position": position,
                    "token": word,
                    "token_display": visible_token(word),
                    "logprob": logprob,
                    "prob": np.exp(logprob),
                    "text_offset": offset,
                    "echo": echo,
                    "rank": pd.NA if np.isnan(logprob) else chosen_rank,
                    "top_mass": float(np.exp(top).sum()),
                    "entropy_low": 0.5 + 0.1 * position,
                    "entropy_high": 1.0 + 0.2 * position,
                }
            )
            offset += len(word)
            if np.isnan(logprob):
                continue
            for rank in range(1, k + 1):
                alternative_rows.append(
                    {
                        "index": index,
                        "position": position,
                        "rank": rank,
                        "token": word if rank == chosen_rank else f"alt{rank}<",
                        "token_display": visible_token(
                            word if rank == chosen_rank else f"alt{rank}<"
                        ),
                        "logprob": top[rank - 1],
                        "prob": np.exp(top[rank - 1]),
                        "chosen": rank == chosen_rank,
                    }
                )
    tokens = pd.DataFrame(token_rows, columns=TOKEN_COLUMNS)
    tokens["rank"] = tokens["rank"].astype("Int64")
    alternatives = pd.DataFrame(alternative_rows, columns=ALTERNATIVE_COLUMNS)
    return tokens, alternatives


def make_sweep_choices() -> pd.DataFrame:
    """A sweep's choices frame: 3 temperatures x 2 prompts x 3 repeats, one failed request."""
    rows: list[dict[str, Any]] = []
    for temperature in (0.0, 0.5, 1.0):
        for prompt_id in (0, 1):
            for repeat in range(3):
                value = -1.0 - temperature - 0.3 * prompt_id + 0.1 * repeat
                rows.append(
                    {
                        "index": 0,
                        "temperature": temperature,
                        "prompt_id": prompt_id,
                        "repeat": repeat,
                        "mean_logprob": value,
                        "error": None,
                        "stop": ["\n"] if repeat % 2 else None,
                    }
                )
    rows.append(
        {
            "index": 0,
            "temperature": 1.0,
            "prompt_id": 0,
            "repeat": 3,
            "mean_logprob": np.nan,
            "error": "APIError: 500",
            "stop": None,
        }
    )
    choices: pd.DataFrame = pd.DataFrame(rows)
    return choices


@pytest.fixture
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return make_frames()


# -------------------------------------------------------------------------------------------
# Shared behaviour


def all_figures(tokens: pd.DataFrame, alternatives: pd.DataFrame) -> list[go.Figure]:
    return [
        plots.token_probabilities(tokens),
        plots.entropy(tokens),
        plots.alternatives(alternatives),
        plots.rank_histogram(tokens),
        plots.mean_ci(make_sweep_choices(), x="temperature", y="mean_logprob", color="prompt_id"),
    ]


def test_every_plot_returns_a_figure_without_showing_it(frames, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("plots must never call .show()")

    monkeypatch.setattr(go.Figure, "show", refuse)
    tokens, alternatives = frames
    for fig in all_figures(tokens, alternatives):
        assert isinstance(fig, go.Figure)
        assert fig.data


def test_inputs_are_not_mutated(frames) -> None:
    tokens, alternatives = frames
    tokens.attrs["vocab_size"] = 50257
    choices = make_sweep_choices()
    before = (copy.deepcopy(tokens), copy.deepcopy(alternatives), copy.deepcopy(choices))
    all_figures(tokens, alternatives)
    plots.mean_ci(choices, x="stop", y="mean_logprob", facet_col="prompt_id", interval="band")
    plots.highlight(tokens, alternatives=alternatives)
    pd.testing.assert_frame_equal(tokens, before[0])
    pd.testing.assert_frame_equal(alternatives, before[1])
    pd.testing.assert_frame_equal(choices, before[2])
    assert tokens.attrs == {"vocab_size": 50257}


@pytest.mark.parametrize(
    ("call", "missing"),
    [
        (lambda t, a: plots.token_probabilities(t.drop(columns="prob")), "prob"),
        (lambda t, a: plots.token_probabilities(t, y="probability"), "probability"),
        (lambda t, a: plots.token_probabilities(t, hover_data=("logprob", "surprise")), "surprise"),
        (lambda t, a: plots.entropy(t.drop(columns="entropy_high")), "entropy_high"),
        (lambda t, a: plots.entropy(t.drop(columns="top_mass")), "top_mass"),
        (lambda t, a: plots.alternatives(a.drop(columns="chosen")), "chosen"),
        (lambda t, a: plots.alternatives(t.drop(columns="rank")), "rank"),
        (lambda t, a: plots.rank_histogram(t.drop(columns="rank")), "rank"),
        (lambda t, a: plots.rank_histogram(t, color="temperature"), "temperature"),
        (lambda t, a: plots.highlight(t.drop(columns="token")), "token"),
        (lambda t, a: plots.highlight(t, alternatives=a.drop(columns="prob")), "prob"),
        (lambda t, a: plots.mean_ci(make_sweep_choices(), x="top_p", y="mean_logprob"), "top_p"),
        (
            lambda t, a: plots.mean_ci(
                make_sweep_choices(), x="temperature", y="mean_logprob", facet_col="model"
            ),
            "model",
        ),
    ],
)
def test_a_missing_column_is_named_with_the_columns_present(frames, call, missing) -> None:
    tokens, alternatives = frames
    with pytest.raises(ValueError, match=rf"'{missing}'[^;]* not in the \w+ frame") as raised:
        call(tokens, alternatives)
    assert "columns present: [" in str(raised.value)


def test_a_non_frame_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="takes the tokens DataFrame, got dict"):
        plots.token_probabilities({"prob": [0.5]})  # type: ignore[arg-type]  # the refusal under test


def test_unknown_index_lists_the_indices_present(frames) -> None:
    tokens, alternatives = frames
    with pytest.raises(
        ValueError, match=r"index 7 is not in the tokens frame; indices present: \[0, 1\]"
    ):
        plots.token_probabilities(tokens, index=7)
    with pytest.raises(ValueError, match=r"index 5 is not in the alternatives frame"):
        plots.alternatives(alternatives, index=5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda t, a: plots.token_probabilities(t, render_mode="canvas"),
            r"render_mode must be one of \['auto', 'svg', 'webgl'\], got 'canvas'",
        ),
        (
            lambda t, a: plots.alternatives(a, max_positions=0),
            r"max_positions must be an integer >= 1, got 0",
        ),
        (
            lambda t, a: plots.highlight(t, max_positions=2.5),  # type: ignore[arg-type]  # wrong on purpose
            r"max_positions must be an integer >= 1, got 2.5",
        ),
        (
            lambda t, a: plots.rank_histogram(t, buckets=(5, 1)),
            r"buckets must be increasing integers >= 1 .* got \(5, 1\)",
        ),
        (lambda t, a: plots.rank_histogram(t, buckets=()), r"buckets must be .* got \(\)"),
        (
            lambda t, a: plots.mean_ci(
                make_sweep_choices(), x="temperature", y="mean_logprob", ci=95
            ),
            r"ci must be a level in \(0, 1\) or None, got 95",
        ),
        (
            lambda t, a: plots.mean_ci(
                make_sweep_choices(), x="temperature", y="mean_logprob", interval="ribbon"
            ),
            r"interval must be one of \['bars', 'band'\], got 'ribbon'",
        ),
        (
            lambda t, a: plots.mean_ci(make_sweep_choices(), x="temperature", y="error"),
            r"column 'error' must be numeric",
        ),
    ],
)
def test_bad_options_name_the_parameter_range_and_value(frames, call, message) -> None:
    tokens, alternatives = frames
    with pytest.raises(ValueError, match=message):
        call(tokens, alternatives)


@pytest.mark.slow
def test_import_nbcompletions_does_not_import_plotly() -> None:
    code = (
        "import sys, nbcompletions; assert 'plotly' not in sys.modules, 'plotly imported';"
        "nbcompletions.plots.token_probabilities; assert 'plotly' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_highlight_runs_without_importing_plotly() -> None:
    # highlight writes HTML and CSS: loading plotly for it would cost a second for nothing.
    code = (
        "import sys, pandas as pd; from nbcompletions import plots;"
        "tokens = pd.DataFrame({'index': [0, 0], 'position': [0, 1], 'token': ['a', 'b'],"
        " 'prob': [0.5, 0.9]});"
        "assert 'nbc-highlight' in plots.highlight(tokens).html;"
        "assert plots.PROB_COLORSCALE[0][0] == 0.0;"
        "assert 'plotly' not in sys.modules, sorted(m for m in sys.modules if 'plotly' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves() -> None:
    assert sorted(dir(plots)) == sorted(set(dir(plots)) | set(plots.__all__))
    for name in plots.__all__:
        assert getattr(plots, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'sweep'"):
        plots.sweep  # noqa: B018 - renamed to mean_ci, without an alias


# -------------------------------------------------------------------------------------------
# token_probabilities


def test_token_probabilities_one_trace_per_choice_and_prompt_part(frames) -> None:
    tokens, _ = frames
    fig = plots.token_probabilities(tokens)
    assert [trace.name for trace in fig.data] == [
        "choice 0 (prompt)",
        "choice 0",
        "choice 1 (prompt)",
        "choice 1",
    ]
    assert fig.layout.showlegend
    assert fig.layout.legend.title.text == ""  # "choice 0" says it; no "index" title
    generated = tokens[(tokens["index"] == 1) & ~tokens["echo"]].sort_values("position")
    np.testing.assert_array_equal(fig.data[3].x, generated["position"])
    np.testing.assert_allclose(fig.data[3].y, generated["prob"])
    assert fig.data[0].marker.symbol == "circle-open"
    assert fig.data[0].line.dash == "dot"
    assert fig.data[1].marker.symbol == "circle"
    assert all(type(trace) is go.Scatter for trace in fig.data)
    assert fig.layout.title.text.startswith("Probability of each chosen token")
    # Two choices hold different tokens at one position: the axis cannot name them.
    assert fig.layout.xaxis.title.text == "position in the text (hover for the token)"
    assert fig.layout.yaxis.title.text == "probability of the chosen token"
    assert tuple(fig.layout.yaxis.range) == (-0.02, 1.02)


def test_token_probabilities_hover_shows_escaped_token_logprob_and_rank(frames) -> None:
    tokens, _ = frames
    fig = plots.token_probabilities(tokens, index=0, echo=False)
    generated = tokens[(tokens["index"] == 0) & ~tokens["echo"]].sort_values("position")
    ranks = generated["rank"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    shown = [html.escape(visible_token(t) or "", quote=False) for t in generated["token"]]
    assert list(fig.data[0].text) == shown
    texts = "".join(fig.data[0].text)
    assert "↵" in texts  # a newline token reads as ↵, not a line break
    assert "··two··spaces" in texts  # spaces are visible
    assert "&amp;amp;" in texts
    np.testing.assert_allclose(np.asarray(fig.data[0].customdata)[:, 0], generated["logprob"])
    np.testing.assert_array_equal(np.asarray(fig.data[0].customdata)[:, 1], ranks)
    assert "logprob %{customdata[0]:.4g}" in fig.data[0].hovertemplate
    # k unknown: the rank reads as a whole number ("rank 6.000" before).
    assert "rank %{customdata[1]:d}" in fig.data[0].hovertemplate
    # k known: as the popup and the heat map write it, ">k" outside the top k.
    k = int(np.nanmax(ranks)) - 1
    with_k = plots.token_probabilities(tokens, index=0, echo=False, top_k=k)
    expected = [
        f"{t}<br>rank {'none' if np.isnan(r) else (f'>{k}' if r > k else int(r))}"
        for t, r in zip(shown, ranks, strict=True)
    ]
    assert list(with_k.data[0].text) == expected
    assert "rank" not in with_k.data[0].hovertemplate  # it rides in the text
    assert f"rank &gt;{k}" not in "".join(expected)  # ">" is plain text in a hover
    assert any(f"rank >{k}" in t for t in expected)
    from_attrs = generated.copy()
    from_attrs.attrs["logprobs"] = k
    assert list(plots.token_probabilities(from_attrs).data[0].text) == expected


def test_token_plots_name_the_tokens_on_the_x_axis(frames) -> None:
    tokens, _ = frames
    one = tokens[tokens["index"] == 0].sort_values("position")
    expected = [html.escape(visible_token(t) or "", quote=False)[:11] for t in one["token"]]
    for fig, axis_name in (
        (plots.token_probabilities(one), "xaxis"),
        (plots.entropy(one), "xaxis2"),
    ):
        axis = fig.layout[axis_name]
        assert list(axis.tickvals) == one["position"].tolist()
        assert [t[:11] for t in axis.ticktext] == [t or "∅" for t in expected]
        assert axis.title.text == "token (position in the text)"
    assert "··two··spaces"[:11] in "".join(plots.token_probabilities(one).layout.xaxis.ticktext)
    # A long completion names every n-th token, at most 60.
    long, _ = make_frames(n_tokens=500, n_choices=1, echo_tokens=0)
    axis = plots.token_probabilities(long).layout.xaxis
    assert 50 <= len(axis.tickvals) <= 60
    assert axis.tickvals[1] - axis.tickvals[0] == 9


def test_token_probabilities_echo_false_and_index_select_rows(frames) -> None:
    tokens, _ = frames
    fig = plots.token_probabilities(tokens, index=[1], echo=False, color=None)
    assert len(fig.data) == 1
    assert fig.data[0].name == "completion"
    assert fig.layout.showlegend is False  # one line: a legend would only say "index 0"
    assert list(fig.data[0].x) == list(range(2, 8))
    one = plots.token_probabilities(tokens, index=0)
    assert [trace.name for trace in one.data] == ["prompt", "completion"]
    assert one.layout.showlegend


def test_token_probabilities_switches_to_webgl_above_the_threshold() -> None:
    tokens, _ = make_frames(n_tokens=plots.WEBGL_THRESHOLD + 1, n_choices=1, echo_tokens=0)
    fig = plots.token_probabilities(tokens)
    assert type(fig.data[0]) is go.Scattergl
    assert "WebGL" in fig.layout.title.text
    assert type(plots.token_probabilities(tokens, render_mode="svg").data[0]) is go.Scatter
    small, _ = make_frames()
    assert type(plots.token_probabilities(small, render_mode="webgl").data[0]) is go.Scattergl


@pytest.mark.parametrize(
    ("function", "frame_name", "advice"),
    [
        (plots.token_probabilities, "tokens", r"logprobs were requested: pass completion\.tokens"),
        (plots.entropy, "tokens", r"logprobs=5"),
        (plots.rank_histogram, "tokens", r"logprobs=5"),
        (plots.highlight, "tokens", r"logprobs=5"),
        (plots.alternatives, "alternatives", r"pass completion\.alternatives"),
    ],
)
def test_every_plot_of_an_empty_frame_says_so(frames, function, frame_name, advice) -> None:
    tokens, alternatives = frames
    empty = (tokens if frame_name == "tokens" else alternatives).iloc[:0]
    with pytest.raises(ValueError, match=rf"\(\): the {frame_name} frame is empty \(0 rows\)"):
        function(empty)
    with pytest.raises(ValueError, match=advice):
        function(empty)


def test_mean_ci_of_an_empty_frame_says_so() -> None:
    empty = make_sweep_choices().iloc[:0]
    with pytest.raises(
        ValueError, match=r"mean_ci\(\): the choices frame is empty.*result\.choices"
    ):
        plots.mean_ci(empty, x="temperature", y="mean_logprob")


def test_echo_false_on_a_prompt_only_frame_says_so(frames) -> None:
    tokens, _ = frames
    prompt_only = tokens.assign(echo=True)
    with pytest.raises(ValueError, match=r"token_probabilities\(\): every token .* echo=True"):
        plots.token_probabilities(prompt_only, echo=False)


# -------------------------------------------------------------------------------------------
# entropy


def test_entropy_band_fills_between_the_bounds_with_coverage_below(frames) -> None:
    tokens, _ = frames
    fig = plots.entropy(tokens, index=0)
    low, high, coverage = fig.data
    choice = tokens[tokens["index"] == 0].sort_values("position")
    np.testing.assert_allclose(low.y, choice["entropy_low"])
    np.testing.assert_allclose(high.y, choice["entropy_high"])
    np.testing.assert_allclose(high.customdata, choice["entropy_low"])
    assert high.fill == "tonexty"
    assert low.fill is None
    np.testing.assert_allclose(coverage.y, choice["top_mass"])
    assert coverage.yaxis == "y2"
    assert high.yaxis == "y"
    # The bottom row is 30% high: its title must be short, or it runs into the row above.
    assert fig.layout.yaxis2.title.text == "top-k mass"
    assert fig.layout.yaxis.title.text == "entropy (nats)"
    assert fig.layout.yaxis.domain[0] > fig.layout.yaxis2.domain[1]
    assert fig.layout.showlegend is False  # one choice: no legend reading "index 0"
    # The echoed prompt (positions 0-1) is shaded.
    prompt = [shape for shape in fig.layout.shapes if shape.type == "rect"]
    assert [(s.x0, s.x1) for s in prompt] == [(-0.5, 1.5)] * 2  # one per row
    assert [a.text for a in fig.layout.annotations] == ["prompt"]


def test_entropy_bands_pair_up_per_choice_and_coverage_can_be_left_out(frames) -> None:
    tokens, _ = frames
    fig = plots.entropy(tokens, coverage=None, echo=False)
    assert len(fig.data) == 4
    assert [trace.fill for trace in fig.data] == [None, "tonexty", None, "tonexty"]
    assert fig.data[1].legendgroup == fig.data[0].legendgroup == "choice 0"
    assert [t.name for t in fig.data if t.showlegend is not False] == ["choice 0", "choice 1"]
    assert fig.layout.showlegend
    assert "yaxis2" not in fig.layout.to_plotly_json()
    assert not fig.layout.shapes


# -------------------------------------------------------------------------------------------
# alternatives


def test_alternatives_heat_map_cells_hold_probabilities_and_tokens(frames) -> None:
    _, alternatives = frames
    fig = plots.alternatives(alternatives, index=1)
    heatmap = fig.data[0]
    assert type(heatmap) is go.Heatmap
    choice = alternatives[alternatives["index"] == 1]
    positions = sorted(choice["position"].unique())
    assert list(heatmap.x) == [1, 2, 3]
    # Each row names its position and the token sampled there.
    sampled = {
        r.position: html.escape(visible_token(str(r.token)) or "", quote=False)
        for r in choice[choice["chosen"]].itertuples()
    }
    assert list(fig.layout.yaxis.ticktext) == [
        f"{p} {sampled.get(p, '')}".rstrip() for p in positions
    ]
    assert fig.layout.yaxis.title.text == "position in the text and the sampled token"
    z = np.asarray(heatmap.z, dtype=float)
    text = np.asarray(heatmap.text, dtype=object)
    for row in choice.itertuples():
        i, j = positions.index(row.position), row.rank - 1
        # The default colour is log10 p on the scale from -4 (red) to 0 (green).
        assert z[i, j] == pytest.approx(max(np.log10(row.prob), -4.0))
        assert f"prob {row.prob:.4f}" in heatmap.customdata[i][j]
        label = html.escape(visible_token(str(row.token)) or "", quote=False)
        assert text[i, j] == (f"<b>{label} ✓</b>" if row.chosen else label)
    assert (heatmap.zmin, heatmap.zmax) == (-4.0, 0.0)
    assert list(heatmap.colorbar.ticktext) == ["≤0.0001", "0.001", "0.01", "0.1", "1"]
    assert heatmap.texttemplate == "%{text}"
    assert fig.layout.title.text.startswith("Top alternatives at each position (choice 1)")
    linear = plots.alternatives(alternatives, index=1, scale="prob").data[0]
    assert (linear.zmin, linear.zmax) == (0.0, 1.0)
    assert np.nanmax(np.asarray(linear.z, dtype=float)) <= 1.0
    with pytest.raises(ValueError, match=r"scale must be one of \['logprob', 'prob'\]"):
        plots.alternatives(alternatives, scale="rank")


def test_alternatives_outlines_each_chosen_cell(frames) -> None:
    _, alternatives = frames
    fig = plots.alternatives(alternatives, index=0)
    choice = alternatives[alternatives["index"] == 0]
    positions = sorted(choice["position"].unique())
    chosen = choice[choice["chosen"]]
    outlined = {((s.x0 + s.x1) / 2, (s.y0 + s.y1) / 2) for s in fig.layout.shapes}
    assert outlined == {(r.rank, positions.index(r.position)) for r in chosen.itertuples()}


def test_alternatives_caps_positions_and_says_so_in_the_title() -> None:
    _, alternatives = make_frames(n_tokens=300, n_choices=1, echo_tokens=0)
    fig = plots.alternatives(alternatives)
    assert np.asarray(fig.data[0].z).shape == (100, 3)
    assert "positions 0–99 of 300 shown (max_positions=100" in fig.layout.title.text
    fig = plots.alternatives(alternatives, start=250, max_positions=20)
    assert [t.split()[0] for t in fig.layout.yaxis.ticktext] == [str(p) for p in range(250, 270)]
    assert "positions 250–269 of 300 shown" in fig.layout.title.text
    whole = plots.alternatives(alternatives, max_positions=300)
    assert "shown" not in whole.layout.title.text


def test_alternatives_refuses_frames_with_several_completions_per_index(frames) -> None:
    _, alternatives = frames
    twice = pd.concat([alternatives.assign(request_id=0), alternatives.assign(request_id=1)])
    with pytest.raises(ValueError, match=r"more than one completion .*request_id =="):
        plots.alternatives(twice)


# -------------------------------------------------------------------------------------------
# rank_histogram


def test_rank_histogram_counts_gltr_buckets(frames) -> None:
    tokens, _ = frames
    fig = plots.rank_histogram(tokens, normalize=False)
    ranks = tokens["rank"].dropna().astype(int)
    expected = [(ranks == 1).sum(), ((ranks >= 2) & (ranks <= 5)).sum(), (ranks > 5).sum()]
    assert list(fig.data[0].x) == ["1", "2–5", ">5"]
    assert list(fig.data[0].y) == expected
    assert "2 tokens without a rank left out" in fig.layout.title.text
    shares = plots.rank_histogram(tokens)
    np.testing.assert_allclose(shares.data[0].y, np.array(expected) / sum(expected))


def test_rank_histogram_buckets_are_a_parameter_and_color_splits_choices(frames) -> None:
    tokens, _ = frames
    fig = plots.rank_histogram(tokens, buckets=(1, 2, 3), color="index", normalize=False)
    assert [trace.name for trace in fig.data] == ["choice 0", "choice 1"]
    assert list(fig.data[0].x) == ["1", "2", "3", ">3"]
    ranks = tokens.loc[tokens["index"] == 0, "rank"].dropna().astype(int)
    assert list(fig.data[0].y) == [(ranks == r).sum() for r in (1, 2, 3)] + [(ranks > 3).sum()]
    assert fig.layout.barmode == "group"
    wide = plots.rank_histogram(tokens, buckets=(3, 10))
    assert list(wide.data[0].x) == ["1–3", "4–10", ">10"]


# -------------------------------------------------------------------------------------------
# mean_ci


def test_mean_ci_plots_mean_and_bootstrap_interval_over_repeats() -> None:
    choices = make_sweep_choices()
    fig = plots.mean_ci(choices, x="temperature", y="mean_logprob", color="prompt_id")
    # The legend's title names the column once; the entries are its values.
    assert [trace.name for trace in fig.data] == ["0", "1"]
    assert fig.layout.legend.title.text == "prompt_id"
    # The title says "mean ± CI"; the axis names the metric (not "mean mean_logprob").
    assert fig.layout.yaxis.title.text == "mean_logprob"
    ok = choices[choices["error"].isna() & (choices["prompt_id"] == 1)]
    grouped = ok.groupby("temperature")["mean_logprob"]
    # The two prompts' lines are set apart by 1/40 of the x spacing, so neither hides the other.
    np.testing.assert_allclose(fig.data[1].x, np.array([0.0, 0.5, 1.0]) + 0.5 / 80)
    np.testing.assert_allclose(fig.data[0].x, np.array([0.0, 0.5, 1.0]) - 0.5 / 80)
    assert [fig.data[0].marker.symbol, fig.data[1].marker.symbol] == ["circle", "square"]
    np.testing.assert_allclose(fig.data[1].y, grouped.mean())
    intervals = [metrics.bootstrap_interval(values) for _, values in grouped]
    np.testing.assert_allclose(
        fig.data[1].error_y.array, [h for _, h in intervals] - grouped.mean()
    )
    np.testing.assert_allclose(
        fig.data[1].error_y.arrayminus, grouped.mean() - [lo for lo, _ in intervals]
    )
    assert fig.data[1].mode == "lines+markers"
    assert "1 failed request left out" in fig.layout.title.text
    assert "95% CI (percentile bootstrap, 2,000 resamples)" in fig.layout.title.text


def test_mean_ci_intervals_of_rates_stay_in_range_and_coincident_lines_show() -> None:
    # Issue 20: distinct_1 upper bounds of 1.011-1.031 and a repetition lower bound of -0.0079
    # were drawn outside [0, 1]; distinct_2 flat at 1.0 hid one line behind another.
    rows = []
    for prompt_id in (0, 1):
        for temperature in (0.5, 1.0):
            for repeat, rate in enumerate([0.0, 0.0, 0.0, 0.04, 0.0]):
                distinct = 1.0 if prompt_id == 0 else [1.0, 0.97, 1.0, 1.0, 0.95][repeat]
                rows.append((prompt_id, temperature, rate, distinct, 1.0, repeat % 2 == 0))
    choices = pd.DataFrame(
        rows,
        columns=["prompt_id", "temperature", "repetition_rate", "distinct_1", "distinct_2", "ok"],
    )
    for y in ("repetition_rate", "distinct_1", "ok"):
        fig = plots.mean_ci(choices, x="temperature", y=y, color="prompt_id")
        for trace in fig.data:
            assert (np.asarray(trace.y) + np.asarray(trace.error_y.array) <= 1 + 1e-12).all()
            assert (np.asarray(trace.y) - np.asarray(trace.error_y.arrayminus) >= -1e-12).all()
    assert "Wilson score" in plots.mean_ci(choices, x="temperature", y="ok").layout.title.text
    flat = plots.mean_ci(choices, x="temperature", y="distinct_2", color="prompt_id")
    assert "every mean is 1: the lines lie on top of one another" in flat.layout.title.text
    assert flat.data[0].x[0] != flat.data[1].x[0]
    assert flat.data[0].line.dash != flat.data[1].line.dash


def test_mean_ci_band_facets_and_no_interval() -> None:
    choices = make_sweep_choices()
    fig = plots.mean_ci(
        choices, x="temperature", y="mean_logprob", facet_col="prompt_id", interval="band"
    )
    bands = [trace for trace in fig.data if trace.fill == "toself"]
    means = [trace for trace in fig.data if trace.fill != "toself"]
    assert len(bands) == len(means) == 2
    assert [trace.xaxis for trace in means] == ["x", "x2"]
    assert [a.text for a in fig.layout.annotations] == ["prompt_id=0", "prompt_id=1"]
    assert means[0].error_y.array is None
    none = plots.mean_ci(choices, x="temperature", y="mean_logprob", ci=None)
    assert none.data[0].error_y.array is None
    assert "CI" not in none.layout.title.text


def test_mean_ci_with_a_categorical_list_valued_parameter() -> None:
    fig = plots.mean_ci(make_sweep_choices(), x="stop", y="mean_logprob")
    assert list(fig.data[0].x) == ["['\\n']", "None"]
    assert fig.data[0].mode == "markers"
    assert fig.layout.xaxis.type == "category"


def test_mean_ci_counts_rows_without_a_value() -> None:
    choices = make_sweep_choices().drop(columns="error")
    fig = plots.mean_ci(choices, x="temperature", y="mean_logprob")
    assert "1 row without mean_logprob left out" in fig.layout.title.text


# -------------------------------------------------------------------------------------------
# highlight


class SpanCollector(HTMLParser):
    """Every token of a highlight, in document order: its <summary> attributes and text
    ("text") and its popup's text ("popup")."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict[str, str]] = []
        self._in: str | None = None
        self._depth = 0
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attributes = dict(attrs)
        if tag == "summary" and "data-prob" in attributes:
            self.spans.append({**attributes, "text": "", "popup": ""})
            self._in, self._depth = "text", 1
        elif tag == "div" and attributes.get("class") == "nbc-popup":
            self._in, self._depth = "popup", 1
        elif self._in:
            self._depth += 1

    def handle_endtag(self, tag):
        if self._in:
            self._depth -= 1
            if self._depth == 0:
                self._in = None

    def handle_data(self, data):
        if self._in:
            self.spans[-1][self._in] += data


def parse(markup: str) -> SpanCollector:
    parser = SpanCollector()
    parser.feed(markup)
    parser.close()
    return parser


def assert_self_contained(markup: str) -> None:
    """No script tags, no URLs, and one event handler only: the highlight's own onclick, which
    closes its popup on a click elsewhere or Escape where scripts run (exactly once)."""
    assert "<script" not in markup.lower()
    handler = f'class="nbc-highlight" onclick="{POPUP_HANDLER}"'
    assert markup.count(handler) == 1
    rest = markup.replace(handler, "")
    assert not re.search(r"https?:|//|url\(|@import|\bon\w+=", rest, flags=re.IGNORECASE)


def test_highlight_is_self_contained_escaped_and_one_span_per_token(frames) -> None:
    tokens, alternatives = frames
    result = plots.highlight(tokens, alternatives=alternatives, index=0)
    markup = result.html
    assert result._repr_html_() == markup
    assert_self_contained(markup)
    assert "&lt;b&gt;" in markup
    assert "<b>" not in markup
    choice = tokens[tokens["index"] == 0].sort_values("position")
    spans = parse(markup).spans
    assert len(spans) == len(choice) == result.n_tokens
    for span, row in zip(spans, choice.itertuples(), strict=True):
        assert span["text"] == visible_token(row.token, spaces=False)
        if np.isnan(row.prob):
            assert span["data-prob"] == ""
            assert "no logprob" in span["popup"]
        else:
            assert float(span["data-prob"]) == pytest.approx(row.prob, rel=1e-5)
            assert f"p {row.prob:.4f}" in span["popup"]
        # The popup's first line is the token with its whitespace made visible.
        assert span["popup"].splitlines()[0] == visible_token(row.token)
        assert ("font-style:italic" in span["style"]) == row.echo
    assert markup.count("↵</summary>") == 1  # the newline token: ↵ then a line break after it
    assert markup.count("<br>") == 1
    assert "white-space:pre-wrap" in markup


def test_highlight_popup_lists_the_alternatives(frames) -> None:
    tokens, alternatives = frames
    spans = parse(plots.highlight(tokens, alternatives=alternatives, index=1).html).spans
    at = alternatives[(alternatives["index"] == 1) & (alternatives["position"] == 3)]
    tip = spans[3]["popup"]
    assert "alternatives:" in tip
    for row in at.itertuples():
        line = f"{row.prob:7.2%}  {visible_token(row.token)}" + ("  ◀ chosen" if row.chosen else "")
        assert line in tip.splitlines()
    rank = tokens.loc[(tokens["index"] == 1) & (tokens["position"] == 3), "rank"].item()
    assert (f"rank >{len(at)}" if rank > len(at) else f"rank {rank}") in tip


def test_highlight_says_outside_the_top_k_for_the_appended_sampled_token(embedded_client) -> None:
    # The server appends a token outside the top k as a k+1-th alternative with rank k+1; its
    # true rank is unknown, only that it is beyond k.
    completion = embedded_client.complete(
        "<script>quux zzz", max_tokens=1, logprobs=2, echo=True, temperature=0.0
    )
    tokens, alternatives = completion.tokens, completion.alternatives
    outside = tokens[tokens["rank"] > 2]
    assert len(outside), "the echoed prompt should have tokens outside the top 2"
    spans = parse(plots.highlight(tokens, alternatives=alternatives).html).spans
    for position in outside["position"]:
        tip = spans[int(position)]["popup"]
        assert "rank >2" in tip, tip
        assert "rank 3" not in tip
    figure = plots.alternatives(alternatives)
    assert list(figure.layout.xaxis.ticktext) == ["1", "2", ">2"]
    assert any("rank >2 · chosen" in cell for cell in figure.data[0].customdata.ravel())


def _colors(markup: str) -> list[str]:
    return [span["style"].split("background:")[1].split(";")[0] for span in parse(markup).spans]


def test_highlight_scales_and_their_legend() -> None:
    from nbcompletions.plots._colors import PROB_COLORSCALE

    probs = [1.0, 0.1, 0.01, 0.001, 0.0001, 0.00001, np.nan]
    tokens = pd.DataFrame(
        {
            "index": 0,
            "position": range(len(probs)),
            "token": list("abcdefg"),
            "prob": probs,
            "logprob": np.log(probs),
            "rank": pd.array([1, 2, 3, 4, 5, 6, pd.NA], dtype="Int64"),
        }
    )
    red, yellow, green = (color for _, color in PROB_COLORSCALE)
    grey = "#e0e0e0"

    default = plots.highlight(tokens).html
    assert default == plots.highlight(tokens, scale="logprob").html
    # log10 p from -4 (red) to 0 (green): 0.01 sits in the middle, below 0.0001 is all red.
    assert _colors(default) == [
        green,
        _colors(default)[1],
        yellow,
        _colors(default)[3],
        red,
        red,
        grey,
    ]
    assert len(set(_colors(default)[:5])) == 5  # every decade has its own colour
    assert "colour: probability, log scale (scale=&quot;logprob&quot;)" in default
    assert "≤0.0001" in default

    linear = plots.highlight(tokens, scale="prob").html
    # The linear scale is what the default replaced: everything below 0.01 looks alike.
    assert len(set(_colors(linear)[3:6])) == 1
    assert _colors(linear)[0] == green
    assert "linear scale (scale=&quot;prob&quot;)" in linear

    by_rank = plots.highlight(tokens, scale="rank").html
    # No alternatives frame: green for rank 1 to red for the largest rank present.
    assert _colors(by_rank)[0] == green
    assert _colors(by_rank)[5] == red
    assert len(set(_colors(by_rank)[:6])) == 6
    assert _colors(by_rank)[6] == grey
    assert "rank among the alternatives" in by_rank
    assert "scale=&quot;rank&quot;" in by_rank


def test_highlight_rank_scale_uses_the_top_k_of_the_alternatives(frames) -> None:
    tokens, alternatives = frames  # k = 3; a chosen token at rank 4 was outside the top 3
    markup = plots.highlight(tokens, alternatives=alternatives, index=0, scale="rank").html
    choice = tokens[tokens["index"] == 0].sort_values("position")
    colors = _colors(markup)
    from nbcompletions.plots._colors import PROB_COLORSCALE

    for color, rank in zip(colors, choice["rank"], strict=True):
        if rank is pd.NA:
            assert color == "#e0e0e0"
        elif rank == 1:
            assert color == PROB_COLORSCALE[-1][1]
        elif rank == 4:
            assert color == PROB_COLORSCALE[0][1]
    assert "&gt;3</span>" in markup  # the legend's last step: beyond the top 3


def test_highlight_refuses_an_unknown_scale_or_a_rank_scale_without_ranks(frames) -> None:
    tokens, _ = frames
    with pytest.raises(ValueError, match=r"scale must be one of \['logprob', 'rank', 'prob'\]"):
        plots.highlight(tokens, scale="log")
    with pytest.raises(ValueError, match=r"column 'rank' not in the tokens frame"):
        plots.highlight(tokens.drop(columns="rank"), scale="rank")


def test_highlight_legend_cap_echo_and_save(frames, tmp_path: Path) -> None:
    tokens, _ = frames
    result = plots.highlight(tokens, index=0, echo=False, max_positions=3, title="A <title>")
    spans = parse(result.html).spans
    assert len(spans) == 3
    assert not any("italic" in span["style"] for span in spans)
    assert "showing the first 3 of 6 tokens (max_positions=3)" in result.html
    assert "probability" in result.html
    assert "no logprob" in result.html
    assert "A &lt;title&gt;" in result.html
    path = result.save(tmp_path / "highlight.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert result.html in page
    assert_self_contained(page)
    assert repr(result).startswith("HighlightedText(3 tokens")


def test_highlight_popups_float_and_form_one_group_per_highlight(frames) -> None:
    tokens, alternatives = frames
    markup = plots.highlight(tokens, alternatives=alternatives, index=0).html
    other = plots.highlight(tokens, alternatives=alternatives, index=1).html
    # Out of the text flow: absolutely placed under the token, over the lines below.
    popups = re.findall(r'<div class="nbc-popup" style="([^"]*)"', markup)
    assert popups
    assert all("position:absolute" in style for style in popups)
    assert all("top:100%" in style and "z-index" in style for style in popups)
    details = re.findall(r'<details name="([^"]+)" style="([^"]*)"', markup)
    assert len(details) == len(popups)
    assert all("position:relative" in style for _, style in details)
    # One exclusive group per highlight: the browser keeps one popup of it open at a time.
    assert len({name for name, _ in details}) == 1
    assert re.findall(r'<details name="([^"]+)"', other)[0] != details[0][0]
    # Room under the text for the tallest popup, so a scrolling output area does not cut it.
    reserve = int(re.findall(r"padding-bottom:(\d+)px", markup)[0])
    lines = max(
        len(body.split("\n"))
        for body in re.findall(r'nbc-popup"[^>]*>(.*?)</div>', markup, flags=re.S)
    )
    assert reserve >= lines * 12 * 1.4 - 20
    tight = plots.highlight(tokens, alternatives=alternatives, index=0, popup_room=False).html
    assert "padding-bottom:0px" in tight


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=6), min_size=1, max_size=12))
def test_highlight_round_trips_any_token_text(texts: list[str]) -> None:
    tokens = pd.DataFrame(
        {
            "index": 0,
            "position": range(len(texts)),
            "token": texts,
            "prob": np.linspace(0.0, 1.0, len(texts)),
        }
    )
    markup = plots.highlight(tokens).html
    assert_self_contained(markup)
    parsed = parse(markup)
    assert parsed.tags <= {"div", "span", "br", "i", "details", "summary"}
    shown = [span["text"] for span in parsed.spans]
    assert shown == [visible_token(text, spaces=False) for text in texts]
    # Each newline breaks the line once, after its token.
    assert markup.count("<br>") == sum(text.count("\n") for text in texts)


# -------------------------------------------------------------------------------------------
# End to end: a real completion from the embedded model through the real client and frames


def test_plots_of_a_real_completion(embedded_client) -> None:
    completion = embedded_client.complete(
        "ROMEO:", max_tokens=12, logprobs=5, echo=True, n=2, temperature=1.0, seed=7
    )
    choices, tokens, alternatives = completion.frames()

    fig = plots.token_probabilities(tokens)
    assert {trace.name for trace in fig.data} == {
        "choice 0",
        "choice 0 (prompt)",
        "choice 1",
        "choice 1 (prompt)",
    }
    first = tokens[(tokens["index"] == 0) & ~tokens["echo"]].sort_values("position")
    np.testing.assert_allclose(fig.data[1].y, first["prob"])

    band = plots.entropy(tokens, index=0)
    low, high = np.asarray(band.data[0].y, float), np.asarray(band.data[1].y, float)
    scored = ~np.isnan(low)
    assert scored.sum() >= 12  # every generated token, and the prompt's after its first
    assert np.all(high[scored] >= low[scored] - 1e-9)

    heat = plots.alternatives(alternatives, index=0)
    z = np.asarray(heat.data[0].z, dtype=float)
    assert z.shape[1] >= 5
    # Alternatives come sorted by rank, so each row's probabilities fall left to right.
    assert np.all(np.diff(np.nan_to_num(z[:, :5], nan=0.0), axis=1) <= 1e-12)

    histogram = plots.rank_histogram(tokens, normalize=False)
    assert sum(histogram.data[0].y) == tokens["rank"].notna().sum()

    page = plots.highlight(tokens, alternatives=alternatives, index=0)
    spans = parse(page.html).spans
    # With echo the choice's text is the prompt followed by the completion.
    text = choices.loc[choices["index"] == 0, "text"].item()
    assert text.startswith("ROMEO:")
    assert "".join(span["text"] for span in spans) == text.replace("\n", "↵")
    assert_self_contained(page.html)
    assert len(choices) == 2


def test_hand_built_frames_match_the_frames_contract() -> None:
    from nbcompletions import _frames

    assert tuple(TOKEN_COLUMNS) == _frames.TOKEN_COLUMNS
    assert tuple(ALTERNATIVE_COLUMNS) == _frames.ALTERNATIVE_COLUMNS


def test_plots_of_frames_from_a_response_dict() -> None:
    from nbcompletions import to_frames

    response = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "<b> &\n",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": ["<b>", " &", "\n"],
                    "token_logprobs": [None, -0.5, -2.0],
                    "top_logprobs": [None, {" &": -0.5, " and": -1.2}, {".": -0.4, ",": -1.9}],
                    "text_offset": [0, 3, 5],
                },
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    _, tokens, alternatives = to_frames(
        response,
        {"prompt": "<b> &", "echo": True, "logprobs": 2, "max_tokens": 1},
        vocab_size=100,
    )
    page = plots.highlight(tokens, alternatives=alternatives).html
    assert [span["text"] for span in parse(page).spans] == ["<b>", " &", "↵"]
    assert "&lt;b&gt;" in page
    spans = parse(page).spans
    assert "rank >2" in spans[2]["popup"]  # "\n" was not among the 2 alternatives
    fig = plots.token_probabilities(tokens)
    assert [trace.name for trace in fig.data] == ["prompt", "completion"]
    np.testing.assert_allclose(fig.data[1].y, [np.exp(-2.0)])
    heat = plots.alternatives(alternatives)
    assert list(heat.layout.yaxis.ticktext) == ["1 ·&amp;", "2"]
    assert np.asarray(heat.data[0].text)[0, 0] == "<b>·&amp; ✓</b>"


def test_mean_ci_of_a_real_sweep(embedded_client) -> None:
    from nbcompletions import sweep

    result = sweep(
        embedded_client,
        prompt="ROMEO:",
        temperature=[0.5, 1.5],
        max_tokens=4,
        logprobs=1,
        repeats=3,
        progress=False,
        probe=False,
    )
    choices = result.choices
    fig = plots.mean_ci(choices, x="temperature", y="mean_logprob")
    assert list(fig.data[0].x) == [0.5, 1.5]
    ok = choices[choices["error"].isna()]
    np.testing.assert_allclose(fig.data[0].y, ok.groupby("temperature")["mean_logprob"].mean())
    means = ok.groupby("temperature")["mean_logprob"].mean().to_numpy()
    highs = [metrics.bootstrap_interval(v)[1] for _, v in ok.groupby("temperature")["mean_logprob"]]
    np.testing.assert_allclose(fig.data[0].error_y.array, np.array(highs) - means)


def test_line_plots_refuse_to_join_several_completions_in_one_line(frames) -> None:
    tokens, _ = frames
    with pytest.raises(ValueError, match=r"more than one completion per line; pick one with"):
        plots.token_probabilities(tokens, color=None)
    requests = pd.concat([tokens.assign(request_id=0), tokens.assign(request_id=1)])
    with pytest.raises(ValueError, match=r"per line.*frame\[frame.request_id == \.\.\.\]"):
        plots.entropy(requests)
    fig = plots.token_probabilities(requests, index=0, color="request_id", echo=False)
    assert [trace.name for trace in fig.data] == ["0", "1"]
    assert fig.layout.legend.title.text == "request_id"


def test_mean_ci_of_a_rate_starts_its_axis_at_zero() -> None:
    choices = make_sweep_choices().assign(rate=0.0)
    fig = plots.mean_ci(choices, x="temperature", y="rate", color="prompt_id")
    # All means 0: without this the axis ran from -1 to 1, half of it impossible values.
    assert fig.layout.yaxis.rangemode == "tozero"
    signed = plots.mean_ci(choices, x="temperature", y="mean_logprob")
    assert signed.layout.yaxis.rangemode is None


def test_mean_ci_labels_show_the_newlines_of_text_categories() -> None:
    choices = make_sweep_choices()
    choices["prompt"] = choices["prompt_id"].map({0: "ROMEO.\n", 1: "ROMEO."})
    fig = plots.mean_ci(choices, x="temperature", y="mean_logprob", color="prompt")
    # Two prompts that differ only by a newline get two different labels.
    assert [trace.name for trace in fig.data] == ["ROMEO.", "ROMEO.↵"]


# -------------------------------------------------------------------------------------------
# calibration


def test_calibration_of_a_metrics_calibration_frame_draws_bins_with_wilson_intervals() -> None:
    binned = pd.DataFrame(
        {
            "temperature": [0.5, 0.5, 1.0, 1.0],
            "bin": [0, 9, 0, 9],
            "prob_low": [0.0, 0.9, 0.0, 0.9],
            "prob_high": [0.1, 1.0, 0.1, 1.0],
            "mean_prob": [0.05, 0.95, 0.04, 0.97],
            "observed": [0.0, 1.0, 0.1, 0.8],
            "count": [40, 10, 50, 20],
            "n_chosen": [0, 10, 5, 16],
        }
    )
    binned["observed_low"], binned["observed_high"] = metrics.wilson_interval(
        binned["n_chosen"], binned["count"]
    )
    fig = plots.calibration(binned, color="temperature")
    diagonal, *rest = fig.data
    assert list(diagonal.x) == [0, 1]
    points = [t for t in rest if t.type == "scatter"]
    bars = [t for t in rest if t.type == "bar"]
    assert [p.name for p in points] == ["0.5 (ECE 0.050)", "1.0 (ECE 0.091)"]
    np.testing.assert_allclose(points[0].y, [0.0, 1.0])
    upper = np.asarray(points[0].y) + np.asarray(points[0].error_y.array)
    lower = np.asarray(points[0].y) - np.asarray(points[0].error_y.arrayminus)
    assert (upper <= 1).all()
    assert (lower >= 0).all()
    # 0 of 40 and 10 of 10: intervals of positive width, inside [0, 1].
    assert upper[0] > 0
    assert lower[1] < 1
    np.testing.assert_allclose(bars[1].y, [50, 20])
    assert "Wilson score" in fig.layout.title.text
    assert fig.layout.yaxis.title.text == "share sampled"
    with pytest.raises(ValueError, match=r"calibration\(\): column 'observed_low' not in"):
        plots.calibration(binned.drop(columns="observed_low"))
    with pytest.raises(ValueError, match=r"pass both prob= and correct="):
        plots.calibration(binned, prob="mean_prob")
    with pytest.raises(ValueError, match=r"the calibration frame is empty"):
        plots.calibration(binned.iloc[:0])


def test_calibration_of_answers_across_a_sweep_axis() -> None:
    rng = np.random.default_rng(0)
    probs = rng.uniform(0, 1, 400)
    answers = pd.DataFrame(
        {
            "label_prob": probs,
            # At temperature 0 answers are right as often as claimed; at 1 always wrong above 0.5.
            "correct": np.concatenate([rng.uniform(0, 1, 200) < probs[:200], probs[200:] < 0.5]),
            "temperature": [0.0] * 200 + [1.0] * 200,
        }
    )
    binned = metrics.reliability(
        answers, prob="label_prob", correct="correct", by="temperature", bins=5
    )
    assert binned.columns.tolist()[:2] == ["temperature", "bin"]
    assert binned["count"].sum() == 400
    assert (binned["observed_low"] >= 0).all()
    assert (binned["observed_high"] <= 1).all()
    top = binned[(binned["temperature"] == 1.0) & (binned["bin"] == 4)].iloc[0]
    assert top["observed"] == 0.0
    assert top["n_true"] == 0
    fig = plots.calibration(
        answers, prob="label_prob", correct="correct", color="temperature", bins=5
    )
    points = [t for t in fig.data if t.type == "scatter"][1:]
    assert len(points) == 2
    np.testing.assert_allclose(
        points[1].y, binned[binned["temperature"] == 1.0].sort_values("mean_prob")["observed"]
    )
    assert fig.layout.xaxis2.title.text == "probability given the answer (label_prob)"
    # The calibrated side scores a smaller ECE than the overconfident one.
    ece = [float(p.name.split("ECE ")[1].rstrip(")")) for p in points]
    assert ece[0] < ece[1]
    with pytest.raises(ValueError, match=r"'label_prob' must hold probabilities in \[0, 1\]"):
        metrics.reliability(answers.assign(label_prob=-probs), prob="label_prob", correct="correct")


def test_calibration_of_the_embedded_model(frames) -> None:
    tokens, alternatives = frames
    binned = metrics.calibration(tokens, alternatives, bins=5)
    fig = plots.calibration(binned)
    assert [t.type for t in fig.data] == ["scatter", "scatter", "bar"]
    assert fig.data[1].name.startswith("ECE ")


# -------------------------------------------------------------------------------------------
# compare


def make_compare_frame() -> pd.DataFrame:
    """The frame nbc.compare returns, by hand: " Richard" is one token on side a and two on b."""
    rows = [
        ("To", ["To"], ["To"], np.nan, np.nan, np.nan, np.nan, False),
        (" be", [" be"], [" be"], -0.5, -0.6, 0.01, 0.08, False),
        (" Richard", [" Richard"], [" Rich", "ard"], -2.0, -4.5, np.nan, np.nan, True),
        (",", [","], [","], -0.1, -0.1, 0.0, 0.02, False),
        (" or", [" or"], [" or"], -3.0, -0.2, 0.9, 2.5, True),
    ]
    start = 0
    records = []
    for span, (text, a_tokens, b_tokens, a_lp, b_lp, kl_low, kl_high, disagree) in enumerate(rows):
        end = start + len(text.encode())
        records.append(
            {
                "text_id": 0,
                "span": span,
                "start_byte": start,
                "end_byte": end,
                "text": text,
                "a_tokens": a_tokens,
                "b_tokens": b_tokens,
                "a_logprob": a_lp,
                "b_logprob": b_lp,
                "a_rank": pd.NA if span == 0 else 1,
                # b's top 2 miss the token where the sides disagree: it comes as a 3rd entry,
                # ranked k+1 = 3 ("outside the top 2").
                "b_rank": pd.NA if span == 0 else (3 if disagree else 1),
                "a_top": {} if span == 0 else {text: a_lp, " the": -3.0},
                "b_top": {}
                if span == 0
                else (
                    {" the": -0.1, " a": -2.0, text: b_lp} if disagree else {text: b_lp, " a": -3}
                ),
                "kl_lower": kl_low,
                "kl_upper": kl_high,
                "disagree": disagree,
            }
        )
        start = end
    frame: pd.DataFrame = pd.DataFrame(records)
    frame["a_rank"] = frame["a_rank"].astype("Int64")
    frame["b_rank"] = frame["b_rank"].astype("Int64")
    frame.attrs["a"] = "embedded"
    frame.attrs["b"] = "vllm @ 127.0.0.1"
    return frame


def test_compare_draws_two_token_tracks_and_marks_disagreements() -> None:
    frame = make_compare_frame()
    fig = plots.compare(frame)
    tracks, differences = fig.data
    assert tracks.type == "heatmap"
    # Side a above side b, one cell per span, the tokens written in (| between b's two tokens).
    assert list(fig.layout.yaxis.ticktext) == ["a: embedded", "b: vllm @ 127.0.0.1"]
    assert fig.layout.yaxis.autorange == "reversed"
    text = np.asarray(tracks.text, dtype=object)
    assert text[0, 2] == "·Richard"
    assert text[1, 2] == "·Rich|ard"
    z = np.asarray(tracks.z, dtype=float)
    np.testing.assert_allclose(z[0, 1:], np.maximum(frame["a_logprob"][1:] / np.log(10), -4.0))
    assert np.isnan(z[0, 0])  # the first span: nothing precedes it
    # Disagreements: outlined across both tracks, red labels, red difference bars.
    outlined = sorted((s.x0 + s.x1) / 2 for s in fig.layout.shapes)
    assert outlined == [2, 4]
    assert all((s.y0, s.y1) == (-0.5, 1.5) for s in fig.layout.shapes)
    labels = list(fig.layout.xaxis2.ticktext)
    assert "color:#c0392b" in labels[2]
    assert "color" not in labels[1]
    np.testing.assert_allclose(differences.y[1:], (frame["a_logprob"] - frame["b_logprob"])[1:])
    colors = list(differences.marker.color)
    assert colors[2] == colors[4] != colors[1]
    hover = np.asarray(tracks.customdata, dtype=object)
    assert "KL(a ‖ b) 0.900 to 2.500 nats" in hover[0, 4]
    assert "rank >2" in hover[1, 4]
    assert "rank 1" in hover[0, 4]
    assert "the sides disagree" in hover[1, 4]
    assert "logprob: none" in hover[0, 0]
    assert "2 disagreements in 5 spans" in fig.layout.title.text


def test_compare_picks_a_text_caps_spans_and_checks_its_frame() -> None:
    frame = make_compare_frame()
    two = pd.concat([frame, frame.assign(text_id=1)], ignore_index=True)
    two.attrs = frame.attrs
    fig = plots.compare(two, text_id=1, max_spans=3)
    assert len(fig.data[0].x) == 3
    assert "text_id 1 of 2 texts" in fig.layout.title.text
    assert "spans 0–2 of 5" in fig.layout.title.text
    with pytest.raises(ValueError, match=r"text_id 7 is not in the frame; present: \[0, 1\]"):
        plots.compare(two, text_id=7)
    with pytest.raises(
        ValueError, match=r"compare\(\): column 'disagree' not in the compare frame"
    ):
        plots.compare(frame.drop(columns="disagree"))
    with pytest.raises(ValueError, match=r"compare\(\): the compare frame is empty"):
        plots.compare(frame.iloc[:0])
