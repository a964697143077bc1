"""Scoring a given assistant reply: the log-probability of its tokens under the chat template.

`ascore_reply(client, messages, reply)` finds the reply's tokens inside the templated conversation
``messages + [{"role": "assistant", "content": reply}]`` and reads their log-probabilities, in one
of two ways:

``prompt_logprobs`` (vLLM, and our server under ``--compat vllm``)
    ``POST /tokenize`` with ``messages`` renders and tokenizes on the server, with the server's own
    chat template. The conversation is tokenized twice, with the reply and with an empty reply: the
    ids both share at the start and at the end are the template's, the ones between are the reply's.
    ``POST /detokenize`` of that span must give back the reply (the check that the span is right);
    then ``/v1/completions`` with the ids as the prompt and ``prompt_logprobs`` gives each token's
    log-probability.

``echo`` (servers that echo the prompt's logprobs but do not tokenize chats)
    The template is rendered on the client: the ``template=`` given (a callable taking the messages
    and returning the text, or a Jinja string, which needs jinja2), else the server's
    ``POST /apply-template`` (llama-server), else our model's template when the model is the
    embedded one. The text up to the end of the reply is scored with ``echo=True`` as `score()`
    does; the echoed tokens covering the reply must join to it (leading template whitespace aside).
    Where the server also answers ``/v1/chat/completions``, its ``usage.prompt_tokens`` for the
    conversation must equal the number of echoed tokens before the reply: a client-side template
    that differs from the server's is refused rather than scored.
    Before any of those (when no ``template=`` is given), where the server offers
    ``POST /v1/chat/completions/render`` (vLLM started with ``--enable-scale-out``; without it the
    route answers 403), the server renders and tokenizes the chat itself: the reply's span is
    found from its ids as above (with and without the reply), the ids up to the span's end are
    echoed as a token prompt, and the echoed tokens of the span must join to the reply
    (``template`` "render").

Where neither way is available (no ``/tokenize``, no template), `ConformanceError` says why.
The reply's tokens are scored, not the template's end-of-turn marker after them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._chat import check_messages
from ._conformance_checks import token_bytes
from ._errors import APIError, ConformanceError, RequestError
from ._governance import acorrect_raw, ameasure, decide
from ._request import CompletionRequest, Limits
from ._scoring import echo_columns, fill_offsets
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["REPLY_TOKEN_COLUMNS", "ReplyScore", "ServerSpan", "ascore_reply", "server_reply_span"]

#: Columns of `ReplyScore.tokens`, one row per reply token.
REPLY_TOKEN_COLUMNS = ("position", "token", "token_id", "logprob")

Template = Callable[[list[dict[str, Any]]], str] | str
METHODS = ("auto", "prompt_logprobs", "echo")
_NOT_OFFERED = (404, 405, 501)


@dataclasses.dataclass(frozen=True)
class ReplyScore:
    """What `Client.score_reply` measured.

    ``tokens``: one row per reply token (``position`` in the templated conversation, ``token``,
    ``token_id`` where the server gave ids, ``logprob``). ``summary``: ``reply``, ``n_tokens``,
    ``sum_logprob``, ``mean_logprob``, ``perplexity``, ``n_unscored``, ``method``
    ("prompt_logprobs" | "echo") and ``template`` (where the template came from: "server",
    "user", "apply-template" or "embedded").
    """

    tokens: pd.DataFrame
    summary: dict[str, Any]

    @property
    def sum_logprob(self) -> float:
        return float(self.summary["sum_logprob"])

    @property
    def method(self) -> str:
        return str(self.summary["method"])


def _conversation(messages: Any, reply: Any) -> list[dict[str, Any]]:
    check_messages(messages)
    if not isinstance(reply, str) or not reply:
        raise RequestError(
            "reply",
            f"reply must be a non-empty string (the assistant turn to score); got {reply!r}"[:300],
            allowed="a non-empty string",
            value=reply,
        )
    return [dict(m) for m in messages]


def _summary(
    reply: str, logprobs: Sequence[float | None], method: str, source: str
) -> dict[str, Any]:
    scored = [float(v) for v in logprobs if v is not None]
    total = float(sum(scored))
    mean = total / len(scored) if scored else math.nan
    return {
        "reply": reply,
        "n_tokens": len(scored),
        "sum_logprob": total,
        "mean_logprob": mean,
        "perplexity": math.exp(-mean) if scored else math.nan,
        "n_unscored": len(logprobs) - len(scored),
        "method": method,
        "template": source,
    }


def _result(reply: str, rows: list[dict[str, Any]], method: str, source: str) -> ReplyScore:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(REPLY_TOKEN_COLUMNS))
    frame["position"] = frame["position"].astype("int64")
    frame["token_id"] = frame["token_id"].astype("Int64")
    frame["logprob"] = frame["logprob"].astype("float64")
    return ReplyScore(frame, _summary(reply, [r["logprob"] for r in rows], method, source))


def _span_mismatch(reply: str, got: str, how: str) -> ConformanceError:
    return ConformanceError(
        f"score_reply could not find the reply's tokens in the templated conversation: {how} "
        f"gives {got[:80]!r} where the reply is {reply[:80]!r}, so no score would be the reply's",
        check="reply_span",
        detail=f"span text {got[:80]!r}",
    )


def _is_reply(reply: str, text: str) -> bool:
    """The span's text is the reply, give or take whitespace the template put before it."""
    return text.endswith(reply) and not text[: len(text) - len(reply)].strip()


