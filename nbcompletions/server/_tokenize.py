"""``POST /tokenize``, ``POST /detokenize`` and ``POST /v1/chat/completions/render``, as vLLM
serves them.

``/tokenize`` takes ``{"prompt": text}`` or ``{"messages": [...], "add_generation_prompt": true,
"continue_final_message": false}`` (the messages rendered with the model's chat template) and
answers ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs``, the tokenizer's own
token names, with ``"return_token_strs": true``; null otherwise). ``/detokenize`` takes
``{"tokens": [...]}`` and answers ``{"prompt": text}``. ``/v1/chat/completions/render`` (vLLM
mounts it with ``--enable-scale-out``) takes ``{"messages": [...], "add_generation_prompt": true,
"continue_final_message": false}`` and answers the part of vLLM's answer that describes the
prompt: ``{"request_id", "token_ids", "token_offsets": null, "model"}`` (no sampling parameters:
nothing is generated; no offsets, as vLLM answers where its tokenizer gives none).

Both are on in every compat mode: they run the tokenizer only (no sampling, nothing an OpenAI
client could trip on), and they let a client find a reply's tokens in a chat (score_reply) on our
server as on vLLM. Like the ``/v1`` routes they need the API key when one is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._checks import check_int, invalid
from .._errors import RequestError
from ..model import render_chat
from ._http import Failure

__all__ = [
    "DETOKENIZE_FIELDS",
    "RENDER_FIELDS",
    "TOKENIZE_FIELDS",
    "detokenize",
    "needs_tokenizer",
    "render",
    "tokenize",
]

TOKENIZE_FIELDS = (
    "model",
    "prompt",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "return_token_strs",
)
DETOKENIZE_FIELDS = ("model", "tokens")
RENDER_FIELDS = (
    "model",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "return_token_offsets",
)


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "true or false", value)
    return value


def _text(body: Mapping[str, Any]) -> str:
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise RequestError(
            "prompt",
            "give either prompt (a string) or messages (a chat); got "
            + ("both" if has_prompt else "neither"),
            allowed="one of prompt, messages",
            value=None,
        )
    _flag(body, "add_special_tokens", not has_messages)  # checked; this tokenizer adds none
    if has_prompt:
        if not isinstance(body["prompt"], str):
            raise invalid("prompt", "a string", body["prompt"])
        for name in ("add_generation_prompt", "continue_final_message"):
            if body.get(name) is not None:
                raise invalid(name, "unset with prompt (it applies to messages)", body[name])
        return str(body["prompt"])
    continued = _flag(body, "continue_final_message", False)
    return render_chat(
        body["messages"],
        _flag(body, "add_generation_prompt", not continued),
        continue_final_message=continued,
    )


def tokenize(body: Mapping[str, Any], engine: Any) -> dict[str, Any]:
    """The answer to a ``/tokenize`` body (fields already known to be `TOKENIZE_FIELDS`)."""
    text = _text(body)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            "prompt",
            f"prompt must be valid Unicode text; got a lone surrogate at character {exc.start}",
            allowed="text without lone surrogates (U+D800..U+DFFF)",
            value=text[max(0, exc.start - 20) : exc.start + 20],
        ) from None
    tokens = [int(t) for t in engine.encode(text)]
    names = None
    if _flag(body, "return_token_strs", False):
        names = [engine.tokenizer.id_to_token(t) for t in tokens]
    return {
        "count": len(tokens),
        "max_model_len": engine.context_length,
        "tokens": tokens,
        "token_strs": names,
    }


def render(body: Mapping[str, Any], engine: Any, request_id: str, model: str) -> dict[str, Any]:
    """The answer to a ``/v1/chat/completions/render`` body (fields known to be `RENDER_FIELDS`):
    the chat rendered with the model's template and tokenized, nothing generated."""
    if body.get("messages") is None:
        raise invalid("messages", "a list of messages", None)
    _flag(body, "return_token_offsets", False)  # checked; offsets are not computed (null)
    return {
        "request_id": f"chatcmpl-{request_id}",
        "token_ids": tokenize(body, engine)["tokens"],
        "token_offsets": None,
        "model": model,
    }


def detokenize(body: Mapping[str, Any], engine: Any) -> dict[str, Any]:
    """The answer to a ``/detokenize`` body: ``{"prompt": text}``."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise invalid("tokens", "a list of token ids", tokens)
    size = engine.vocab_size
    for index, token in enumerate(tokens):
        check_int(f"tokens[{index}]", token, 0, size - 1)
    return {"prompt": engine.decode([int(t) for t in tokens])}


def needs_tokenizer(engine: Any) -> None:
    """A 404 for an engine without a tokenizer (a stand-in serving completions only)."""
    if not all(hasattr(engine, name) for name in ("encode", "decode", "context_length")):
        raise Failure(404, "This server's engine offers no tokenizer: /tokenize is not served.")
