"""`nbc.compare`: two endpoints score the same texts; their tokens are lined up on bytes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nbcompletions as nbc
from nbcompletions._compare import COMPARE_COLUMNS, SideTokens, align_spans, kl_bounds, span_rows
from nbcompletions._conformance import remember
from nbcompletions._conformance_checks import token_bytes
from nbcompletions._conformance_report import Check, ConformanceReport
from nbcompletions.server import StreamingASGITransport, create_app

TEXTS = ["To be, or not to be, that is the question.", "ROMEO:\nBut soft, what light"]


def _side(tokens: list[str], logprobs: list[float], tops: list[dict[str, float]]) -> SideTokens:
    return SideTokens(
        tokens=tokens,
        lengths=[len(t.encode("utf-8")) for t in tokens],
        logprobs=logprobs,
        ranks=[float(i % 3 + 1) for i in range(len(tokens))],
        tops=tops,
        entropy_low=[0.5] * len(tokens),
        vocab_size=100,
    )


def test_spans_end_where_both_tokenizations_have_a_boundary() -> None:
    # "To be, or" cut two ways: [To][ be][,][ or] and [T][o be][, or]
    assert align_spans([2, 3, 1, 3], [1, 4, 4]) == [(0, 5), (5, 9)]
    assert align_spans([2, 3], [2, 3]) == [(0, 2), (2, 5)]
    with pytest.raises(ValueError, match="different byte counts: 5 and 4"):
        align_spans([2, 3], [4])


def test_rows_of_two_different_tokenizations() -> None:
    text = "To be, or not"
    top_be = {" be": -0.1, " do": -2.5}
    a = _side(
        ["To", " be", ",", " or", " not"],
        [math.nan, -0.5, -1.0, -2.0, -0.25],
        [{}, top_be, {",": -1.0}, {" or": -2.0, " and": -0.3}, {" not": -0.25}],
    )
    b = _side(
        ["T", "o", " be", ", or", " not"],
        [math.nan, -3.0, -0.75, -2.5, -0.5],
        [{}, {"o": -3.0}, {" do": -0.2, " be": -0.75}, {", or": -2.5}, {" not": -0.5}],
    )
    rows = span_rows(0, text, a, b, threshold=1.0)
    assert [r["text"] for r in rows] == ["To", " be", ", or", " not"]
    assert [(r["start_byte"], r["end_byte"]) for r in rows] == [(0, 2), (2, 5), (5, 9), (9, 13)]
    assert rows[0]["a_tokens"] == ["To"]
    assert rows[0]["b_tokens"] == ["T", "o"]
    assert rows[2]["a_tokens"] == [",", " or"]
    assert rows[2]["b_tokens"] == [", or"]
    assert rows[2]["a_logprob"] == pytest.approx(-3.0)
    assert rows[2]["b_logprob"] == -2.5
    assert math.isnan(rows[0]["a_logprob"])  # the first token has no logprob on side a
    assert rows[2]["a_rank"] == max(a.ranks[2], a.ranks[3])
    # KL only where the span is one token on each side and both have alternatives.
    assert math.isnan(rows[2]["kl_lower"])
    assert math.isnan(rows[0]["kl_upper"])
    assert 0 < rows[1]["kl_lower"] <= rows[1]["kl_upper"]
    # " be": top-1 " be" against " do" -> disagree; " not": same top, 0.25 nats apart -> agree.
    assert [r["disagree"] for r in rows] == [False, True, False, False]
    assert rows[1]["a_top"] == top_be


def _distribution(rng: np.random.Generator, size: int) -> np.ndarray:
    weights: np.ndarray = rng.gamma(0.3, size=size)
    return weights / float(weights.sum())


def test_kl_bounds_hold_the_true_divergence() -> None:
    rng = np.random.default_rng(0)
    vocab, k = 40, 5
    for _ in range(200):
        p = _distribution(rng, vocab)
        q = _distribution(rng, vocab)
        q_top_ids = np.argsort(-q)[:k]
        # The upper bound's assumption: b's unseen tokens share its unseen mass evenly.
        unseen = np.setdiff1d(np.arange(vocab), q_top_ids)
        q[unseen] = q[unseen].sum() / len(unseen)
        true_kl = float(np.sum(p * np.log(p / q)))
        p_top_ids = np.argsort(-p)[:k]
        p_top = {bytes([i]): float(p[i]) for i in p_top_ids}
        q_top = {bytes([i]): float(q[i]) for i in q_top_ids}
        entropy_low = _entropy_low(np.sort(p)[::-1][:k])
        lower, upper = kl_bounds(p_top, q_top, entropy_low, vocab)
        assert lower <= true_kl + 1e-9 <= upper + 2e-9, (lower, true_kl, upper)
    same = {b"a": 0.5, b"b": 0.3}
    assert kl_bounds(same, same, 0.8, 10)[0] == pytest.approx(0.0)


def _entropy_low(top: np.ndarray) -> float:
    """The entropy's lower bound: the unseen mass packed into tokens as big as the smallest seen."""
    rest = 1.0 - top.sum()
    pieces = list(top)
    while rest > 1e-12:
        piece = min(rest, float(top[-1]))
        pieces.append(piece)
        rest -= piece
    return float(-sum(x * math.log(x) for x in pieces if x > 0))