# -- prompt_logprobs: the server tokenizes the chat ------------------------------------------------


async def _post_root(aclient: AsyncCompletionsClient, path: str, body: dict[str, Any]) -> Any:
    """POST to a route at the server's root (``/tokenize``), next to the ``/v1`` base URL."""
    request = getattr(aclient, "request", None)
    if request is None:
        raise ConformanceError(
            "score_reply needs a client that can send any request (Client or AsyncClient)",
            check="reply_span",
        )
    base = str(getattr(aclient, "endpoint", ""))
    prefix = "/.." if base.rstrip("/").endswith("/v1") else ""
    return await request("POST", f"{prefix}{path}", json=body)


async def _post(aclient: AsyncCompletionsClient, path: str, body: dict[str, Any]) -> Any:
    """POST under the base URL (``/completions`` with vLLM's own fields)."""
    request: Any = aclient.request  # the protocol's request() takes no json=
    return await request("POST", path, json=body)


async def _tokenize_chat(
    aclient: AsyncCompletionsClient, messages: list[dict[str, Any]], model: str | None
) -> list[int] | None:
    body: dict[str, Any] = {"messages": messages, "add_generation_prompt": False}
    if model is not None:
        body["model"] = model
    try:
        answer = await _post_root(aclient, "/tokenize", body)
    except APIError as exc:
        # 400: the route is there but cannot render chats (vLLM without a chat template).
        if exc.status in _NOT_OFFERED or exc.status == 400:
            return None
        raise
    tokens = answer.get("tokens") if isinstance(answer, Mapping) else None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        # No tokens for a conversation: the route reads no `messages` (llama-server's /tokenize
        # takes `content`, and answers [] for a body without it).
        return None
    return tokens


def _reply_span(with_reply: list[int], without: list[int]) -> tuple[int, int]:
    start = 0
    while start < min(len(with_reply), len(without)) and with_reply[start] == without[start]:
        start += 1
    end = 0
    limit = min(len(with_reply), len(without)) - start
    while end < limit and with_reply[-1 - end] == without[-1 - end]:
        end += 1
    return start, len(with_reply) - end


def _prompt_logprob(entry: Any, token_id: int) -> tuple[float | None, str | None]:
    if not isinstance(entry, Mapping):
        return None, None
    found = entry.get(str(token_id), entry.get(token_id))
    if not isinstance(found, Mapping):
        return None, None
    value = found.get("logprob")
    text = found.get("decoded_token")
    return (float(value) if isinstance(value, (int, float)) else None), (
        text if isinstance(text, str) else None
    )


