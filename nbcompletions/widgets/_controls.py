"""Pure functions from control values to request fields: no widgets, no I/O, tested as such."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._errors import RequestError
from .._request import CompletionRequest, Limits

#: Turns text into token ids (a tokenizer's encode); what the logit_bias editor needs for text keys.
Encoder = Callable[[str], list[int]]


def _unescape(text: str) -> str:
    r"""Turn the escapes a one-line text box needs (``\n``, ``\t``, ``\\``) into characters."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def parse_stop(values: Iterable[str]) -> list[str] | None:
    r"""Stop sequences from text boxes: blanks are ignored, ``\n`` and ``\t`` are escapes."""
    stops = [_unescape(value) for value in values if value]
    return stops or None


def parse_logit_bias(text: str, encode: Encoder | None = None) -> dict[str, float] | None:
    """Parse the logit_bias editor: one ``KEY: BIAS`` per line.

    KEY is a token id (digits) or, where the model's tokenizer is known (``encode``), a text in
    double quotes (JSON string syntax, so ``" the"`` keeps its space and ``"\\n"`` is a newline)
    or bare text. A text that is several tokens biases each of them. Returns ``{"id": bias}`` or
    None when empty; raises `RequestError` (param ``logit_bias``) naming the line that is wrong.
    """
    allowed = "lines of KEY: BIAS, KEY a token id or a quoted text, BIAS a number from -100 to 100"
    bias: dict[str, float] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.rpartition(":")
        key = key.strip()
        if not sep or not key:
            raise RequestError(
                "logit_bias",
                f"logit_bias line {number} must look like 'KEY: BIAS'; got {raw_line!r}",
                allowed=allowed,
                value=raw_line,
            )
        try:
            amount = float(value)
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount) or not -100 <= amount <= 100:
            raise RequestError(
                "logit_bias",
                f"logit_bias line {number}: the bias must be a number "
                f"from -100 to 100; got {value.strip()!r}",
                allowed=allowed,
                value=raw_line,
            )
        if key.isdigit():
            ids = [int(key)]
        else:
            if len(key) >= 2 and key[0] == key[-1] == '"':
                try:
                    token_text = json.loads(key)
                except json.JSONDecodeError as exc:
                    raise RequestError(
                        "logit_bias",
                        f"logit_bias line {number}: {key} is not a valid quoted string ({exc.msg})",
                        allowed=allowed,
                        value=raw_line,
                    ) from None
            else:
                token_text = key
            if encode is None:
                raise RequestError(
                    "logit_bias",
                    f"logit_bias line {number}: this model's tokenizer is not known "
                    f"here, so give token ids rather than text; got {key!r}",
                    allowed="token ids (digits) for models whose tokenizer is unknown",
                    value=raw_line,
                )
            ids = list(encode(token_text))
            if not ids:
                raise RequestError(
                    "logit_bias",
                    f"logit_bias line {number}: {key} encodes to no tokens",
                    allowed=allowed,
                    value=raw_line,
                )
        for token_id in ids:
            bias[str(token_id)] = int(amount) if amount == int(amount) else amount
    return bias or None


