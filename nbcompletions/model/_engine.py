"""The generation engine: a validated `CompletionRequest` in, an OpenAI ``text_completion`` out.

How a request runs: every prompt is prefilled once (batch of one), its key/value cache is
broadcast to the rows that continue it (n, or best_of candidates), and then all rows of all prompts
decode together, one batched forward pass per token. Rows that finish leave the batch. One code path
serves `complete` and `stream`, so the same seed gives the same text either way.

Choices made where the API leaves room (documented here because clients will look):

- **logprobs** are the raw model's: the log-softmax of the logits *before* logit_bias, penalties,
  temperature and top_p, as OpenAI reports them. ``top_logprobs`` holds the ``logprobs`` most likely
  tokens plus the sampled one (so up to logprobs + 1 entries). A -inf logprob is written as -9999.0.
- **best_of** ranks candidates by mean logprob per sampled token (an end-of-text token counts as a
  sampled token), keeps the best ``n`` per prompt (ties keep generation order) and re-indexes them.
- **usage.completion_tokens** counts every token sampled, including best_of candidates that were not
  returned and a final end-of-text token; **prompt_tokens** counts each prompt once.
- The end-of-text token ends a completion with finish_reason ``stop``. It is not part of the text,
  but the logprobs list it (token ``<|endoftext|>``, its logprob, at the offset where the text
  ends), as OpenAI and vLLM do: lm-evaluation-harness drops the last echoed entry as "the token
  generated". An empty string prompt starts from ``<|endoftext|>`` (1 prompt token, echoed as "").
- vLLM's sampling fields ``top_k``, ``min_p`` and ``repetition_penalty`` are read from the
  request's ``extra`` (the server accepts them under ``compat="vllm"``); see `_sampling`.
- A stop string cuts the text where it starts; the logprobs keep the tokens that began before the
  cut.
  While streaming, text that could still become a stop string is held back until it is resolved.
- ``text_offset`` counts characters of prompt + completion; generated offsets start at len(prompt)
  even without echo (OpenAI's convention). A token that is part of a multi-byte character gets the
  offset at which its character will appear.
- ``suffix`` (insertion) is not supported: a non-empty suffix raises `RequestError` (param
  "suffix").
- seed: ``numpy.random.Generator(PCG64(seed))``; no seed, fresh OS entropy.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import check_optional_count
from .._errors import RequestError
from .._request import DEFAULT_MAX_TOKENS, SAMPLERS, CompletionRequest, check_sampler
from . import _kernels, _sampling
from ._gpt2 import GPT2Weights, KVCache, forward, load_weights, log_softmax, read_tensors
from ._rows import _finite, _Parts, _Plan, _Prompt, _Row
from ._tokenizer import ByteTokenizer

__all__ = ["DecodeBatch", "Engine", "Job"]

EOT = "<|endoftext|>"
#: Rows sampled per numpy pass (bounds the float64 copies of the vocabulary a step makes).
_SAMPLE_ROWS = 64


class _OneBlasThread:
    """While any request computes, BLAS runs one thread (process-wide; restored when all are done).

    The matrices are small (a decode step multiplies a few rows by 256-wide weights), so BLAS
    threads only add synchronisation; on a loaded machine (a notebook, a server's thread pool, a
    training run next door) oversubscribed OpenBLAS threads made batched decoding 10x slower in
    benchmarks/bench_model.py. Without threadpoolctl installed this does nothing.

    Every decode step enters and leaves, so the switch talks to the BLAS libraries directly
    (a few microseconds) instead of through ``ThreadpoolController.limit``, which re-reads every
    library's state and cost about 0.1 ms a step, 5% of a one-row step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._libraries: list[Any] | None = None  # threadpoolctl LibControllers for BLAS
        self._saved: list[int] = []

    def _find(self) -> list[Any]:
        try:
            from threadpoolctl import ThreadpoolController

            return list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # optional: no threadpoolctl, or an unreadable BLAS setup
            return []

    def __enter__(self) -> None:
        with self._lock:
            if self._libraries is None:
                self._libraries = self._find()
            if self._depth == 0:
                self._saved = [lib.get_num_threads() for lib in self._libraries]
                for lib, threads in zip(self._libraries, self._saved, strict=True):
                    if threads != 1:
                        lib.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._libraries:
                for lib, threads in zip(self._libraries, self._saved, strict=True):
                    if threads != 1:
                        lib.set_num_threads(threads)


_one_blas_thread = _OneBlasThread()


#: A compiled step gives each thread at least this many rows: the matmul converts each block of
#: weights once for up to four rows, so fewer rows per thread cost more CPU for little wall time.
_ROWS_PER_THREAD = 4