async def _prompt_logprobs(
    aclient: AsyncCompletionsClient, ids: list[int], model: str | None
) -> list[Any] | None:
    # Neutral sampling: under vLLM's --logprobs-mode processed_* the logprobs follow temperature
    # and top_p, and the model's generation_config may set other defaults.
    body: dict[str, Any] = {
        "prompt": ids,
        "max_tokens": 1,
        "prompt_logprobs": 1,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    if model is not None:
        body["model"] = model
    try:
        answer = await _post(aclient, "/completions", body)
    except APIError as exc:
        if exc.status == 400 or exc.status in _NOT_OFFERED:  # prompt_logprobs is vLLM's field
            return None
        raise
    choices = answer.get("choices") if isinstance(answer, Mapping) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    found = first.get("prompt_logprobs") if isinstance(first, Mapping) else None
    if found is None and isinstance(answer, Mapping):
        found = answer.get("prompt_logprobs")  # chat puts it at the top level
    if not isinstance(found, list) or len(found) != len(ids):
        raise ConformanceError(
            "score_reply: the server tokenizes chats but gave no prompt_logprobs for the "
            f"{len(ids)} prompt tokens (got {type(found).__name__})",
            check="prompt_logprobs",
        )
    return found


@dataclasses.dataclass(frozen=True)
class ServerSpan:
    """The templated conversation's token ids (``ids``) and the reply's span ``[start, end)``,
    as the server tokenized it; ``text`` is what ``/detokenize`` gave back for the span."""

    ids: list[int]
    start: int
    end: int
    text: str


async def server_reply_span(
    client: HasAsyncClient, messages: list[dict[str, Any]], reply: str
) -> ServerSpan | None:
    """The reply's tokens in the server's own rendering of the chat (None: no ``/tokenize`` with
    messages); `ConformanceError` (check ``reply_span``) where they do not detokenize to it."""
    aclient = as_async(client)
    model = aclient.model
    turn = {"role": "assistant", "content": reply}
    full = await _tokenize_chat(aclient, [*messages, turn], model)
    if full is None:
        return None
    empty = await _tokenize_chat(aclient, [*messages, {**turn, "content": ""}], model)
    if empty is None:
        return None
    start, end = _reply_span(full, empty)
    detok = await _post_root(aclient, "/detokenize", {"tokens": full[start:end], "model": model})
    text = detok.get("prompt") if isinstance(detok, Mapping) else None
    if not isinstance(text, str) or not _is_reply(reply, text):
        raise _span_mismatch(reply, str(text), "/detokenize of the span")
    return ServerSpan(full, start, end, text)


async def _by_prompt_logprobs(
    aclient: AsyncCompletionsClient, messages: list[dict[str, Any]], reply: str
) -> ReplyScore | None:
    span = await server_reply_span(aclient, messages, reply)
    if span is None:
        return None
    full, start, end = span.ids, span.start, span.end
    # Up to the reply's end only: what follows cannot change a causal model's logprobs before it.
    entries = await _prompt_logprobs(aclient, full[:end], aclient.model)
    if entries is None:
        return None
    rows = []
    for position in range(start, end):
        logprob, token = _prompt_logprob(entries[position], full[position])
        rows.append(
            {"position": position, "token": token, "token_id": full[position], "logprob": logprob}
        )
    return _result(reply, rows, "prompt_logprobs", "server")


# -- echo: the client renders the template --------------------------------------------------------


def _render_user(template: Template, messages: list[dict[str, Any]]) -> str:
    if callable(template):
        text = template(messages)
    elif isinstance(template, str):
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise RequestError(
                "template",
                "a Jinja template string needs jinja2 installed; pass a callable instead",
                allowed="a callable(messages) -> str, or a Jinja string with jinja2 installed",
                value=template,
            ) from None
        # Sandboxed, as transformers renders chat templates.
        jinja = ImmutableSandboxedEnvironment().from_string(template)
        text = jinja.render(messages=messages, add_generation_prompt=False)
    else:
        raise RequestError(
            "template",
            f"template must be a callable(messages) -> str or a Jinja string; got "
            f"{str(template)[:200]!r}",
            allowed="a callable(messages) -> str, or a Jinja template string",
            value=template,
        )
    if not isinstance(text, str):
        raise RequestError(
            "template",
            f"the template callable must return a string; it returned {type(text).__name__}",
            allowed="a callable(messages) -> str",
            value=template,
        )
    return text


async def _server_template(
    aclient: AsyncCompletionsClient, messages: list[dict[str, Any]]
) -> str | None:
    try:
        answer = await _post_root(aclient, "/apply-template", {"messages": messages})
    except APIError as exc:
        if exc.status in _NOT_OFFERED:
            return None
        raise
    text = answer.get("prompt") if isinstance(answer, Mapping) else None
    return text if isinstance(text, str) else None


async def _renderer(
    aclient: AsyncCompletionsClient, template: Template | None
) -> tuple[Callable[[list[dict[str, Any]]], Any], str]:
    """How the conversation's text is made on this side, and where the template came from."""
    if template is not None:
        return (lambda msgs: _render_user(template, msgs)), "user"
    from .model import MODEL_ID, render_chat

    probe = [{"role": "user", "content": "x"}]
    if await _server_template(aclient, probe) is not None:
        return (lambda msgs: _server_template(aclient, msgs)), "apply-template"
    if aclient.model == MODEL_ID:
        return (lambda msgs: render_chat(msgs, add_generation_prompt=False)), "embedded"
    raise ConformanceError(
        f"score_reply cannot score a reply on this endpoint: it offers no POST /tokenize with "
        f"messages (for prompt_logprobs) and no /apply-template, and the model "
        f"{aclient.model!r} is not the embedded one, so its chat template is unknown here; "
        "pass template= (a callable(messages) -> str or a Jinja string)",
        check="chat_template",
    )


async def _rendered(render: Callable[[list[dict[str, Any]]], Any], messages: Any) -> str:
    text = render(messages)
    if not isinstance(text, str):
        text = await text
    if not isinstance(text, str):
        raise ConformanceError("the chat template gave no text", check="chat_template")
    return text


def _char_span(full: str, empty: str, reply: str) -> tuple[int, int]:
    """Where the reply sits in the rendered text: the template must insert it as it is."""
    if len(full) - len(empty) != len(reply):
        raise _span_mismatch(reply, full, "the template (it changed the reply's text)")
    shared = 0
    while shared < len(empty) and full[shared] == empty[shared]:
        shared += 1
    for start in range(shared, max(-1, shared - len(reply) - 1), -1):
        if (
            full[start : start + len(reply)] == reply
            and full[:start] + full[start + len(reply) :] == empty
        ):
            return start, start + len(reply)
    raise _span_mismatch(reply, full, "the template")


async def _echo_tokens(
    aclient: AsyncCompletionsClient, prompt: str | list[int]
) -> tuple[list[str], list[float | None], list[int]]:
    request = CompletionRequest(
        prompt=prompt,
        echo=True,
        logprobs=1,
        max_tokens=0,
        temperature=1.0,  # neutral, as for prompt_logprobs: some servers' logprobs follow it
        top_p=1.0,
        model=aclient.model,
        limits=Limits(max_logprobs=None),
    )
    # As score() does: the conformance report decides what is sent (max_tokens=1 where 0 is not
    # honoured), refuses what cannot be right, and corrects the answer (a shifted echo realigned).
    report = None if getattr(aclient, "verify", None) is False else await ameasure(aclient)
    decision = decide(report, request, path="score")
    decision.raise_if_refused()
    completion = await aclient.complete_as_is(decision.request)
    raw, _ = await acorrect_raw(aclient, decision, completion.raw)
    columns = echo_columns(raw)
    if columns is None or not columns.tokens:
        raise ConformanceError(
            "score_reply: the endpoint returned no log-probabilities for the echoed conversation",
            check="echo_alignment",
        )
    return columns.tokens, columns.logprobs, fill_offsets(columns.tokens, columns.offsets)


async def _render_chat(
    aclient: AsyncCompletionsClient, messages: list[dict[str, Any]]
) -> list[int] | None:
    """The conversation's token ids as the server renders it (``/v1/chat/completions/render``,
    vLLM's shape: ``token_ids``), or None where the route is not offered."""
    body: dict[str, Any] = {"messages": messages, "add_generation_prompt": False}
    if aclient.model is not None:
        body["model"] = aclient.model
    try:
        answer = await _post(aclient, "/chat/completions/render", body)
    except APIError as exc:
        # 403: vLLM mounts the route only with --enable-scale-out ("Scale-out endpoints are
        # disabled"); 400: a model without a chat template.
        if exc.status in _NOT_OFFERED or exc.status in (400, 403):
            return None
        raise
    ids = answer.get("token_ids") if isinstance(answer, Mapping) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        return None
    return ids


async def _by_rendered_ids(
    aclient: AsyncCompletionsClient, messages: list[dict[str, Any]], reply: str
) -> ReplyScore | None:
    """The echo way on ids the server rendered (None: it offers no render route)."""
    turn = {"role": "assistant", "content": reply}
    full = await _render_chat(aclient, [*messages, turn])
    if full is None:
        return None
    empty = await _render_chat(aclient, [*messages, {**turn, "content": ""}])
    if empty is None:
        return None
    start, end = _reply_span(full, empty)
    tokens, logprobs, _ = await _echo_tokens(aclient, full[:end])
    if len(tokens) < end or start == end:
        raise _span_mismatch(reply, "".join(tokens[start:end]), "the echoed rendered ids")
    joined = b"".join(token_bytes(t) for t in tokens[start:end]).decode("utf-8", "replace")
    if not _is_reply(reply, joined):
        raise _span_mismatch(reply, joined, "the echoed tokens of the rendered reply's span")
    rows = [
        {"position": i, "token": tokens[i], "token_id": full[i], "logprob": logprobs[i]}
        for i in range(start, end)
    ]
    result = _result(reply, rows, "echo", "render")
    result.summary["verified"] = True  # the server's own template and tokenizer
    return result


async def _chat_prompt_tokens(
    aclient: AsyncCompletionsClient, messages: list[dict[str, Any]]
) -> int | None:
    """``usage.prompt_tokens`` of the server's chat template for ``messages`` (None: no chat)."""
    chat = getattr(aclient, "chat", None)
    if chat is None:
        return None
    try:
        completion = await chat(messages, max_tokens=1, temperature=0.0)
    except APIError as exc:
        if exc.status in _NOT_OFFERED or exc.status == 400:  # 400: vLLM without a template
            return None
        raise
    usage = completion.raw.get("usage")
    value = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) else None


