"""A Completions response as three tidy DataFrames: choices, tokens and alternatives.

`to_frames(response, request=None, *, vocab_size=None)` returns ``(choices, tokens, alternatives)``.
It is pure (no I/O) and defensive: every logprobs field may be missing or null, unknown fields are
ignored, choices may come in any order, and llama.cpp's chat-shaped logprobs
(``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob"}]}]}``) convert
like OpenAI's. The input is never mutated.

Column layouts (the constants below name them, in this order). Dtypes are the same on pandas 2
and 3: strings are Python ``str`` objects in ``object`` columns (pandas 3 would infer its
Arrow-backed ``str`` dtype; we bypass that so both versions agree and a million tokens are not
copied into Arrow; use ``.astype("str")`` if you want it). Counts that may be unknown are nullable
``Int64``; logprobs and everything derived from them are ``float64`` with NaN where unknown.

choices, one row per choice, sorted by ``index``:
    index (int64), prompt_index (Int64: index // n, NA without the request),
    choice (Int64: index % n, NA without the request), text (object),
    finish_reason (object, None where missing), n_tokens (Int64: generated tokens; NA without
    logprobs), sum_logprob, mean_logprob, perplexity (float64, over generated tokens whose
    logprob is not null; perplexity = exp(-mean_logprob)), prompt_n_tokens (Int64: echoed prompt
    tokens, 0 without echo), prompt_sum_logprob, prompt_mean_logprob, prompt_perplexity (float64,
    the same over the echoed prompt tokens; the first prompt token's logprob is null, so it is not
    counted).

tokens, one row per token (echoed prompt tokens first within a choice):
    index (int64), prompt_index (Int64), choice (Int64), position (int64, 0-based within the
    choice), token (object), token_display (object: the token with whitespace and raw bytes
    made visible, see `nbcompletions.visible_token`), logprob (float64, NaN where null), prob
    (float64, exp(logprob)), text_offset (Int64, as the server sent it: OpenAI counts from the
    start of the prompt, vLLM from the start of the completion), echo (bool: an echoed prompt
    token), rank (Int64), top_mass, entropy_low, entropy_high (float64).

alternatives, one row per returned top-logprob entry, sorted by (index, position, rank):
    index (int64), position (int64), rank (int64, 1 = most likely; ties keep the server's order,
    null logprobs last), token (object), token_display (object), logprob (float64), prob
    (float64), chosen (bool: the entry's token equals the chosen token).

Every frame carries ``df.attrs["vocab_size"]``.

Definitions at one position, where the server returned alternatives (else all NA/NaN):

- The *known* tokens are the alternatives plus the chosen token when it is not among them (old
  OpenAI responses left it out; newer ones add it as entry k+1). ``top_mass`` is their total
  probability.
- ``rank`` = 1 + the number of alternatives, other than the chosen token itself, with a strictly
  higher logprob. Exact when the chosen token is within the top k; k + 1 is a lower bound
  otherwise.
- Entropy bounds, in nats. Known part: ``-sum p log p`` over the known tokens. The rest of the
  mass, ``r = 1 - top_mass``, lies on the ``V - j`` unseen tokens (V = vocab_size, j = known
  tokens), and each unseen token's probability is at most ``c``, the smallest returned top-k
  probability (it was not in the top k). ``entropy_high`` spreads r uniformly over the V - j
  tokens (the maximum for that mass and count); ``entropy_low`` packs r into as few tokens as
  possible, each at most c (the minimum). Because a response may add the chosen token as an extra
  entry below the true k-th, c leaves out the chosen token's entry where it might be that extra
  (more entries than the request's ``logprobs``, or the request unknown): a looser but always
  valid bound. A listed entry with a null logprob counts as unseen, and removes the cap there.

Echoed prompt tokens: with ``echo=True`` the first tokens of every choice are the prompt's. How
many is taken, in this order, from: ``max_tokens=0`` (all of them); a token-id prompt (its
length); a string prompt and ``text_offset`` starting at 0 (tokens whose offset is below
``len(prompt)``); a string prompt and the tokens' UTF-8 bytes (``bytes:\\xNN`` tokens included)
adding up exactly to the prompt's; ``finish_reason == "length"`` with ``max_tokens`` given (the
last max_tokens tokens of that choice, and the same count for the other choices of the same
prompt); ``usage.prompt_tokens`` when there is a single prompt. If none applies the split is
unknown: ``prompt_n_tokens`` and ``n_tokens`` are NA, the sums NaN, and every token has
``echo=False``. Without the request, nothing is echoed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd

from ._checks import is_int
from ._gc_pause import paused_gc
from ._parse import choice_text, parse_logprobs, read_chat_tokens, top_items
from ._request import CompletionRequest
from ._usage import token_counts
from ._visible import visible_tokens

__all__ = [
    "ALTERNATIVE_COLUMNS",
    "CHOICE_COLUMNS",
    "DEFAULT_VOCAB_SIZE",
    "TOKEN_COLUMNS",
    "to_frames",
]

#: GPT-2 and GPT-3 byte-level BPE vocabularies; used for the entropy bounds when none is given.
DEFAULT_VOCAB_SIZE = 50257

CHOICE_COLUMNS: tuple[str, ...] = (
    "index",
    "prompt_index",
    "choice",
    "text",
    "finish_reason",
    "n_tokens",
    "sum_logprob",
    "mean_logprob",
    "perplexity",
    "prompt_n_tokens",
    "prompt_sum_logprob",
    "prompt_mean_logprob",
    "prompt_perplexity",
)
TOKEN_COLUMNS: tuple[str, ...] = (
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
)
ALTERNATIVE_COLUMNS: tuple[str, ...] = (
    "index",
    "position",
    "rank",
    "token",
    "token_display",
    "logprob",
    "prob",
    "chosen",
)


# -------------------------------------------------------------------------------------------------
# Input normalisation


@dataclass(frozen=True)
class _RequestInfo:
    """What the frames need to know about the request; None = unknown."""

    n: int | None = None
    echo: bool = False
    max_tokens: int | None = None
    logprobs: int | None = None
    prompts: list[str | list[int]] | None = None


def _split_prompts(prompt: Any) -> list[str | list[int]] | None:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list | tuple) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return list(prompt)
        if all(is_int(item) for item in prompt):
            return [[int(item) for item in prompt]]
        if all(isinstance(item, list | tuple) for item in prompt):
            return [list(item) for item in prompt]
    return None


def _request_info(request: Any) -> _RequestInfo:
    if request is None:
        return _RequestInfo()
    if isinstance(request, CompletionRequest):
        fields: Mapping[str, Any] = {
            name: getattr(request, name)
            for name in ("n", "echo", "max_tokens", "logprobs", "prompt")
        }
    elif isinstance(request, Mapping):
        fields = request
    else:
        raise TypeError(
            "request must be a CompletionRequest, a request body (mapping) or None; "
            f"got {type(request).__name__}"
        )
    n = fields.get("n")
    if n is None:
        n = 1
    if not is_int(n) or n < 1:
        raise ValueError(f"request n must be an integer >= 1; got {n!r}")
    max_tokens = fields.get("max_tokens")
    logprobs = fields.get("logprobs")
    return _RequestInfo(
        n=int(n),
        echo=bool(fields.get("echo")),
        max_tokens=int(max_tokens) if is_int(max_tokens) else None,
        logprobs=int(logprobs) if is_int(logprobs) else None,
        prompts=_split_prompts(fields.get("prompt")),
    )


def _as_mapping(response: Any) -> Mapping[str, Any]:
    if isinstance(response, Mapping):
        return response
    dump = getattr(response, "model_dump", None)
    if callable(dump):
        try:
            # The openai SDK builds models without validation, so a non-OpenAI logprobs shape would
            # make pydantic warn on dump; the data is fine and we parse it defensively ourselves.
            data = dump(warnings=False)
        except TypeError:
            data = dump()
    elif callable(getattr(response, "to_dict", None)):
        data = response.to_dict()
    else:
        raise TypeError(
            "response must be a dict (the JSON body) or an object with .model_dump() "
            "or .to_dict() such as the openai SDK's Completion; "
            f"got {type(response).__name__}"
        )
    if not isinstance(data, Mapping):
        raise TypeError(
            f"response.model_dump()/.to_dict() must return a dict; got {type(data).__name__}"
        )
    return data


@dataclass
class _Choice:
    index: int
    text: str | None = None
    finish_reason: Any = None
    has_logprobs: bool = False
    tokens: list[Any] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    tops: list[Any] = field(default_factory=list)
    offsets: list[Any] | None = None  # None: the server sent no text_offset


def _collect_choices(body: Mapping[str, Any]) -> list[_Choice]:
    raw = body.get("choices")
    if raw is None:
        if body.get("error") is not None:
            raise ValueError(f"response is an error body, not a completion: {body['error']!r}")
        raw = []
    if not isinstance(raw, list | tuple):
        raise ValueError(f"response['choices'] must be a list; got {type(raw).__name__}")
    # Choices sharing an index are consecutive pieces of one choice (streamed chunks), merged in
    # order.
    groups: dict[int, list[tuple[int, Mapping[str, Any]]]] = {}
    for position, choice in enumerate(raw):
        if not isinstance(choice, Mapping) and callable(getattr(choice, "model_dump", None)):
            choice = _as_mapping(choice)  # an SDK Choice inside a plain dict
        if not isinstance(choice, Mapping):
            raise ValueError(
                f"response['choices'][{position}] must be an object; got {type(choice).__name__}"
            )
        index = choice.get("index")
        if not is_int(index) or index < 0:
            index = position
        groups.setdefault(int(index), []).append((position, choice))
    return [_merge_choice(index, groups[index]) for index in sorted(groups)]


def _merge_choice(index: int, pieces: list[tuple[int, Mapping[str, Any]]]) -> _Choice:
    result = _Choice(index=index)
    texts: list[str] = []
    offsets: list[Any] = []
    offsets_seen = False
    for position, choice in pieces:
        text = choice_text(choice)
        if text is not None:
            texts.append(str(text))
        if choice.get("finish_reason") is not None:
            result.finish_reason = choice.get("finish_reason")
        logprobs = choice.get("logprobs")
        if logprobs is None:
            continue
        where = f"response['choices'][{position}].logprobs"
        if not isinstance(logprobs, Mapping):
            raise ValueError(f"{where} must be an object or null; got {type(logprobs).__name__}")
        tokens, token_logprobs, tops, piece_offsets = parse_logprobs(logprobs, where)
        result.has_logprobs = True
        if len(pieces) == 1:  # the common case: keep the parsed lists, no copies
            result.tokens, result.logprobs, result.tops = tokens, token_logprobs, tops
            result.offsets = piece_offsets
            break
        result.tokens.extend(tokens)
        result.logprobs.extend(token_logprobs)
        result.tops.extend(tops)
        offsets_seen = offsets_seen or piece_offsets is not None
        offsets.extend(piece_offsets if piece_offsets is not None else [None] * len(tokens))
    if len(pieces) > 1 and offsets_seen:
        result.offsets = offsets
    result.text = "".join(texts) if texts else None
    return result


# -------------------------------------------------------------------------------------------------
# Echo: how many of a choice's tokens are the prompt's


def _token_bytes(token: Any) -> int | None:
    """Length in UTF-8 bytes of a token string; OpenAI's ``bytes:\\xNN`` form counts its bytes."""
    if not isinstance(token, str):
        return None
    if token.startswith("bytes:"):
        try:
            raw = token[6:].encode("latin-1").decode("unicode_escape").encode("latin-1")
        except (UnicodeError, ValueError):
            return None
        return len(raw)
    return len(token.encode("utf-8", "surrogatepass"))