def _parse_seed(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise RequestError(
            "seed",
            f"seed must be an integer (or blank for none); got {text!r}",
            allowed="an integer, or blank",
            value=text,
        ) from None


def playground_request(
    state: Mapping[str, Any], *, limits: Limits | None = None, encode: Encoder | None = None
) -> CompletionRequest:
    """The request a Playground's control values describe (pure; validates).

    ``state`` maps control names to values as the widgets hold them (strings for seed, suffix, stop
    boxes and the logit_bias editor). Always sent: prompt, model, max_tokens, temperature, top_p and
    logprobs (unless "off"), because servers disagree on their defaults. The other fields are sent
    only when changed from the API default, so a server that refuses a field outright (llama.cpp:
    best_of, echo, suffix) is not sent it unless asked.
    """
    fields: dict[str, Any] = {
        "prompt": state["prompt"],
        "model": state.get("model") or None,
        "max_tokens": state["max_tokens"],
        "temperature": state["temperature"],
        "top_p": state["top_p"],
        "logprobs": state.get("logprobs"),
    }
    for name in ("frequency_penalty", "presence_penalty"):
        if state.get(name):
            fields[name] = state[name]
    if state.get("n", 1) != 1:
        fields["n"] = state["n"]
    if state.get("best_of", 1) != 1:
        fields["best_of"] = state["best_of"]
    if state.get("echo"):
        fields["echo"] = True
    if state.get("stream"):
        fields["stream"] = True
        # Usage arrives only in a last chunk, and only when asked for.
        fields["stream_options"] = {"include_usage": True}
    fields["seed"] = _parse_seed(state.get("seed", ""))
    fields["stop"] = parse_stop(state.get("stop", ()))
    fields["logit_bias"] = parse_logit_bias(state.get("logit_bias", ""), encode)
    if state.get("suffix"):
        fields["suffix"] = state["suffix"]
    return CompletionRequest(**fields, limits=limits or Limits())


#: A line holding only this separates prompts in the SweepBuilder's prompts box.
PROMPT_SEPARATOR = "---"
_SEPARATOR_LINE = re.compile(r"\n?^---$\n?", flags=re.MULTILINE)


def split_prompts(text: str) -> list[str]:
    """The prompts in a prompts box: ``text`` cut at every line that holds only ``---``.

    Everything else is kept exactly, newlines included: ``"ROMEO:\n\n---\nJULIET:\n"`` is
    ``["ROMEO:\n", "JULIET:\n"]`` (the line break just before and just after a ``---`` line
    belong to the separator). Parts that are empty or only whitespace are dropped. Without a
    ``---`` line the whole text is one prompt, however many lines it has.
    """
    return [part for part in _SEPARATOR_LINE.split(text) if part.strip()]


def join_prompts(prompts: Iterable[str]) -> str:
    """The prompts box text for ``prompts``; `split_prompts` gives them back.

    Raises ValueError for a prompt that holds a ``---`` line of its own, which the box would
    read as a separator.
    """
    prompts = list(prompts)
    for number, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {number} must be a string; got {type(prompt).__name__}")
        if _SEPARATOR_LINE.search(prompt):
            raise ValueError(
                f"prompt {number} holds a line {PROMPT_SEPARATOR!r}, which the prompts box reads "
                f"as the separator between prompts; got {prompt!r}"
            )
        if not prompt.strip():
            raise ValueError(f"prompt {number} is empty or only whitespace; got {prompt!r}")
    return f"\n{PROMPT_SEPARATOR}\n".join(prompts)


def parse_values(field_name: str, text: str) -> list[Any]:
    """Comma-separated sweep values for one request field, typed as the field requires.

    Raises `RequestError` naming the field for a value of the wrong type; ranges are checked when
    the requests are built.
    """
    parts = [part.strip() for part in text.split(",")]
    parts = [part for part in parts if part]
    if not parts:
        raise RequestError(
            field_name,
            f"{field_name}: give at least one value (comma-separated); got {text!r}",
            allowed="comma-separated values",
            value=text,
        )
    kind = SWEEP_FIELDS.get(field_name)
    values: list[Any] = []
    for part in parts:
        try:
            if kind is float:
                values.append(float(part))
            elif kind is int:
                values.append(int(part))
            else:
                values.append(_unescape(part))
        except ValueError:
            kind_name = "a number" if kind is float else "an integer"
            raise RequestError(
                field_name,
                f"{field_name} values must each be {kind_name}; got {part!r}",
                allowed=f"comma-separated, each {kind_name}",
                value=text,
            ) from None
    return values


#: Fields a SweepBuilder can sweep over, and the type of their values.
SWEEP_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "frequency_penalty": float,
    "presence_penalty": float,
    "max_tokens": int,
    "logprobs": int,
    "seed": int,
    "n": int,
    "best_of": int,
    "stop": str,
}


#: What a SweepBuilder can plot against its axes: columns of `metrics.per_choice`.
SWEEP_METRICS: tuple[str, ...] = (
    "mean_logprob",
    "perplexity",
    "n_tokens",
    "repetition_rate",
    "token_repetition_rate",
    "distinct_1",
    "distinct_2",
    "n_words",
)
