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
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._conformance import aconformance, cached_report, score_max_tokens
from ._errors import APIError, RequestError
from ._parse import choice_index
from ._request import CompletionRequest, Limits

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


def _async_client(client: Any) -> Any:
    return getattr(client, "async_client", client)


# -- parsing a logprobs object ---------------------------------------------------------------------


def _first_choice(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = [c for c in raw.get("choices") or [] if isinstance(c, Mapping)]
    if not choices:
        return {}
    return min(choices, key=choice_index)


def _token_rows(
    choice: Mapping[str, Any],
) -> tuple[list[str], list[float | None], list[int | None], list[dict[str, float] | None]] | None:
    """(tokens, logprobs, text offsets, top-logprob dicts) of a choice; None without logprobs.

    Accepts the Completions shape and llama.cpp's chat shape; any field may be missing or null.
    """
    lp = choice.get("logprobs")
    if not isinstance(lp, Mapping):
        return None
    if isinstance(lp.get("content"), list):  # llama.cpp / chat shape
        content = [c for c in lp["content"] if isinstance(c, Mapping)]
        tokens = [str(c.get("token", "")) for c in content]
        logprobs = [
            c.get("logprob") if isinstance(c.get("logprob"), int | float) else None for c in content
        ]
        tops: list[dict[str, float] | None] = []
        for c in content:
            top = c.get("top_logprobs")
            tops.append(
                {
                    str(t.get("token")): float(t.get("logprob") or 0.0)
                    for t in top
                    if isinstance(t, Mapping)
                }
                if isinstance(top, list)
                else None
            )
        offsets: list[int | None] = [None] * len(tokens)
        return tokens, logprobs, offsets, tops
    tokens = [str(t) for t in lp.get("tokens") or []]
    n = len(tokens)

    def column(name: str) -> list[Any]:
        values = lp.get(name)
        values = list(values) if isinstance(values, list) else []
        return (values + [None] * n)[:n]

    logprobs = [
        v if isinstance(v, int | float) and not isinstance(v, bool) else None
        for v in column("token_logprobs")
    ]
    offsets = [
        v if isinstance(v, int) and not isinstance(v, bool) else None for v in column("text_offset")
    ]
    tops = [dict(v) if isinstance(v, Mapping) else None for v in column("top_logprobs")]
    return tokens, logprobs, offsets, tops


def _fill_offsets(tokens: list[str], offsets: list[int | None], start: int = 0) -> list[int]:
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


async def _score_one(aclient: Any, text: str, context: str, max_tokens: int = 0) -> dict[str, Any]:
    prompt = context + text
    try:
        request = CompletionRequest(
            prompt=prompt,
            echo=True,
            logprobs=1,
            max_tokens=max_tokens,
            model=getattr(aclient, "model", None),
            limits=_PROBE_LIMITS,
        )
        completion = await aclient.complete_request(request)
    except APIError as exc:
        if exc.status == 400 and exc.param == "max_tokens":
            # A server that insists on generating: ask for one token and ignore it below.
            request = request.replace(max_tokens=1)
            try:
                completion = await aclient.complete_request(request)
            except APIError as again:
                raise (_echo_refused(again) if again.status == 400 else again) from None
        elif exc.status == 400:
            raise _echo_refused(exc) from None
        else:
            raise
    raw = completion.raw
    rows = _token_rows(_first_choice(raw))
    if rows is None or not rows[0]:
        raise _dropped(prompt)
    tokens, logprobs, raw_offsets, _ = rows
    usage = raw.get("usage") if isinstance(raw.get("usage"), Mapping) else {}
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
    offsets = _fill_offsets(tokens, raw_offsets)
    # The prompt's tokens come first; generated ones (a max_tokens=1 fallback) start at len(prompt).
    if isinstance(prompt_tokens, int) and 0 < prompt_tokens <= len(tokens):
        count = prompt_tokens
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
    aclient: Any, texts: str | Sequence[str], *, context: str | Sequence[str] | None = None
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

    aclient = _async_client(aclient)
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
    # Measured first (cached): a shifted echo is refused, and max_tokens=0 is only sent where it
    # was seen to be honoured (llama.cpp reads it as "no limit").
    max_tokens = score_max_tokens(await aconformance(aclient))
    rows = await asyncio.gather(
        *(_score_one(aclient, t, c, max_tokens) for t, c in zip(items, contexts, strict=True))
    )
    frame = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    frame["n_tokens"] = frame["n_tokens"].astype("int64")
    frame["n_unscored"] = frame["n_unscored"].astype("int64")
    frame["straddles"] = frame["straddles"].astype(bool)
    return frame


# -- capabilities ----------------------------------------------------------------------------------


def cached_capabilities(client: Any) -> dict[str, Any] | None:
    """The conformance report already measured for this client, as a dict, or None."""
    report = cached_report(client)
    return report.to_dict() if report is not None else None


async def acapabilities(aclient: Any, *, refresh: bool = False) -> dict[str, Any]:
    """The conformance check's report as a dict (`ConformanceReport.to_dict`); cached per client."""
    return (await aconformance(aclient, refresh=refresh)).to_dict()