def _prompt_len_from_text(choice: _Choice, prompt: str) -> int | None:
    length = len(choice.tokens)
    if choice.offsets is not None and length:
        offsets = np.array(choice.offsets, dtype=np.float64)
        if (
            offsets.ndim == 1
            and not np.isnan(offsets).any()
            and offsets[0] == 0
            and bool(np.all(np.diff(offsets) >= 0))
        ):
            return int(np.count_nonzero(offsets < len(prompt)))
    target = len(prompt.encode("utf-8", "surrogatepass"))
    total = 0
    for count, token in enumerate(choice.tokens):
        if total == target:
            return count
        size = _token_bytes(token)
        if size is None:
            return None
        total += size
        if total > target:
            return None
    return length if total == target else None


def _prompt_lengths(
    choices: list[_Choice], info: _RequestInfo, body: Mapping[str, Any]
) -> list[int | None]:
    if not info.echo:
        return [0] * len(choices)
    if info.max_tokens == 0:
        return [len(c.tokens) for c in choices]
    n = info.n or 1
    prompts = info.prompts
    found: list[int | None] = []
    for choice in choices:
        prompt = None
        if prompts is not None and choice.index // n < len(prompts):
            prompt = prompts[choice.index // n]
        if isinstance(prompt, list):
            found.append(min(len(prompt), len(choice.tokens)))
        elif isinstance(prompt, str):
            found.append(_prompt_len_from_text(choice, prompt))
        else:
            found.append(None)
    if all(value is not None for value in found):
        return found
    # A choice cut at max_tokens ends with exactly max_tokens generated tokens; its prompt length
    # holds for every choice of the same prompt.
    by_prompt: dict[int, int] = {}
    if info.max_tokens is not None:
        for choice in choices:
            extra = len(choice.tokens) - info.max_tokens
            if choice.finish_reason == "length" and extra >= 0:
                by_prompt.setdefault(choice.index // n, extra)
    single_prompt = prompts is not None and len(prompts) == 1
    usage_prompt = token_counts(body).get("prompt_tokens")
    for i, choice in enumerate(choices):
        if found[i] is not None:
            continue
        if choice.index // n in by_prompt:
            found[i] = min(by_prompt[choice.index // n], len(choice.tokens))
        elif single_prompt and usage_prompt is not None and usage_prompt <= len(choice.tokens):
            found[i] = usage_prompt
    return found


# -------------------------------------------------------------------------------------------------
# Vectorised building blocks


def _floats(values: list[Any], where: str) -> np.ndarray:
    """float64 array; None (JSON null) becomes NaN."""
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        bad = next((v for v in values if v is not None and not isinstance(v, int | float)), None)
        raise ValueError(f"{where} must hold numbers or nulls; got {bad!r}") from exc
    if array.ndim != 1:
        raise ValueError(f"{where} must hold numbers or nulls; got nested lists")
    return array


def _objects(values: Iterable[Any], count: int) -> np.ndarray:
    # fromiter never turns equal-length nested sequences into a 2-D array, unlike np.array.
    return np.fromiter(values, dtype=object, count=count)


def _entry_count(entry: Any) -> int:
    if isinstance(entry, Mapping | list | tuple):
        return len(entry)
    return len(top_items(entry))  # 0 for null; junk raises the explanatory error


def _flatten_alternatives(tops: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position counts, and the flattened alternative tokens and logprobs."""
    n_positions = len(tops)
    try:
        counts = np.fromiter(map(len, tops), dtype=np.intp, count=n_positions)
        present = tops
    except TypeError:  # null entries (the first echoed token) or junk, checked one by one
        counts = np.fromiter(map(_entry_count, tops), dtype=np.intp, count=n_positions)
        present = [entry for entry in tops if entry]
    total = int(counts.sum())
    try:
        # The fast path: OpenAI/vLLM dicts with float values, flattened in C.
        tokens = _objects(chain.from_iterable(map(dict.keys, present)), total)
        logprobs = np.fromiter(
            chain.from_iterable(map(dict.values, present)), dtype=np.float64, count=total
        )
    except (TypeError, ValueError):
        try:
            tokens, logprobs = _flatten_chat_lists(present, total)
        except (TypeError, ValueError, KeyError):
            tokens, logprobs = _flatten_alternatives_slow(present, total)
    return counts, tokens, logprobs


_TOKEN = itemgetter("token")
_LOGPROB = itemgetter("logprob")


def _flatten_chat_lists(present: list[Any], total: int) -> tuple[np.ndarray, np.ndarray]:
    """The chat shape's lists of ``{"token", "logprob", "bytes"}`` objects, flattened at C speed
    where every entry has a token and a numeric logprob (else the error sends it the slow way)."""
    entries = list(chain.from_iterable(present))
    if len(entries) != total:
        raise ValueError("not lists of entries")
    tokens = read_chat_tokens(entries, list(map(_TOKEN, entries)))
    logprobs = np.fromiter(map(_LOGPROB, entries), dtype=np.float64, count=total)
    return _objects(tokens, total), logprobs


def _flatten_alternatives_slow(present: list[Any], total: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [pair for entry in present for pair in top_items(entry)]
    return _objects((token for token, _ in pairs), total), _floats(
        [logprob for _, logprob in pairs], "top_logprobs values"
    )


def _int64(values: np.ndarray, missing: np.ndarray | None = None) -> pd.arrays.IntegerArray:
    if missing is None:
        missing = np.zeros(len(values), dtype=bool)
    return pd.arrays.IntegerArray(np.asarray(values, dtype=np.int64), missing)


def _frame(columns: dict[str, Any], length: int, vocab_size: int) -> pd.DataFrame:
    index = pd.RangeIndex(length)
    data = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.dtype == object:
            # Explicit object dtype: pandas 3 would otherwise infer (and copy into) its str dtype.
            data[name] = pd.Series(values, index=index, dtype=object, copy=False)
        else:
            data[name] = pd.Series(values, index=index, copy=False)
    frame: pd.DataFrame = pd.DataFrame(data, index=index, copy=False)
    frame.attrs["vocab_size"] = vocab_size
    return frame


def _segment_min(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Minimum of each segment of ``values`` (segments of ``counts`` rows); +inf for empty ones."""
    result = np.full(len(counts), np.inf)
    nonempty = counts > 0
    if values.size:
        starts = (np.cumsum(counts) - counts)[nonempty]
        result[nonempty] = np.minimum.reduceat(values, starts)
    return result


def _rank_order(sort_key: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    """Permutation that sorts each segment by ``sort_key``, stable, segments kept in place.

    None when the segments are already sorted (OpenAI sends its lists most likely first).
    """
    segment_counts = counts[counts > 0]
    if sort_key.size == 0:
        return None
    width = int(segment_counts.max())
    n_segments = len(segment_counts)
    segment_starts = np.cumsum(segment_counts) - segment_counts
    in_order = sort_key[1:] >= sort_key[:-1]  # not np.diff: inf - inf would warn
    in_order[segment_starts[1:] - 1] = True  # a new segment may start lower
    if in_order.all():
        return None
    if n_segments * width > 4 * sort_key.size:  # a few very long lists: padding would not pay
        segment = np.repeat(np.arange(n_segments), segment_counts)
        return np.lexsort((sort_key, segment))
    # Segments as the rows of a padded matrix: one short argsort per row is far cheaper than a
    # global lexsort. Padding is +inf and after the real entries, so a stable sort keeps it last.
    if n_segments * width == sort_key.size:
        padded = sort_key.reshape(n_segments, width)
        real = None
    else:
        segment = np.repeat(np.arange(n_segments), segment_counts)
        column = np.arange(sort_key.size) - segment_starts[segment]
        padded = np.full((n_segments, width), np.inf)
        padded[segment, column] = sort_key
        real = np.arange(width)[None, :] < segment_counts[:, None]
    order = np.argsort(padded, axis=1, kind="stable") + segment_starts[:, None]
    permutation: np.ndarray = order.ravel() if real is None else order[real]
    return permutation


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x * log(x) with 0 log 0 = 0."""
    safe = np.where(x > 0, x, 1.0)
    return np.where(x > 0, x * np.log(safe), 0.0)


def _entropy_bounds(
    known_h: np.ndarray, mass: np.ndarray, n_known: np.ndarray, cap: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    rest = np.clip(1.0 - mass, 0.0, 1.0)
    unseen = np.maximum(vocab_size - n_known, 1).astype(np.float64)
    # Uniform over every unseen token: the most entropy that mass can carry.
    high = known_h - (_xlogx(rest) - rest * np.log(unseen))
    # As few tokens as possible at the cap c, plus one remainder: the least entropy. If the cap
    # cannot hold the mass on the unseen tokens (clamped logprobs, a vocab_size too small), drop it.
    c = np.minimum(cap, rest)
    feasible = (c > 0) & (rest <= unseen * c)
    c = np.where(feasible, c, rest)
    with np.errstate(divide="ignore", invalid="ignore"):
        full = np.where(c > 0, np.floor(rest / np.where(c > 0, c, 1.0)), 0.0)
    remainder = np.clip(rest - full * c, 0.0, None)
    low = known_h - full * _xlogx(c) - _xlogx(remainder)
    # Rounding can put the packed value a hair above the uniform one when they coincide.
    return np.minimum(low, high), high


# -------------------------------------------------------------------------------------------------
# The stages of `to_frames`: choices -> token rows -> alternatives -> per-choice sums -> frames


@dataclass(frozen=True)
class _TokenRows:
    """Every choice's tokens laid end to end: one entry per token row."""

    choice_index: np.ndarray  # per choice: its index
    lengths: np.ndarray  # per choice: its token count
    row_choice: np.ndarray  # per row: position of its choice in `choices`
    position: np.ndarray  # per row: 0-based within its choice
    tokens: np.ndarray  # object
    logprobs: np.ndarray  # float64, NaN where null
    probs: np.ndarray
    text_offset: pd.arrays.IntegerArray
    tops: list[Any]  # top_logprobs entries as sent

    @property
    def n_rows(self) -> int:
        return len(self.position)


def _token_rows(choices: list[_Choice]) -> _TokenRows:
    n_choices = len(choices)
    lengths = np.array([len(c.tokens) for c in choices], dtype=np.intp)
    n_rows = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    if n_choices == 1:  # the common case: no concatenated copies
        only = choices[0]
        tokens = _objects(only.tokens, n_rows)
        logprobs = _floats(only.logprobs, "logprobs.token_logprobs")
        tops = only.tops
    else:
        tokens = _objects(chain.from_iterable(c.tokens for c in choices), n_rows)
        logprobs = _floats(
            list(chain.from_iterable(c.logprobs for c in choices)), "logprobs.token_logprobs"
        )
        tops = list(chain.from_iterable(c.tops for c in choices))
    offsets = (
        _floats(
            list(
                chain.from_iterable(
                    c.offsets if c.offsets is not None else [None] * len(c.tokens) for c in choices
                )
            ),
            "logprobs.text_offset",
        )
        if n_rows
        else np.zeros(0)
    )
    offsets_missing = np.isnan(offsets)
    return _TokenRows(
        choice_index=np.array([c.index for c in choices], dtype=np.int64),
        lengths=lengths,
        row_choice=np.repeat(np.arange(n_choices), lengths),
        position=np.arange(n_rows) - np.repeat(starts, lengths),
        tokens=tokens,
        logprobs=logprobs,
        probs=np.exp(logprobs),
        text_offset=_int64(np.where(offsets_missing, 0, offsets), offsets_missing),
        tops=tops,
    )


@dataclass(frozen=True)
class _Alternatives:
    """The top-logprob entries, flattened and sorted by rank within each token row, and what they
    tell about each token row (rank, top mass, entropy bounds)."""

    row: np.ndarray  # per entry: its token row
    tokens: np.ndarray
    logprobs: np.ndarray
    probs: np.ndarray
    chosen: np.ndarray
    rank: np.ndarray
    token_rank: pd.arrays.IntegerArray  # per token row, like the four below
    top_mass: np.ndarray
    entropy_low: np.ndarray
    entropy_high: np.ndarray
    below_cap: np.ndarray | None  # per entry: the server's "below its cap" stand-in was given


def _mark_below_cap(logprobs: np.ndarray, below_cap: float | None) -> np.ndarray | None:
    """Where ``logprobs`` holds the ``below_cap`` stand-in (made NaN in place); None: not asked."""
    if below_cap is None:
        return None
    below: np.ndarray = logprobs == below_cap
    logprobs[below] = np.nan
    return below


def _cap(
    known_probs: np.ndarray,
    maybe_extra: np.ndarray,
    unknown: np.ndarray | None,
    alt_row: np.ndarray,
    counts: np.ndarray,
) -> np.ndarray:
    """Per token row, the most an unseen token's probability may be: the smallest listed one
    (leaving out ``maybe_extra`` entries), none (inf) where an entry is ``unknown``."""
    cap = _segment_min(np.where(maybe_extra, np.inf, known_probs), counts)
    if unknown is not None:
        # A listed entry without a logprob may hold any part of the rest: no cap is known there.
        cap[np.bincount(alt_row[unknown], minlength=len(counts)) > 0] = np.inf
    return cap


def _alternatives(
    rows: _TokenRows, requested: int | None, vocab_size: int, below_cap: float | None = None
) -> _Alternatives:
    """``requested`` is the request's ``logprobs`` (None: unknown); see `to_frames` for
    ``below_cap``."""
    n_rows = rows.n_rows
    token_logprobs, token_probs = rows.logprobs, rows.probs
    counts, alt_tokens, alt_logprobs = _flatten_alternatives(rows.tops)
    below = _mark_below_cap(alt_logprobs, below_cap)
    has_alts = counts > 0
    # alt_row[i] is the token row that alternative i belongs to.
    alt_row = np.repeat(np.arange(n_rows), counts)
    chosen = alt_tokens == rows.tokens[alt_row]
    alt_probs = np.exp(alt_logprobs)
    alt_known = ~np.isnan(alt_logprobs)
    all_known = bool(alt_known.all())  # the usual case; saves a masking pass per array
    known_probs = alt_probs if all_known else np.where(alt_known, alt_probs, 0.0)
    chosen_logprob = token_logprobs[alt_row]

    higher = ~chosen & (alt_logprobs > chosen_logprob)
    rank_missing = ~has_alts | np.isnan(token_logprobs)
    token_rank = _int64(1 + np.bincount(alt_row[higher], minlength=n_rows), rank_missing)

    chosen_listed = np.bincount(alt_row[chosen], minlength=n_rows) > 0
    chosen_extra = has_alts & ~chosen_listed & ~np.isnan(token_logprobs)
    mass = np.bincount(alt_row, weights=known_probs, minlength=n_rows) + np.where(
        chosen_extra, token_probs, 0.0
    )
    # p log p from the logprobs themselves; p = 0 (clamped or -inf) and null entries add nothing.
    alt_plogp = np.where(alt_probs > 0, alt_probs * alt_logprobs, 0.0)
    known_h = -(
        np.bincount(alt_row, weights=alt_plogp, minlength=n_rows)
        + np.where(chosen_extra, _xlogx(np.nan_to_num(token_probs)), 0.0)
    )
    n_known = (
        counts if all_known else np.bincount(alt_row[alt_known], minlength=n_rows)
    ) + chosen_extra
    # The chosen token's entry may be an extra one below the true top k: keep it out of the cap
    # unless the request says the list holds no more than k entries.
    maybe_extra = chosen if requested is None else chosen & (counts[alt_row] > requested)
    # An entry below the server's cap is an unseen token (below the cap), not an unknown one.
    unknown = None if all_known else ~alt_known if below is None else ~alt_known & ~below
    cap = _cap(
        known_probs if all_known else np.where(alt_known, alt_probs, np.inf),
        maybe_extra,
        unknown,
        alt_row,
        counts,
    )
    entropy_low, entropy_high = _entropy_bounds(known_h, mass, n_known, cap, vocab_size)

    # Sorted by rank within each position; a stable sort keeps the server's order on ties.
    permutation = _rank_order(
        -alt_logprobs if all_known else np.where(alt_known, -alt_logprobs, np.inf), counts
    )
    if permutation is not None:
        alt_tokens = alt_tokens[permutation]
        alt_logprobs = alt_logprobs[permutation]
        alt_probs = alt_probs[permutation]
        chosen = chosen[permutation]
        below = None if below is None else below[permutation]
    alt_starts = np.cumsum(counts) - counts
    return _Alternatives(
        row=alt_row,
        tokens=alt_tokens,
        logprobs=alt_logprobs,
        probs=alt_probs,
        chosen=chosen,
        rank=(np.arange(len(alt_row)) - alt_starts[alt_row] + 1).astype(np.int64),
        token_rank=token_rank,
        top_mass=np.where(has_alts, mass, np.nan),
        entropy_low=np.where(has_alts, entropy_low, np.nan),
        entropy_high=np.where(has_alts, entropy_high, np.nan),
        below_cap=below,
    )


def _echo_rows(rows: _TokenRows, prompt_lens: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """(echo per token row, prompt token count per choice: 0 where the split is unknown)."""
    prompt_n = np.array([p or 0 for p in prompt_lens], dtype=np.intp)
    return rows.position < np.repeat(prompt_n, rows.lengths), prompt_n


def _choices_frame(
    choices: list[_Choice],
    rows: _TokenRows,
    echo: np.ndarray,
    prompt_lens: list[int | None],
    prompt_n: np.ndarray,
    prompt_index: pd.arrays.IntegerArray,
    choice_k: pd.arrays.IntegerArray,
    vocab_size: int,
) -> pd.DataFrame:
    n_choices = len(choices)
    row_choice, token_logprobs = rows.row_choice, rows.logprobs
    resolved = np.array([p is not None for p in prompt_lens], dtype=bool)
    logprob_known = ~np.isnan(token_logprobs)

    def stats(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = np.bincount(row_choice[mask], minlength=n_choices)
        total = np.bincount(row_choice[mask], weights=token_logprobs[mask], minlength=n_choices)
        total = np.where(count > 0, total, np.nan)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            mean = total / count
            # A mean below -709 (vLLM's -9999 for a -inf logprob) is an infinite perplexity.
            return total, mean, np.exp(-mean)

    generated = ~echo & np.repeat(resolved, rows.lengths)
    sum_lp, mean_lp, ppl = stats(generated & logprob_known)
    p_sum_lp, p_mean_lp, p_ppl = stats(echo & logprob_known)
    with_logprobs = np.array([c.has_logprobs for c in choices], dtype=bool)
    unknown = ~with_logprobs | ~resolved
    for column in (sum_lp, mean_lp, ppl, p_sum_lp, p_mean_lp, p_ppl):
        column[unknown] = np.nan
    return _frame(
        {
            "index": rows.choice_index,
            "prompt_index": prompt_index,
            "choice": choice_k,
            "text": _objects((c.text for c in choices), n_choices),
            "finish_reason": _objects((c.finish_reason for c in choices), n_choices),
            "n_tokens": _int64(np.bincount(row_choice[generated], minlength=n_choices), unknown),
            "sum_logprob": sum_lp,
            "mean_logprob": mean_lp,
            "perplexity": ppl,
            "prompt_n_tokens": _int64(prompt_n, unknown),
            "prompt_sum_logprob": p_sum_lp,
            "prompt_mean_logprob": p_mean_lp,
            "prompt_perplexity": p_ppl,
        },
        n_choices,
        vocab_size,
    )


def _tokens_frame(
    rows: _TokenRows,
    alternatives: _Alternatives,
    echo: np.ndarray,
    prompt_index: pd.arrays.IntegerArray,
    choice_k: pd.arrays.IntegerArray,
    vocab_size: int,
    below_cap: np.ndarray | None,
) -> pd.DataFrame:
    row_choice = rows.row_choice
    flags = {} if below_cap is None else {"below_cap": below_cap}
    return _frame(
        {
            "index": rows.choice_index[row_choice],
            "prompt_index": prompt_index[row_choice],
            "choice": choice_k[row_choice],
            "position": rows.position.astype(np.int64),
            "token": rows.tokens,
            "token_display": visible_tokens(rows.tokens),
            "logprob": rows.logprobs,
            "prob": rows.probs,
            "text_offset": rows.text_offset,
            "echo": echo,
            "rank": alternatives.token_rank,
            "top_mass": alternatives.top_mass,
            "entropy_low": alternatives.entropy_low,
            "entropy_high": alternatives.entropy_high,
            **flags,
        },
        rows.n_rows,
        vocab_size,
    )


def _alternatives_frame(
    rows: _TokenRows, alternatives: _Alternatives, vocab_size: int
) -> pd.DataFrame:
    alt_row = alternatives.row
    below = alternatives.below_cap
    flags = {} if below is None else {"below_cap": below}
    return _frame(
        {
            "index": rows.choice_index[rows.row_choice[alt_row]],
            "position": rows.position[alt_row].astype(np.int64),
            "rank": alternatives.rank,
            "token": alternatives.tokens,
            "token_display": visible_tokens(alternatives.tokens),
            "logprob": alternatives.logprobs,
            "prob": alternatives.probs,
            "chosen": alternatives.chosen,
            **flags,
        },
        len(alt_row),
        vocab_size,
    )


# -------------------------------------------------------------------------------------------------
# The frames


def to_frames(
    response: Any,
    request: CompletionRequest | Mapping[str, Any] | None = None,
    *,
    vocab_size: int | None = None,
    below_cap: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Convert a Completions response into ``(choices, tokens, alternatives)`` DataFrames.

    ``response`` is the JSON body (a dict), a merged streamed response, or an ``openai`` SDK object.
    ``request`` (a `CompletionRequest` or a request body) tells ``n`` (for ``prompt_index`` and
    ``choice``) and whether, and how many, prompt tokens were echoed. ``vocab_size`` (default
    50257) enters the entropy bounds. See the module docstring for every column.

    ``below_cap`` is a logprob a server writes for a token it did not rank, not a probability
    (OpenAI's chat writes -9999.0 for a token outside its top 20): where given, such logprobs are
    NaN, a bool ``below_cap`` column in tokens and alternatives flags them, and the entropy
    bounds count those alternatives among the unseen tokens, each at most the smallest listed
    probability (a null logprob instead lifts that cap).
    """
    if vocab_size is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    if not is_int(vocab_size) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an integer >= 1; got {vocab_size!r}")
    vocab_size = int(vocab_size)
    with paused_gc():  # a large answer's containers hold no cycles (see _gc_pause)
        info = _request_info(request)
        body = _as_mapping(response)
        choices = _collect_choices(body)
        prompt_lens = _prompt_lengths(choices, info, body)
        rows = _token_rows(choices)
        token_below = _mark_below_cap(rows.logprobs, below_cap)
        if token_below is not None:
            rows.probs[token_below] = np.nan
        echo, prompt_n = _echo_rows(rows, prompt_lens)
        alternatives = _alternatives(rows, info.logprobs, vocab_size, below_cap)
        if info.n is None:
            prompt_index = _int64(np.zeros(len(choices)), np.ones(len(choices), dtype=bool))
            choice_k = prompt_index
        else:
            prompt_index = _int64(rows.choice_index // info.n)
            choice_k = _int64(rows.choice_index % info.n)
        tokens = _tokens_frame(
            rows, alternatives, echo, prompt_index, choice_k, vocab_size, token_below
        )
        if info.logprobs is not None:
            # The k asked for: a rank past it reads ">k" in the plots, as in the popup.
            tokens.attrs["logprobs"] = int(info.logprobs)
        return (
            _choices_frame(
                choices, rows, echo, prompt_lens, prompt_n, prompt_index, choice_k, vocab_size
            ),
            tokens,
            _alternatives_frame(rows, alternatives, vocab_size),
        )