async def _by_echo(
    aclient: AsyncCompletionsClient,
    messages: list[dict[str, Any]],
    reply: str,
    template: Template | None,
) -> ReplyScore:
    if template is None:
        rendered = await _by_rendered_ids(aclient, messages, reply)
        if rendered is not None:
            return rendered
    render, source = await _renderer(aclient, template)
    full = await _rendered(render, [*messages, {"role": "assistant", "content": reply}])
    empty = await _rendered(render, [*messages, {"role": "assistant", "content": ""}])
    start, end = _char_span(full, empty, reply)
    tokens, logprobs, offsets = await _echo_tokens(aclient, full[:end])
    ends = [*offsets[1:], end]
    inside = [i for i in range(len(tokens)) if offsets[i] < end and ends[i] > start]
    if not inside:
        raise _span_mismatch(reply, "", "the echoed tokens")
    joined = (
        "".join(tokens[i] for i in inside)
        if not any(tokens[i].startswith("bytes:") for i in inside)
        else full[offsets[inside[0]] : end]
    )
    if not _is_reply(reply, joined):
        raise _span_mismatch(reply, joined, "the echoed tokens of the reply's span")
    served = await _chat_prompt_tokens(aclient, messages)
    if served is not None and served != inside[0]:
        raise ConformanceError(
            f"score_reply: the chat template used here ({source}) gives {inside[0]} tokens before "
            f"the reply, the server's own chat template {served} (usage.prompt_tokens of "
            "/v1/chat/completions): they differ, so the score would not be the server's",
            check="chat_template",
            detail=f"client {inside[0]} tokens, server {served}",
        )
    rows = [
        {"position": i, "token": tokens[i], "token_id": None, "logprob": logprobs[i]}
        for i in inside
    ]
    result = _result(reply, rows, "echo", source)
    result.summary["verified"] = served is not None
    return result


