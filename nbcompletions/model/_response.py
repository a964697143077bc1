"""What a finished (or streaming) request sends back: the ``text_completion`` envelope, each
choice, its logprobs lists and the usage counts, written as OpenAI writes them (a -inf logprob as
-9999.0, ``top_logprobs`` keyed by token string, offsets in characters of prompt + completion)."""

from __future__ import annotations

import codecs
import math
import secrets
import time
from typing import Any

import numpy as np

from .._parse import NEG_INF_LOGPROB
from ._plan import Plan, Prompt
from ._rows import Row
from ._sampling import top_k
from ._tokenizer import Vocabulary

__all__ = [
    "Parts",
    "PromptLogprobs",
    "choice",
    "echo_parts",
    "envelope",
    "finite_logprob",
    "generated_parts",
    "logprobs_object",
    "prompt_logprobs",
    "top_logprobs",
    "usage",
]

#: tokens, token_logprobs, top_logprobs, text_offset of one choice (or its echoed prompt)
Parts = tuple[list[str], list[float | None], list[dict[str, float] | None], list[int]]
#: vLLM's prompt_logprobs: None for the first token, then token id -> logprob, rank, decoded_token
PromptLogprobs = list[dict[str, dict[str, Any]] | None]


def finite_logprob(value: float) -> float:
    """``value``, or -9999.0 for -inf: JSON has no infinities (vLLM's stand-in)."""
    return value if math.isfinite(value) else NEG_INF_LOGPROB


def envelope(model_id: str, fingerprint: str) -> dict[str, Any]:
    """The fields every response and chunk of one request share."""
    return {
        "id": "cmpl-" + secrets.token_hex(12),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "system_fingerprint": fingerprint,
    }


def usage(plan: Plan, rows: list[Row]) -> dict[str, int]:
    """Each prompt counted once; every token sampled (best_of candidates, end-of-text) counted."""
    prompt_tokens = sum(len(p.ids) for p in plan.prompts)
    completion_tokens = sum(row.n_sampled for row in rows)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def top_logprobs(
    vocab: Vocabulary, logp_row: np.ndarray, ids: np.ndarray, chosen: int
) -> dict[str, float]:
    """One position's ``top_logprobs``: the tokens ``ids``, plus the chosen one."""
    strings = vocab.token_strings
    top = {strings[int(t)]: finite_logprob(float(logp_row[int(t)])) for t in ids}
    top.setdefault(strings[chosen], finite_logprob(float(logp_row[chosen])))
    return top


def echo_parts(vocab: Vocabulary, prompt: Prompt, logp: np.ndarray | None, k: int) -> Parts:
    """Logprob lists of the echoed prompt; ``logp`` is (P-1, V), row i predicting token i+1."""
    ids = prompt.echo_ids
    tokens = [vocab.token_strings[t] for t in ids]
    token_logprobs: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    if logp is not None and len(ids) > 1:
        top_ids = top_k(logp, k)
        for i in range(1, len(ids)):
            token_logprobs.append(finite_logprob(float(logp[i - 1, ids[i]])))
            tops.append(top_logprobs(vocab, logp[i - 1], top_ids[i - 1], ids[i]))
    offsets = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars = 0
    for t in ids:
        offsets.append(chars)
        chars += len(decoder.decode(vocab.token_bytes[t]))
    if len(ids) > 1 and logp is None:
        raise RuntimeError("the echoed prompt's logprobs were asked for before the prefill")
    return tokens, token_logprobs[: len(ids)], tops[: len(ids)], offsets


def prompt_logprobs(
    vocab: Vocabulary, ids: list[int], logp: np.ndarray | None, k: int
) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs`` of a prompt: per token after the first, the token itself (its
    logprob and vocabulary rank, 1 = most likely) then the ``k`` most likely tokens; ``logp`` is
    (P-1, V), row i predicting token i+1."""
    out: PromptLogprobs = [None]
    if len(ids) < 2 or logp is None:
        return out[: len(ids)]
    strings = vocab.token_strings
    top_ids = top_k(logp, k)
    for i in range(1, len(ids)):
        row, token = logp[i - 1], ids[i]
        value = row[token]
        entry = {
            str(token): {
                "logprob": finite_logprob(float(value)),
                # vLLM's rank: how many tokens are at least as likely (ties share the worse rank)
                "rank": int(np.count_nonzero(row >= value)),
                "decoded_token": strings[token],
            }
        }
        for rank, alternative in enumerate(top_ids[i - 1].tolist(), start=1):
            entry.setdefault(
                str(alternative),
                {
                    "logprob": finite_logprob(float(row[alternative])),
                    "rank": rank,
                    "decoded_token": strings[alternative],
                },
            )
        out.append(entry)
    return out


def generated_parts(vocab: Vocabulary, row: Row, first: int, end: int) -> Parts:
    """Logprob lists of a row's tokens ``first:end``; the last part of a row that ended on
    ``<|endoftext|>`` lists that token too."""
    parts: Parts = (
        [vocab.token_strings[t] for t in row.tokens[first:end]],
        list(row.logprobs[first:end]),
        list(row.tops[first:end]),
        [row.base_offset + s for s in row.starts[first:end]],
    )
    if row.end_of_text is not None and row.finished and end == row.kept_tokens:
        logprob, top = row.end_of_text
        parts[0].append(vocab.token_strings[vocab.eot_token_id])
        parts[1].append(logprob)
        parts[2].append(top)
        parts[3].append(row.base_offset + len(row.final_text))
    return parts


def logprobs_object(
    tokens: list[str],
    token_logprobs: list[float | None],
    tops: list[dict[str, float] | None],
    offsets: list[int],
) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def choice(
    vocab: Vocabulary, plan: Plan, prompt: Prompt, echo: Parts | None, row: Row, index: int
) -> dict[str, Any]:
    """One finished row as a choice of the response."""
    text = row.final_text
    logprobs = None
    if plan.logprobs is not None:
        parts = generated_parts(vocab, row, 0, row.kept_tokens)
        if plan.echo:
            if echo is None:
                echo = echo_parts(vocab, prompt, None, plan.logprobs)
            parts = (
                echo[0] + parts[0],
                echo[1] + parts[1],
                echo[2] + parts[2],
                echo[3] + parts[3],
            )
        logprobs = logprobs_object(*parts)
    if plan.echo:
        text = prompt.text + text
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": row.finish_reason}
