"""Scoring text with an endpoint's own log-probabilities, and probing what an endpoint supports.

`ascore` does what lm-evaluation-harness does with a Completions endpoint: send the text as the
prompt with ``echo=True``, ``logprobs=1`` and ``max_tokens=0``, and add up the log-probabilities the
server returns for the prompt's own tokens. With a ``context``, ``context + text`` is sent and only
the tokens of ``text`` are counted.

Where a token straddles the boundary (BPE merged the end of the context with the start of the
text, e.g. context "The cat" and text "s sat" giving the token "cats"), it is counted with the
continuation so that every character of the text is scored, and the row's ``straddles`` is True:
its score then also covers part of the context. Putting the separating space at the start of the
text (context "The capital of France is", text " Paris") avoids this with GPT-style tokenizers;
a context that ends in the space ("... is ", "Paris") scores the same, as lm-evaluation-harness
moves such trailing spaces into the continuation, and is not flagged.

The first token of a prompt has no log-probability (nothing precedes it). Scoring a text without a
context therefore leaves its first token unscored: ``n_tokens`` counts scored tokens only and
``n_unscored`` says how many were skipped.

Before the first score, the endpoint's conformance is measured once (`nbcompletions._conformance`):
an endpoint whose echoed logprobs are not the prompt tokens' own is refused with
`ConformanceError`, and ``max_tokens=0`` is only sent where it was seen honoured (else 1, and the
generated token is dropped). `acapabilities` is that report as a dict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._checks import finite_float, is_int
from ._conformance import ConformanceReport, cached_report
from ._errors import APIError, RequestError
from ._governance import acorrect_raw, ameasure, decide
from ._parse import first_choice, parse_logprobs, prompt_tokens, top_items
from ._request import CompletionRequest, Limits
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


__all__ = ["acapabilities", "ascore", "cached_capabilities"]

SCORE_COLUMNS = (
    "text",
    "context",
    "n_tokens",
    "sum_logprob",
    "mean_logprob",
    "perplexity",
    "n_unscored",
    "straddles",
)

# Probes ask for more logprobs than OpenAI allows: the point is to find out what the server takes.
_PROBE_LIMITS = Limits(max_logprobs=None)


# -- the first choice's logprobs, read by the shared parser (as the frames read them) ------------


@dataclasses.dataclass(frozen=True)
class EchoColumns:
    tokens: list[str]
    logprobs: list[float | None]
    offsets: list[int | None]
    tops: list[list[tuple[Any, Any]]]  # (token, logprob) pairs per position, as the server sent


def echo_columns(raw: Mapping[str, Any]) -> EchoColumns | None:
    """(tokens, logprobs, text offsets, top entries) of the first choice; None without logprobs."""
    choice = first_choice(raw)
    logprobs = choice.get("logprobs") if choice is not None else None
    if not isinstance(logprobs, Mapping):
        return None
    try:
        tokens, values, entries, offsets = parse_logprobs(logprobs, "choices[0].logprobs")
        tops = [top_items(entry) for entry in entries]
    except ValueError as exc:
        raise APIError(
            f"the server answered with logprobs that cannot be read: {exc}",
            type="invalid_response",
            body=dict(raw),
        ) from None
    return EchoColumns(
        [t if isinstance(t, str) else "" for t in tokens],
        [finite_float(v) for v in values],
        [v if is_int(v) else None for v in offsets or [None] * len(tokens)],
        tops,
    )


def fill_offsets(tokens: list[str], offsets: list[int | None], start: int = 0) -> list[int]:
    # Servers that omit text_offset: lay tokens end to end (exact for text tokens; `bytes:` tokens
    # of split characters make it approximate, which only matters at the context boundary).
    filled: list[int] = []
    position = start
    for token, offset in zip(tokens, offsets, strict=True):
        if offset is not None:
            position = offset
        filled.append(position)
        position += 0 if token.startswith("bytes:") else len(token)
    return filled


# -- scoring ---------------------------------------------------------------------------------------


def _echo_refused(exc: APIError) -> APIError:
    error = APIError(
        f"this endpoint refused echo with logprobs ({exc}); scoring needs the log-probabilities "
        "of the prompt's own tokens (echo=True, logprobs, max_tokens=0), which some servers "
        "(llama.cpp, several OpenAI models) do not offer",
        status=exc.status,
        type="echo_logprobs_unsupported",
        param=exc.param,
        code=exc.code,
        body=exc.body,
    )
    error.__cause__ = exc
    return error


def _dropped(prompt: str) -> APIError:
    return APIError(
        "this endpoint accepted echo with logprobs but returned no log-probabilities for the "
        f"prompt's tokens (it dropped them silently), so {prompt[:40]!r} cannot be scored",
        type="echo_logprobs_unsupported",
    )


def _score_request(aclient: AsyncCompletionsClient, prompt: str) -> CompletionRequest:
    return CompletionRequest(
        prompt=prompt,
        echo=True,
        logprobs=1,
        max_tokens=0,
        model=aclient.model,
        limits=_PROBE_LIMITS,
    )


async def _score_one(
    aclient: AsyncCompletionsClient,
    text: str,
    context: str,
    report: ConformanceReport | None = None,
) -> dict[str, Any]:
    prompt = context + text
    try:
        # The report decides what is sent (max_tokens=1 where 0 is not honoured) and how the
        # answer is corrected (a shifted echo realigned); the decision was checked in ascore.
        decision = decide(report, _score_request(aclient, prompt), path="score")
        decision.raise_if_refused()
        request = decision.request
        completion = await aclient.complete_as_is(request)
    except APIError as exc:
        if exc.status == 400 and exc.param == "max_tokens":
            # A server that insists on generating: ask for one token and ignore it below.
            request = request.replace(max_tokens=1)
            try:
                completion = await aclient.complete_as_is(request)
            except APIError as again:
                raise (_echo_refused(again) if again.status == 400 else again) from None
        elif exc.status == 400:
            raise _echo_refused(exc) from None
        else:
            raise
    raw, _ = await acorrect_raw(aclient, decision, completion.raw)
    columns = echo_columns(raw)
    if columns is None or not columns.tokens:
        raise _dropped(prompt)
    tokens, logprobs = columns.tokens, columns.logprobs
    n_prompt = prompt_tokens(raw)
    offsets = fill_offsets(tokens, columns.offsets)
    # The prompt's tokens come first; generated ones (a max_tokens=1 fallback) start at len(prompt).
    if n_prompt is not None and 0 < n_prompt <= len(tokens):
        count = n_prompt
    else:
        count = sum(1 for off in offsets if off < len(prompt)) if prompt else len(tokens)
    if count == 0 or (count > 1 and all(lp is None for lp in logprobs[:count])):
        raise _dropped(prompt)
    ends = [*offsets[1:count], len(prompt)]
    boundary = len(context)
    scored: list[float] = []
    unscored = 0
    straddles = False
    for i in range(count):
        if ends[i] <= boundary:  # wholly inside the context
            continue
        # Only whitespace of the context inside the token (context "Q: ", text "A") is what
        # lm-evaluation-harness does anyway: it moves a context's trailing spaces to the text.
        if offsets[i] < boundary and prompt[offsets[i] : boundary].strip():
            straddles = True
        value = logprobs[i]
        if value is None:
            unscored += 1
        else:
            scored.append(float(value))
    total = float(sum(scored))
    n = len(scored)
    mean = total / n if n else math.nan
    return {
        "text": text,
        "context": context or None,
        "n_tokens": n,
        "sum_logprob": total,
        "mean_logprob": mean,
        "perplexity": math.exp(-mean) if n else math.nan,
        "n_unscored": unscored,
        "straddles": straddles,
    }


def _as_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts):
        return list(texts)
    raise RequestError(
        "texts",
        f"texts must be a string or a non-empty list of strings; got {texts!r}"[:300],
        allowed="a string or a non-empty list of strings",
        value=texts,
    )


async def ascore(
    client: HasAsyncClient,
    texts: str | Sequence[str],
    *,
    context: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Log-probability of each text under the endpoint's model, one row per text.

    Columns: ``text``, ``context``, ``n_tokens`` (scored tokens), ``sum_logprob``, ``mean_logprob``,
    ``perplexity`` (exp of minus the mean), ``n_unscored`` (tokens without a logprob: the first
    token when there is no context), ``straddles`` (a token spans the context/text boundary; see the
    module docstring). ``context`` is one string for every text or one per text. Requests run
    concurrently under the client's limit. A server that refuses echo with logprobs, or drops the
    prompt's logprobs, raises `APIError` with ``type="echo_logprobs_unsupported"``.
    """
    import pandas as pd

    aclient = as_async(client)
    items = _as_texts(texts)
    if context is None:
        contexts = [""] * len(items)
    elif isinstance(context, str):
        contexts = [context] * len(items)
    elif (
        isinstance(context, Sequence)
        and len(context) == len(items)
        and all(isinstance(c, str) for c in context)
    ):
        contexts = list(context)
    else:
        raise RequestError(
            "context",
            f"context must be None, a string, or a list of "
            f"{len(items)} strings (one per text); got {context!r}"[:300],
            allowed="None, a string or one string per text",
            value=context,
        )
    for i, text in enumerate(items):
        if not text:
            raise RequestError(
                "texts",
                f"texts[{i}] is empty: there is nothing to score",
                allowed="non-empty strings",
                value=text,
            )
    # Measured first where the client measures (kept): an echo whose logprobs are not the prompt
    # tokens' own is refused, or realigned where it is only shifted; max_tokens=0 is only sent
    # where it was seen to be honoured (llama.cpp reads it as "no limit").
    # Scoring depends on the report whatever the endpoint: measured unless verify=False.
    report = None if getattr(aclient, "verify", None) is False else await ameasure(aclient)
    decide(report, _score_request(aclient, items[0]), path="score").raise_if_refused()
    rows = await asyncio.gather(
        *(_score_one(aclient, t, c, report) for t, c in zip(items, contexts, strict=True))
    )
    frame: pd.DataFrame = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    frame["n_tokens"] = frame["n_tokens"].astype("int64")
    frame["n_unscored"] = frame["n_unscored"].astype("int64")
    frame["straddles"] = frame["straddles"].astype(bool)
    return frame


# -- capabilities ----------------------------------------------------------------------------------


def cached_capabilities(client: HasAsyncClient) -> dict[str, Any] | None:
    """The conformance report already measured for this client, as a dict, or None."""
    report = cached_report(client)
    return report.to_dict() if report is not None else None


async def acapabilities(aclient: HasAsyncClient, *, refresh: bool = False) -> dict[str, Any]:
    """The conformance check's report as a dict (`ConformanceReport.to_dict`); cached per client."""
    return (await ameasure(as_async(aclient), refresh=refresh)).to_dict()
