"""What differs between Completions servers, and what nbcompletions does about it.

A `ServerProfile` gathers everything known about one kind of server: its caps (`Limits`), the extra
body fields that make sampling mean what OpenAI's fields mean there (``neutral_fields``), how to get
prompt-only log-probabilities when it does not honour ``max_tokens=0``, how its validation errors
look, and the model's vocabulary size when known. Profiles are chosen by name
(``Client(..., profile="llamacpp")``) or detected by the conformance check
(`nbcompletions._conformance`), which measures rather than trusts them.

The facts behind each profile are in COMPAT.md ("Measured on real peers"); vLLM's come from its
``protocol.py``: a field left out takes the model's ``generation_config.json`` value, else
temperature 1, top_p 1, top_k off (-1, or 0 in newer releases), min_p 0, repetition_penalty 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from ._chat import ChatRequest
from ._errors import RequestError
from ._request import CompletionRequest, Limits

__all__ = ["PROFILES", "ServerProfile", "get_profile", "profile_names"]

MaxTokensZero = Literal["honoured", "max_tokens_1"]
TextOffsetOrigin = Literal["prompt", "completion"]
#: A request a profile can neutralize: a completion or a chat (both carry temperature, top_p
#: and extra, where the neutral fields go).
Neutralizable = TypeVar("Neutralizable", CompletionRequest, ChatRequest)


@dataclasses.dataclass(frozen=True)
class ServerProfile:
    """Everything nbcompletions knows about one kind of Completions server.

    - ``limits``: its caps on logprobs, n, best_of and stop.
    - ``neutral_fields``: extra body fields that switch its own samplers off, so that temperature
      and top_p mean OpenAI's (llama.cpp: ``top_k=0, min_p=0, repeat_penalty=1``).
    - ``explicit_sampling``: omitted temperature/top_p do not mean 1 there, so send them.
    - ``max_tokens_zero``: ``"honoured"`` or ``"max_tokens_1"`` (score with one generated token
      and drop it, as lm-evaluation-harness does; 0 means "unlimited" on llama.cpp).
    - ``validation_errors_as_500``: its bad-request answers come as HTTP 500 with ``param`` null.
    - ``text_offset_origin``: where generated tokens' ``text_offset`` counts from.
    - ``vocab_size``: the model's vocabulary size for entropy bounds, when known.
    - ``refused_fields``: request fields refused before sending, with why (llama.cpp's ``suffix``
      is spliced into the prompt, so it would silently change what is measured).
    - ``differs``: what differs from OpenAI, in words (the README table is made of these).
    """

    name: str
    limits: Limits = dataclasses.field(default_factory=Limits)
    neutral_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    explicit_sampling: bool = False
    max_tokens_zero: MaxTokensZero = "honoured"
    validation_errors_as_500: bool = False
    text_offset_origin: TextOffsetOrigin = "prompt"
    vocab_size: int | None = None
    differs: tuple[str, ...] = ()
    refused_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Profiles are shared module constants: their field maps must not be mutable.
        object.__setattr__(self, "neutral_fields", MappingProxyType(dict(self.neutral_fields)))
        object.__setattr__(self, "refused_fields", MappingProxyType(dict(self.refused_fields)))

    def with_vocab_size(self, vocab_size: int | None) -> ServerProfile:
        """A copy that knows the model's vocabulary size."""
        return dataclasses.replace(
            self,
            neutral_fields=dict(self.neutral_fields),
            refused_fields=dict(self.refused_fields),
            vocab_size=vocab_size,
        )

    def sampling_fields(self, request: CompletionRequest | ChatRequest) -> dict[str, Any]:
        """The fields to add to ``request`` so its sampling means OpenAI's on this server.

        Fields the request sets (standard ones, or in ``extra``) are left as they are.
        """
        added: dict[str, Any] = {}
        if self.explicit_sampling:
            if request.temperature is None:
                added["temperature"] = 1.0
            if request.top_p is None:
                added["top_p"] = 1.0
        extra = {k: v for k, v in self.neutral_fields.items() if k not in request.extra}
        if extra:
            added["extra"] = {**extra, **request.extra}
        return added

    def neutralize(self, request: Neutralizable) -> Neutralizable:
        """``request`` (a completion or a chat) with this server's neutral sampling fields added
        (see `sampling_fields`).

        A field this server is known to mishandle (``refused_fields``) is a `RequestError`.
        """
        for field, why in self.refused_fields.items():
            value = getattr(request, field, None)
            if value is not None and value is not False:  # echo=False asks for nothing
                raise RequestError(
                    field,
                    f"{field} is refused for profile {self.name!r}: {why}; got {value!r} "
                    f"(leave {field} out)",
                    allowed="omitted",
                    value=value,
                )
        added = self.sampling_fields(request)
        return request.replace(**added) if added else request

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (kept with sweeps)."""
        return {
            "name": self.name,
            "limits": dataclasses.asdict(self.limits),
            "neutral_fields": dict(self.neutral_fields),
            "explicit_sampling": self.explicit_sampling,
            "max_tokens_zero": self.max_tokens_zero,
            "validation_errors_as_500": self.validation_errors_as_500,
            "text_offset_origin": self.text_offset_origin,
            "vocab_size": self.vocab_size,
            "refused_fields": dict(self.refused_fields),
        }


PROFILES: Mapping[str, ServerProfile] = MappingProxyType(
    {
        "openai": ServerProfile("openai", Limits.openai()),
        "nbcompletions": ServerProfile("nbcompletions", Limits.openai(), vocab_size=4096),
        "vllm": ServerProfile(
            "vllm",
            Limits.vllm(),
            # -1 is "top_k off" in every vLLM release (newer ones also take 0).
            neutral_fields={"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},
            explicit_sampling=True,
            # 0 is refused ("must be at least 1"): prompt scoring generates one token, dropped.
            max_tokens_zero="max_tokens_1",
            text_offset_origin="completion",
            differs=(
                "an omitted temperature/top_p/top_k takes the model's generation_config.json",
                "logprobs up to 20 (--max-logprobs); stop has no cap",
                "generated text_offset counts from the completion start",
                "best_of is ignored (removed in V1): one candidate is generated",
                "the stop token stays in the logprobs though cut from the text",
                "max_tokens=0 is refused (400, 'must be at least 1')",
                "GET /v1/models gives max_model_len but no vocabulary size",
            ),
        ),
        "llamacpp": ServerProfile(
            "llamacpp",
            Limits.llamacpp(),
            neutral_fields={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
            explicit_sampling=True,
            max_tokens_zero="max_tokens_1",
            validation_errors_as_500=True,
            differs=(
                "echo logprobs are shifted: each entry holds the next position's distribution",
                "max_tokens=0 means 'until the context is full'",
                "n and best_of are ignored; stream drops echo; include_usage is ignored",
                "omitted fields mean temperature 0.8, top_p 0.95, top_k 40, min_p 0.05, "
                "repeat_penalty 1.1",
                "a list of prompts or token ids is an HTTP 500; validation errors are 500s",
                "the stop token stays in the logprobs; non-ASCII byte tokens come back as ''",
                "suffix is spliced into the prompt (token 0 markers), not ignored",
            ),
            refused_fields={
                "suffix": "llama-cpp-python 0.3.36 splices it into the prompt (wrapped in token "
                "0), so the completion and the echoed prompt change"
            },
        ),
        # ggml's C++ server (llama.cpp tools/server), not llama-cpp-python's: its card says
        # owned_by "llamacpp" with a "meta" block (n_ctx per slot, n_ctx_train, n_vocab).
        "llama-server": ServerProfile(
            "llama-server",
            Limits.llamacpp(),
            # Its sampler chain: penalties (repeat_last_n 64), top_k 40, top_p 0.95, min_p 0.05,
            # then the temperature; these switch off all but top_p and the temperature.
            neutral_fields={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
            explicit_sampling=True,
            max_tokens_zero="max_tokens_1",
            differs=(
                "echo is ignored on /v1/completions: only the generated tokens come back, so no "
                "prompt can be scored over HTTP (llama.cpp #27174)",
                "logprobs come in the chat shape (content[]: id, token, bytes, logprob, "
                "top_logprobs), pre-sampling, without text_offset",
                "max_tokens=0 means 'no limit'; best_of is ignored; n works",
                "omitted fields mean temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, "
                "repeat_penalty 1.1 over the last 64 tokens",
                "top_p is applied before the temperature",
                "-c is split over the slots (-np): GET /v1/models meta.n_ctx is one slot's",
                "usage adds prompt_tokens_details.cached_tokens; responses add timings",
            ),
            refused_fields={
                "echo": "ggml's llama-server ignores echo on /v1/completions and returns only "
                "the generated tokens, so the prompt's log-probabilities would be missing"
            },
        ),
    }
)


def profile_names() -> list[str]:
    return sorted(PROFILES)


def get_profile(profile: str | ServerProfile | None) -> ServerProfile | None:
    """The profile for a name (or the profile itself; None stays None)."""
    if profile is None or isinstance(profile, ServerProfile):
        return profile
    if isinstance(profile, str) and profile.lower() in PROFILES:
        return PROFILES[profile.lower()]
    allowed = ", ".join(repr(n) for n in profile_names())
    raise RequestError(
        "profile",
        f"profile must be one of {allowed} or a ServerProfile; got {profile!r}",
        allowed=allowed,
        value=profile,
    )