def _default_threads() -> int:
    named = os.environ.get("NBC_THREADS", "").strip()
    if named:
        if not named.isascii() or not named.isdigit() or int(named) < 1:
            raise ValueError(f"NBC_THREADS must be an integer >= 1 (or unset); got {named!r}")
        return int(named)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _no_cache(engine: Engine) -> np.ndarray:
    config = engine.weights.config
    return np.zeros(
        (config.n_layer, 0, config.n_head, 0, config.n_embd // config.n_head), np.float32
    )


class Engine:
    """Serves Completions requests from a GPT-2 in numpy. One engine is shared by all threads.

    Nothing mutable is shared between requests: the weights are read-only arrays and every request
    has its own cache, rows and random generator, so concurrent calls from a thread pool are safe.
    """

    def __init__(
        self,
        weights: GPT2Weights,
        tokenizer: ByteTokenizer,
        *,
        model_id: str,
        fingerprint: str,
        packed: _kernels.Packed | None = None,
        threads: int | None = None,
    ) -> None:
        self.weights = weights
        #: The compiled decode step's weights, or None: every step then runs the numpy forward.
        self.packed = packed
        #: Threads a compiled decode step may split its rows over (default: the CPUs this
        #: process may use, or ``NBC_THREADS``).
        threads = check_optional_count("threads", threads)
        self.threads = threads if threads is not None else _default_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._tok = tokenizer
        self.model_id = model_id
        self.system_fingerprint = fingerprint
        config = weights.config
        self.vocab_size = config.vocab_size
        self.context_length = config.n_positions
        eot = tokenizer.token_id(EOT)
        if eot is None:
            eot = config.eos_token_id
        if eot is None:
            raise ValueError(f"the tokenizer has no {EOT} token and config.json no eos_token_id")
        self.eot_token_id = int(eot)
        # Model rows the tokenizer cannot spell (a padded vocabulary) must never be sampled.
        table = list(tokenizer.token_bytes[: self.vocab_size])
        table += [b""] * (self.vocab_size - len(table))
        self._token_bytes: tuple[bytes, ...] = tuple(table)
        strings = list(tokenizer.token_strings[: self.vocab_size])
        self._token_strings = tuple(strings + [""] * (self.vocab_size - len(strings)))
        #: Key/value cache bytes per position per row: layers x (k, v) x n_embd x float32.
        self.kv_bytes_per_position = config.n_layer * 2 * config.n_embd * 4
        #: Bytes a decoding row holds besides its cache: its next-token logits and the forward
        #: pass's output (float32, V each).
        self.row_bytes = 2 * 4 * config.vocab_size
        spellable = min(len(tokenizer), self.vocab_size)
        self._unspellable = np.arange(spellable, self.vocab_size)

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        model_id: str | None = None,
        compiled: bool = True,
        threads: int | None = None,
    ) -> Engine:
        """Load the model in ``path``. ``compiled=False`` keeps every decode step in numpy (the
        reference the compiled step is tested against)."""
        check_optional_count("threads", threads)  # before seconds of loading, not after
        path = Path(path)
        tensors = read_tensors(path)
        weights = load_weights(path, tensors)
        packed = _kernels.pack(tensors, weights.config) if compiled else None
        if packed is not None:
            _kernels.warm(packed)
        tokenizer = ByteTokenizer.from_file(path / "tokenizer.json")
        digest = hashlib.sha256()
        with open(path / "model.safetensors", "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if model_id is None:
            model_id = _model_id_from(path)
        return cls(
            weights,
            tokenizer,
            model_id=model_id,
            fingerprint="nbc-" + digest.hexdigest()[:10],
            packed=packed,
            threads=threads,
        )

    def _map(self, calls: list[tuple[int, int]], run: Callable[[int, int], None]) -> None:
        """``run(lo, hi)`` for each row range, on this engine's threads and the caller's."""
        if len(calls) == 1:
            run(*calls[0])
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.threads - 1, thread_name_prefix="nbc-decode"
                )
            pool = self._pool
        futures = [pool.submit(run, lo, hi) for lo, hi in calls[1:]]
        run(*calls[0])
        for future in futures:
            future.result()

    def __repr__(self) -> str:
        c = self.weights.config
        return (
            f"Engine(model_id={self.model_id!r}, n_layer={c.n_layer}, n_embd={c.n_embd}, "
            f"vocab_size={self.vocab_size}, context_length={self.context_length})"
        )

    # -- tokens ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer`."""
        return self._tok.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self._token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """OpenAI's string for a token: its text, or ``bytes:\\xe2\\x80`` for partial UTF-8."""
        if not 0 <= token_id < self.vocab_size:
            raise RequestError(
                "token_id",
                f"token_id must be from 0 to {self.vocab_size - 1}; got {token_id}",
                allowed=f"0..{self.vocab_size - 1}",
                value=token_id,
            )
        return self._token_strings[token_id]

    # -- requests ----------------------------------------------------------------------------------
    def complete(self, request: CompletionRequest) -> dict[str, Any]:
        """The full ``text_completion`` response for ``request`` (stream is ignored)."""
        job = self.job(request, stream=False)
        DecodeBatch(self).run([job])
        return job.response()

    def stream(self, request: CompletionRequest) -> Iterator[dict[str, Any]]:
        """Chunks of a streamed response; bad requests raise here, before the first chunk."""
        return self._stream(self.job(request, stream=True))

    def job(self, request: CompletionRequest, *, stream: bool) -> Job:
        """A validated, planned request that a `DecodeBatch` can run (raises `RequestError`).

        With ``stream`` the job queues its chunks as they are generated (`Job.take`); without it,
        `Job.response` builds the whole response once the job is done.
        """
        return Job(self, self._plan(request), stream=stream)

    @staticmethod
    def _stream(job: Job) -> Iterator[dict[str, Any]]:
        batch = DecodeBatch(job.engine)
        batch.admit([job])
        yield from job.take()
        while batch.jobs:
            batch.step()
            yield from job.take()

    # -- internals ---------------------------------------------------------------------------------
    def _envelope(self) -> dict[str, Any]:
        return {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": self.system_fingerprint,
        }

    @staticmethod
    def _usage(plan: _Plan, rows: list[_Row]) -> dict[str, int]:
        prompt_tokens = sum(len(p.ids) for p in plan.prompts)
        completion_tokens = sum(row.n_sampled for row in rows)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _prompts(self, prompt: Any) -> list[_Prompt]:
        if isinstance(prompt, str):
            raw: list[Any] = [prompt]
        elif prompt and all(isinstance(item, int) for item in prompt):
            raw = [list(prompt)]
        else:
            raw = list(prompt)
        prompts = []
        for i, item in enumerate(raw):
            where = "prompt" if len(raw) == 1 else f"prompt[{i}]"
            if isinstance(item, str):
                try:
                    # JSON can carry a lone surrogate ("\ud800"); UTF-8, and so BPE, cannot.
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise RequestError(
                        "prompt",
                        f"{where} must be valid Unicode text; it holds a lone surrogate "
                        f"{item[exc.start]!r} at character {exc.start}",
                        allowed="text without lone surrogates (U+D800..U+DFFF)",
                        value=item[max(0, exc.start - 20) : exc.start + 20],
                    ) from None
                ids = self.encode(item)
                if not ids:
                    prompts.append(_Prompt([self.eot_token_id], "", []))
                else:
                    prompts.append(_Prompt(ids, item, ids))
                continue
            ids = [int(t) for t in item]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(
                    "prompt",
                    f"{where} holds token ids outside the vocabulary (0 to "
                    f"{self.vocab_size - 1}); got {bad[:5]}",
                    allowed=f"token ids 0..{self.vocab_size - 1}",
                    value=bad[:5],
                )
            prompts.append(_Prompt(ids, self.decode(ids), ids))
        return prompts

    def _plan(self, request: CompletionRequest) -> _Plan:
        if request.suffix:
            raise RequestError(
                "suffix",
                f"{self.model_id} cannot insert text: suffix is not "
                f"supported by this model; got {request.suffix!r}",
                allowed="unset (null)",
                value=request.suffix,
            )
        prompts = self._prompts(request.prompt)
        max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        for prompt in prompts:
            if len(prompt.ids) + max_tokens > self.context_length:
                raise RequestError(
                    "max_tokens",
                    f"This model's maximum context length is {self.context_length} "
                    f"tokens, however you requested {len(prompt.ids) + max_tokens} tokens "
                    f"({len(prompt.ids)} in your prompt; {max_tokens} for the completion). Please "
                    "reduce your prompt; or completion length.",
                    allowed=f"prompt tokens + max_tokens <= {self.context_length}",
                    value=max_tokens,
                )
        logit_bias: dict[int, float] = {}
        for key, value in (request.logit_bias or {}).items():
            token = int(key)
            if token >= self.vocab_size:
                raise RequestError(
                    "logit_bias",
                    f"logit_bias keys must be token ids from 0 to "
                    f"{self.vocab_size - 1}; got {key!r}",
                    allowed=f"token ids 0..{self.vocab_size - 1}",
                    value=dict(request.logit_bias or {}),
                )
            logit_bias[token] = float(value)
        for unspellable in self._unspellable.tolist():
            logit_bias[unspellable] = _sampling.BAN
        bias = _sampling.bias_vector(logit_bias, self.vocab_size)
        if max_tokens > 0 and bias is not None and not np.isfinite(bias).any():
            # Nothing left to sample: the sampler would emit a banned token (or NaN) instead.
            banned = sum(1 for v in (request.logit_bias or {}).values() if v <= _sampling.BAN)
            rest = self.vocab_size - banned
            why = f"{banned} by the request" + (f", {rest} the model cannot spell" if rest else "")
            raise RequestError(
                "logit_bias",
                f"logit_bias bans every token of the vocabulary ({why}); at least one of the "
                f"{self.vocab_size} tokens must stay possible",
                allowed=f"a bias above {_sampling.BAN:g} for at least one token",
                value=f"{banned} tokens at {_sampling.BAN:g} or below",
            )
        samplers = {name: request.extra[name] for name in SAMPLERS if name in request.extra}
        for name, value in samplers.items():
            check_sampler(name, value)
        n = request.effective_n
        stop = request.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return _Plan(
            prompts=prompts,
            n=n,
            best_of=n if request.best_of is None else request.best_of,
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else float(request.temperature),
            top_p=1.0 if request.top_p is None else float(request.top_p),
            frequency_penalty=float(request.frequency_penalty or 0.0),
            presence_penalty=float(request.presence_penalty or 0.0),
            bias=bias,
            stops=stops,
            logprobs=request.logprobs,
            echo=bool(request.echo),
            seed=request.seed,
            include_usage=bool((request.stream_options or {}).get("include_usage")),
            top_k=max(0, int(samplers.get("top_k", 0))),
            min_p=float(samplers.get("min_p", 0.0)),
            repetition_penalty=float(samplers.get("repetition_penalty", 1.0)),
        )

    def _top(self, logp_row: np.ndarray, ids: np.ndarray, chosen: int) -> dict[str, float]:
        strings = self._token_strings
        top = {strings[int(t)]: _finite(float(logp_row[int(t)])) for t in ids}
        top.setdefault(strings[chosen], _finite(float(logp_row[chosen])))
        return top

    def _echo_parts(self, prompt: _Prompt, logp: np.ndarray | None, k: int) -> _Parts:
        """Logprob lists of the echoed prompt; ``logp`` is (P-1, V), row i predicting token i+1."""
        ids = prompt.echo_ids
        tokens = [self._token_strings[t] for t in ids]
        token_logprobs: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        if logp is not None and len(ids) > 1:
            top_ids = _sampling.top_k(logp, k)
            for i in range(1, len(ids)):
                token_logprobs.append(_finite(float(logp[i - 1, ids[i]])))
                tops.append(self._top(logp[i - 1], top_ids[i - 1], ids[i]))
        offsets = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chars = 0
        for t in ids:
            offsets.append(chars)
            chars += len(decoder.decode(self._token_bytes[t]))
        if len(ids) > 1 and logp is None:
            raise RuntimeError("the echoed prompt's logprobs were asked for before the prefill")
        return tokens, token_logprobs[: len(ids)], tops[: len(ids)], offsets

    def _generated_parts(self, row: _Row, first: int, end: int) -> _Parts:
        tokens = [self._token_strings[t] for t in row.tokens[first:end]]
        parts: tuple[list[str], list[float | None], list[dict[str, float] | None], list[int]] = (
            tokens,
            list(row.logprobs[first:end]),
            list(row.tops[first:end]),
            [row.base_offset + s for s in row.starts[first:end]],
        )
        if row.end_of_text is not None and row.finished and end == row.kept_tokens:
            # The last part of a row that ended on <|endoftext|>: list that token too.
            logprob, top = row.end_of_text
            parts[0].append(self._token_strings[self.eot_token_id])
            parts[1].append(logprob)
            parts[2].append(top)
            parts[3].append(row.base_offset + len(row.final_text))
        return parts

    @staticmethod
    def _logprobs_object(
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

    def _choice(
        self, plan: _Plan, prompt: _Prompt, echo: _Parts | None, row: _Row, index: int
    ) -> dict[str, Any]:
        text = row.final_text
        logprobs = None
        if plan.logprobs is not None:
            kept = row.kept_tokens
            parts = self._generated_parts(row, 0, kept)
            if plan.echo:
                if echo is None:
                    echo = self._echo_parts(prompt, None, plan.logprobs)
                parts = (
                    echo[0] + parts[0],
                    echo[1] + parts[1],
                    echo[2] + parts[2],
                    echo[3] + parts[3],
                )
            logprobs = self._logprobs_object(*parts)
        if plan.echo:
            text = prompt.text + text
        return {
            "text": text,
            "index": index,
            "logprobs": logprobs,
            "finish_reason": row.finish_reason,
        }


def _model_id_from(path: Path) -> str:
    """``nbc_model_id`` in config.json if present, else the folder's name."""
    try:
        with open(path / "config.json", encoding="utf-8") as fh:
            name = json.load(fh).get("nbc_model_id")
    except (OSError, ValueError):
        name = None
    return str(name) if name else path.resolve().name


class Job:
    """One request while it is generated: its rows, random generator and output.

    Made by `Engine.job`; run by a `DecodeBatch`, alone (`Engine.complete`, `Engine.stream`) or
    beside other requests' jobs (the server's scheduler). Everything random about a request lives
    here (its own ``Generator``, drawn for its own rows in row order), so what else shares the batch
    never changes which draws a request gets.
    """

    def __init__(self, engine: Engine, plan: _Plan, *, stream: bool) -> None:
        self.engine = engine
        self.plan = plan
        self.stream = stream
        #: Rows (candidate completions): prompts x best_of, made when a batch admits the job, so
        #: that a request waiting for memory holds no more than its plan.
        self.rows: list[_Row] = []
        self.n_rows = len(plan.prompts) * plan.best_of
        seed = plan.seed
        entropy = None if seed is None else seed % (1 << 128)  # PCG64 wants a non-negative seed
        self.rng = np.random.Generator(np.random.PCG64(entropy))
        #: The echoed prompt's logprob lists, per prompt, filled at prefill when echo + logprobs.
        self.echo: list[_Parts | None] = [None] * len(plan.prompts)
        self.active = np.zeros(0, np.int64)  # row ids still generating, in order
        self.slots = np.zeros(0, np.int64)  # the batch slot of each active row
        self.penalised = bool(plan.frequency_penalty or plan.presence_penalty)
        #: Sampled by the compiled sampler straight from the batch's float32 logits: no penalties,
        #: no cut (top_p, top_k, min_p), and nothing that reads the model's logprobs.
        self.plain = (
            _kernels.available()
            and not self.penalised
            and plan.repetition_penalty == 1.0
            and plan.temperature > 0.0
            and plan.top_p >= 1.0
            and not 0 < plan.top_k < engine.vocab_size
            and plan.min_p <= 0.0
            and plan.logprobs is None
            and plan.best_of <= plan.n
        )
        self.counts: np.ndarray | None = None  # (rows, V) tokens sampled so far, for penalties
        #: (rows, V) tokens in each row's prompt or sampled so far, for vLLM's repetition_penalty
        self.seen: np.ndarray | None = None
        self.steps = 0  # decode steps that sampled a token for this job
        self.done = False
        self._outbox: list[dict[str, Any]] = []
        self._envelope = engine._envelope()
        if stream and plan.include_usage:
            self._envelope["usage"] = None

    def _start(self) -> None:
        plan = self.plan
        self.rows = [
            _Row(p, len(prompt.text), plan)
            for p, prompt in enumerate(plan.prompts)
            for _ in range(plan.best_of)
        ]
        if self.penalised:
            self.counts = np.zeros((self.n_rows, self.engine.vocab_size), np.float64)
        if plan.repetition_penalty != 1.0:
            self.seen = np.zeros((self.n_rows, self.engine.vocab_size), bool)
            for index, row in enumerate(self.rows):
                self.seen[index, plan.prompts[row.prompt_index].ids] = True

    def __repr__(self) -> str:
        return (
            f"<Job {self._envelope['id']}: {self.n_rows} rows, {self.steps} steps, "
            f"done={self.done}>"
        )

    # -- what the request costs --------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Positions the longest row needs: its prompt plus max_tokens."""
        return max(len(p.ids) for p in self.plan.prompts) + self.plan.max_tokens

    @property
    def work_tokens(self) -> int:
        """prompts x best_of x (prompt + max_tokens), summed per prompt: the positions computed."""
        plan = self.plan
        return sum(plan.best_of * (len(p.ids) + plan.max_tokens) for p in plan.prompts)

    @property
    def memory_bytes(self) -> int:
        """What running this job holds: the key/value cache of every position of every row, plus
        each row's next-token logits (and its token counts when penalties are on)."""
        engine = self.engine
        # logits, plus float64 counts for penalties and a bool mask for repetition_penalty
        per_row = engine.row_bytes * (2 if self.penalised else 1)
        if self.plan.repetition_penalty != 1.0:
            per_row += engine.vocab_size
        return self.work_tokens * engine.kv_bytes_per_position + self.n_rows * per_row

    # -- output ------------------------------------------------------------------------------------
    def take(self) -> list[dict[str, Any]]:
        """Streaming: the chunks generated since the last call (the usage chunk comes last)."""
        out, self._outbox = self._outbox, []
        return out

    def response(self) -> dict[str, Any]:
        """The whole ``text_completion`` response of a finished job."""
        if not self.done:
            raise RuntimeError("the job has not finished")
        engine, plan = self.engine, self.plan
        choices = []
        for p, prompt in enumerate(plan.prompts):
            candidates = [row for row in self.rows if row.prompt_index == p]
            if plan.best_of > plan.n:
                candidates = sorted(candidates, key=lambda r: -r.mean_logprob)[: plan.n]
            for k, row in enumerate(candidates):
                choices.append(engine._choice(plan, prompt, self.echo[p], row, p * plan.n + k))
        response = dict(self._envelope)
        response["choices"] = choices
        response["usage"] = engine._usage(plan, self.rows)
        return response

    def _chunk(
        self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None
    ) -> None:
        out = dict(self._envelope)
        out["choices"] = [
            {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        ]
        self._outbox.append(out)

    def _emit_echo(self) -> None:
        plan, engine = self.plan, self.engine
        if not (self.stream and plan.echo):
            return
        for i, row in enumerate(self.rows):
            prompt = plan.prompts[row.prompt_index]
            if prompt.text or prompt.echo_ids:
                lp = None
                if plan.logprobs is not None:
                    echo = self.echo[row.prompt_index]
                    if echo is None:
                        echo = engine._echo_parts(prompt, None, plan.logprobs)
                    lp = engine._logprobs_object(*echo)
                self._chunk(i, prompt.text, lp, None)

    def _emit_rows(self, changed: list[int]) -> None:
        if not self.stream:
            return
        engine, plan = self.engine, self.plan
        for i in changed:
            row = self.rows[i]
            delta, first, end = row.release()
            if not delta and first == end and not row.finished:
                continue
            lp = None
            if plan.logprobs is not None:
                lp = engine._logprobs_object(*engine._generated_parts(row, first, end))
            self._chunk(i, delta, lp, row.finish_reason)

    def _finish(self) -> None:
        self.done = True
        if self.stream and self.plan.include_usage:
            final = dict(self._envelope)
            final["choices"] = []
            final["usage"] = self.engine._usage(self.plan, self.rows)
            self._outbox.append(final)

    # -- one decode step ---------------------------------------------------------------------------
    def _sample(self, logits: np.ndarray) -> np.ndarray:
        """Sample the next token of every active row from the batch's (rows, V) ``logits``.

        Returns (A,) tokens and records them in the rows. Rows are sampled in chunks so that a job
        of thousands of rows never holds thousands of float64 copies of the vocabulary; the
        generator's draws come in the same order either way.
        """
        active = self.active
        if self.plain:
            chosen = self._sample_plain(logits)
            self.steps += 1
            self._emit_rows(active.tolist())
            return chosen
        chosen = np.empty(len(active), np.int64)
        for start in range(0, len(active), _SAMPLE_ROWS):
            part = slice(start, start + _SAMPLE_ROWS)
            chosen[part] = self._sample_rows(active[part], logits[self.slots[part]])
        if self.counts is not None:
            self.counts[active, chosen] += 1
        if self.seen is not None:
            self.seen[active, chosen] = True
        self.steps += 1
        self._emit_rows(active.tolist())
        return chosen

    def _sample_plain(self, logits: np.ndarray) -> np.ndarray:
        """`_sample_rows` for a `plain` job, reading the batch's logits in place: the same draws
        and arithmetic, so the same tokens."""
        plan, engine = self.plan, self.engine
        draws = np.asarray(self.rng.random(len(self.active)))
        chosen = _kernels.sample_slots(logits, self.slots, plan.bias, plan.temperature, draws)
        if chosen is None:  # a row with every token banned: numpy decides, with the same draws
            mu = _sampling.adjust_logits(logits[self.slots], plan.bias, None, 0.0, 0.0)
            chosen = _sampling.sample(mu, plan.temperature, 1.0, self.rng, draws=draws)
        eot, token_bytes, rows = engine.eot_token_id, engine._token_bytes, self.rows
        for r, token in zip(self.active.tolist(), chosen.tolist(), strict=True):
            rows[r].add(token, token_bytes[token], 0.0, None, eot)
        return chosen

    def _sample_rows(self, active: np.ndarray, next_logits: np.ndarray) -> np.ndarray:
        """(A,) row ids and their (A, V) next-token logits -> (A,) sampled tokens."""
        engine, plan = self.engine, self.plan
        counts = None if self.counts is None else self.counts[active]
        seen = None if self.seen is None else self.seen[active]
        mu = _sampling.adjust_logits(
            next_logits,
            plan.bias,
            counts,
            plan.frequency_penalty,
            plan.presence_penalty,
            seen=seen,
            repetition_penalty=plan.repetition_penalty,
        )
        chosen = _sampling.sample(
            mu, plan.temperature, plan.top_p, self.rng, top_k=plan.top_k, min_p=plan.min_p
        )  # (A,)
        k = plan.logprobs
        # Only logprobs and best_of's ranking read the model's log-probabilities.
        if k is not None or plan.best_of > plan.n:
            logp = log_softmax(next_logits)  # (A, V) raw model logprobs
            chosen_lp = logp[np.arange(len(active)), chosen].tolist()  # (A,)
        else:
            logp, chosen_lp = None, [0.0] * len(active)
        top_ids = _sampling.top_k(logp, k) if k is not None and logp is not None else None
        eot = engine.eot_token_id
        token_bytes = engine._token_bytes
        rows = self.rows
        for j, r in enumerate(active.tolist()):
            token = int(chosen[j])
            top = None
            if top_ids is not None and logp is not None:
                top = engine._top(logp[j], top_ids[j], token)
            rows[r].add(token, token_bytes[token], _finite(chosen_lp[j]), top, eot)
        return chosen


class DecodeBatch:
    """Continuous batching: the rows of many jobs decode together, one forward pass per token.

    Each step samples every active row's next token (each job with its own sampler and generator),
    drops rows that finished, and runs ONE batched forward pass over all remaining rows of all jobs,
    whatever their lengths (each row attends to its own positions; see `KVCache`). `admit` adds
    jobs between steps: their prompts are prefilled (identical prompts once, equal lengths in one
    pass) and copied into the rows that continue them.

    The key/value cache is one pool of slots, ``(slots, H, capacity, K)`` per layer; the active rows
    fill slots ``0..rows-1``. A finished row's slot is refilled by moving the last row into it, so a
    step never copies more than the rows that left. The pool grows by doubling and is released
    when the batch empties. Not thread-safe: one thread drives a batch.
    """

    #: A prefill forward pass covers at most this many prompt positions (bounds its logits).
    PREFILL_POSITIONS = 4096

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.jobs: list[Job] = []
        self.steps = 0  # decode steps run
        # The key/value pool, (L, slots, H, capacity, K) each: one array, so a compiled step
        # reaches every layer's cache through one argument.
        self._k = self._v = _no_cache(engine)
        self._lengths = np.zeros(0, np.int64)  # positions cached per slot
        self._tokens = np.zeros(0, np.int64)  # each slot's last sampled token (next input)
        self._logits = np.zeros((0, engine.vocab_size), np.float32)  # (rows, V) next-token logits
        self._rows = 0

    @property
    def rows(self) -> int:
        """Rows decoding now (all jobs)."""
        return self._rows

    def run(self, jobs: list[Job]) -> None:
        """Admit ``jobs`` and step until every job is done."""
        self.admit(jobs)
        while self.jobs:
            self.step()

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` and add their rows; a job with max_tokens 0 is done at once."""
        engine = self.engine
        for job in jobs:
            job._start()
        decoding = [job for job in jobs if job.plan.max_tokens > 0]
        first = self._rows
        total = first + sum(len(job.rows) for job in decoding)
        if decoding:
            self._reserve(total, max(job.capacity for job in decoding))
        # Where each (job, prompt) goes: its rows take consecutive slots, in row order.
        uses: dict[tuple[int, ...], list[tuple[Job, int, np.ndarray]]] = {}
        slot = first
        for job in jobs:
            plan = job.plan
            wants_echo = plan.echo and plan.logprobs is not None
            for p, prompt in enumerate(plan.prompts):
                if plan.max_tokens > 0:
                    slots = np.arange(slot, slot + plan.best_of)
                    slot += plan.best_of
                elif wants_echo:
                    slots = np.zeros(0, np.int64)
                else:
                    continue
                uses.setdefault(tuple(prompt.ids), []).append((job, p, slots))
        logits = np.empty((total - first, engine.vocab_size), np.float32)
        self._prefill(uses, logits, first)
        self._logits = np.concatenate([self._logits[: self._rows], logits])
        self._rows = total
        slot = first
        for job in jobs:
            job._emit_echo()
            if job.plan.max_tokens == 0:
                for row in job.rows:
                    row.finish_reason = "length"
                job._emit_rows(list(range(len(job.rows))))
                job._finish()
                continue
            n = len(job.rows)
            job.active = np.arange(n)
            job.slots = np.arange(slot, slot + n)
            slot += n
            self.jobs.append(job)

    def _prefill(
        self,
        uses: dict[tuple[int, ...], list[tuple[Job, int, np.ndarray]]],
        logits: np.ndarray,
        first: int,
    ) -> None:
        """Run each distinct prompt once and copy its cache and last logits into its rows' slots."""
        engine = self.engine
        weights = engine.weights
        groups: dict[tuple[int, bool], list[tuple[int, ...]]] = {}
        for ids, users in uses.items():
            want_lp = any(job.plan.echo and job.plan.logprobs is not None for job, _, _ in users)
            groups.setdefault((len(ids), want_lp), []).append(ids)
        for (length, want_lp), prompts in groups.items():
            per_pass = max(1, self.PREFILL_POSITIONS // length)
            for start in range(0, len(prompts), per_pass):
                part = prompts[start : start + per_pass]
                cache = KVCache.empty(weights.config, len(part), length)
                with _one_blas_thread:
                    out = forward(weights, np.array(part, np.int64), cache, last_only=not want_lp)
                for g, ids in enumerate(part):  # out: (G, P|1, V)
                    logp = log_softmax(out[g, :-1]) if want_lp else None  # (P-1, V)
                    for job, p, slots in uses[ids]:
                        plan = job.plan
                        if plan.echo and plan.logprobs is not None:
                            job.echo[p] = engine._echo_parts(plan.prompts[p], logp, plan.logprobs)
                        if len(slots):
                            for layer in range(len(cache.k)):
                                self._k[layer, slots, :, :length] = cache.k[layer][g, :, :length]
                                self._v[layer, slots, :, :length] = cache.v[layer][g, :, :length]
                            self._lengths[slots] = length
                            logits[slots - first] = out[g, -1]

    def _reserve(self, rows: int, capacity: int) -> None:
        """Make the pool hold ``rows`` slots of ``capacity`` positions, keeping the active rows."""
        have_rows = self._k.shape[1]
        have_capacity = self._k.shape[3]
        if rows <= have_rows and capacity <= have_capacity:
            return
        config = self.engine.weights.config
        new_rows = max(rows, 2 * have_rows if rows > have_rows else have_rows, 8)
        new_capacity = max(capacity, have_capacity)
        head = config.n_embd // config.n_head
        shape = (config.n_layer, new_rows, config.n_head, new_capacity, head)
        keep = self._rows
        # np.zeros maps fresh pages lazily: slots and positions never written cost no memory.
        ks = np.zeros(shape, np.float32)
        vs = np.zeros(shape, np.float32)
        ks[:, :keep, :, :have_capacity] = self._k[:, :keep]
        vs[:, :keep, :, :have_capacity] = self._v[:, :keep]
        self._k, self._v = ks, vs
        lengths = np.zeros(new_rows, np.int64)
        lengths[:keep] = self._lengths[:keep]
        tokens = np.zeros(new_rows, np.int64)
        tokens[:keep] = self._tokens[:keep]
        self._lengths, self._tokens = lengths, tokens

    # -- decoding ----------------------------------------------------------------------------------
    def step(self) -> None:
        """Sample every active row's next token, then one forward pass over the rows still going."""
        if not self.jobs:
            return
        logits = self._logits
        leaving: list[np.ndarray] = []
        for job in self.jobs:
            chosen = job._sample(logits)
            self._tokens[job.slots] = chosen
            alive = np.fromiter(
                (not job.rows[r].finished for r in job.active.tolist()), bool, len(job.active)
            )
            if not alive.all():
                leaving.append(job.slots[~alive])
                job.active = job.active[alive]
                job.slots = job.slots[alive]
        self.steps += 1
        finished = [job for job in self.jobs if not len(job.active)]
        for job in finished:
            job._finish()
        if finished:
            self.jobs = [job for job in self.jobs if len(job.active)]
        if leaving:
            self._release(np.concatenate(leaving))
        if self._rows:
            self._forward()

    def remove(self, job: Job) -> None:
        """Stop ``job`` now (its client left): its rows leave the batch before the next step."""
        if job not in self.jobs:
            return
        self.jobs.remove(job)
        slots = job.slots
        job.active = job.slots = np.zeros(0, np.int64)
        self._release(slots)

    def _forward(self) -> None:
        rows = self._rows
        engine = self.engine
        packed = engine.packed
        if packed is not None:
            self._forward_compiled(packed, rows)
            return
        cache = KVCache(
            [k[:rows] for k in self._k], [v[:rows] for v in self._v], self._lengths[:rows].copy()
        )
        with _one_blas_thread:
            self._logits = forward(self.engine.weights, self._tokens[:rows, None], cache)[:, 0]
        self._lengths[:rows] = cache.lengths

    def _forward_compiled(self, packed: _kernels.Packed, rows: int) -> None:
        """The compiled step, its rows split over up to ``engine.threads`` threads."""
        logits = np.empty((rows, self.engine.vocab_size), np.float32)
        tokens, lengths, k, v = self._tokens, self._lengths, self._k, self._v
        parts = max(1, min(self.engine.threads, rows // _ROWS_PER_THREAD))
        # Equal parts in whole blocks of four rows (the matmul's unit), the remainder last.
        per_part = math.ceil(rows / parts)
        size = math.ceil(per_part / _ROWS_PER_THREAD) * _ROWS_PER_THREAD
        bounds = [*range(0, rows, size), rows]

        def run(lo: int, hi: int) -> None:
            _kernels.decode(packed, tokens, k, v, lengths, logits, lo, hi)

        self.engine._map(list(itertools.pairwise(bounds)), run)
        self._lengths[:rows] += 1
        self._logits = logits

    def _release(self, slots: np.ndarray) -> None:
        """Free ``slots``: the rows after the new end move into the holes below it."""
        count = self._rows - len(slots)
        if count == 0:
            self._rows = 0
            self._k = self._v = _no_cache(self.engine)  # an idle batch holds no cache
            self._lengths = np.zeros(0, np.int64)
            self._tokens = np.zeros(0, np.int64)
            self._logits = self._logits[:0]
            return
        gone = np.zeros(self._rows, bool)
        gone[slots] = True
        holes = np.flatnonzero(gone[:count])
        movers = np.flatnonzero(~gone[count:]) + count
        if len(holes):
            span = int(self._lengths[movers].max())
            self._k[:, holes, :, :span] = self._k[:, movers, :, :span]
            self._v[:, holes, :, :span] = self._v[:, movers, :, :span]
            self._lengths[holes] = self._lengths[movers]
            self._tokens[holes] = self._tokens[movers]
            logits = self._logits[:count].copy()
            logits[holes] = self._logits[movers]
            self._logits = logits
            where = np.arange(self._rows)
            where[movers] = holes
            for job in self.jobs:
                job.slots = where[job.slots]
        else:
            self._logits = self._logits[:count]
        self._rows = count