async def ascore_reply(
    client: HasAsyncClient,
    messages: Any,
    reply: str,
    *,
    template: Template | None = None,
    method: str = "auto",
) -> ReplyScore:
    """Log-probability of ``reply`` as the assistant's next turn after ``messages``.

    ``method``: "auto" (prompt_logprobs where the server tokenizes chats, else echo),
    "prompt_logprobs" or "echo". ``template``: the chat template for the echo way (a callable
    taking the messages and returning the text, or a Jinja string). See the module docstring.
    """
    conversation = _conversation(messages, reply)
    if method not in METHODS:
        raise RequestError(
            "method",
            f"method must be one of {', '.join(METHODS)}; got {method!r}",
            allowed=", ".join(METHODS),
            value=method,
        )
    aclient = as_async(client)
    if method != "echo" and template is None:
        found = await _by_prompt_logprobs(aclient, conversation, reply)
        if found is not None:
            found.summary["verified"] = True
            return found
        if method == "prompt_logprobs":
            raise ConformanceError(
                "score_reply(method='prompt_logprobs'): the endpoint offers no POST /tokenize "
                "with messages or refuses prompt_logprobs (a vLLM field), so the reply's tokens "
                "cannot be scored on the server; method='echo' renders the template here",
                check="tokenize",
            )
    return await _by_echo(aclient, conversation, reply, template)