@pytest.fixture(scope="module")
def vllm_compat(embedded_engine: Any) -> Iterator[nbc.Client]:
    """The embedded model behind `serve --compat vllm`, in-process."""
    app = create_app(embedded_engine, compat="vllm")
    client = nbc.Client(
        "http://compat/v1", transport=StreamingASGITransport(app), limits=nbc.Limits.vllm()
    )
    yield client
    client.close()


@pytest.mark.slow
def test_same_model_behind_two_servers_agrees(
    embedded_client: nbc.Client, vllm_compat: nbc.Client
) -> None:
    frame = nbc.compare(embedded_client, vllm_compat, TEXTS)
    assert list(frame.columns) == list(COMPARE_COLUMNS)
    assert frame.attrs["a"] != frame.attrs["b"]
    assert "compat" in frame.attrs["b"]
    for text_id, text in enumerate(TEXTS):
        spans = frame[frame["text_id"] == text_id]
        assert "".join(spans["text"]) == text
        assert (spans["a_tokens"] == spans["b_tokens"]).all()  # one tokenizer: one token a span
    np.testing.assert_allclose(frame["a_logprob"], frame["b_logprob"], atol=1e-4)
    assert not frame["disagree"].any()
    single = frame.dropna(subset=["kl_lower"])
    assert len(single) == len(frame) - len(TEXTS)  # every span but each text's first
    assert (single["kl_lower"] < 1e-6).all()
    assert (single["kl_upper"] >= single["kl_lower"]).all()
    # The spans add up to what score() says about the whole text.
    scored = embedded_client.score(TEXTS)
    np.testing.assert_allclose(
        frame.groupby("text_id")["a_logprob"].sum().to_numpy(), scored["sum_logprob"], atol=1e-4
    )


def test_two_tokenizers_line_up_on_bytes(embedded_client: nbc.Client, tiny_model_dir: Path) -> None:
    from nbcompletions.model import load_engine

    tiny = nbc.Client(
        "http://tiny/v1", transport=StreamingASGITransport(create_app(load_engine(tiny_model_dir)))
    )
    text = "ROMEO:\nBut soft, what light through yonder window breaks? Café."
    frame = nbc.compare(embedded_client, tiny, text, labels=("shakespeare", "tiny"))
    tiny.close()
    assert (frame.attrs["a"], frame.attrs["b"]) == ("shakespeare", "tiny")
    raw = text.encode("utf-8")
    assert frame["end_byte"].iloc[-1] == len(raw)
    assert (frame["start_byte"].iloc[1:].to_numpy() == frame["end_byte"].iloc[:-1].to_numpy()).all()
    for row in frame.to_dict("records"):
        # Each side's tokens spell exactly the span's bytes (a span may cut "é" between its bytes).
        span = raw[row["start_byte"] : row["end_byte"]]
        assert b"".join(token_bytes(t) for t in row["a_tokens"]) == span
        assert b"".join(token_bytes(t) for t in row["b_tokens"]) == span
        assert row["text"] == span.decode("utf-8", errors="replace")
    assert (frame["a_tokens"].map(len) != frame["b_tokens"].map(len)).any()
    multi = frame[(frame["a_tokens"].map(len) > 1) | (frame["b_tokens"].map(len) > 1)]
    assert multi["kl_lower"].isna().all()
    assert frame["disagree"].any()  # a tiny random model and the trained one do not agree


def test_a_side_that_cannot_score_is_refused_first(embedded_client: nbc.Client) -> None:
    shifted = nbc.Client(embedded=True)
    report = ConformanceReport(
        [Check("echo_alignment", "fails", "echo logprobs shifted by one", {"kind": "shifted"})],
        endpoint=shifted.endpoint,
        model=shifted.model,
        requests=0,
        seconds=0.0,
        profile_name="llamacpp",
    )
    remember(shifted, report)
    with pytest.raises(nbc.ConformanceError, match="refuses side b") as caught:
        nbc.compare(embedded_client, shifted, "To be")
    assert caught.value.check == "echo_alignment"
    shifted.close()


def test_bad_arguments_name_the_field(embedded_client: nbc.Client) -> None:
    with pytest.raises(nbc.RequestError, match="texts must be"):
        nbc.compare(embedded_client, embedded_client, [])
    with pytest.raises(nbc.RequestError, match="top_logprobs must be an integer >= 1; got 0"):
        nbc.compare(embedded_client, embedded_client, "To be", top_logprobs=0)
    with pytest.raises(nbc.RequestError, match="threshold must be"):
        nbc.compare(embedded_client, embedded_client, "To be", threshold=-1)
