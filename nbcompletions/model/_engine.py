"""The generation engine: a validated `CompletionRequest` in, an OpenAI ``text_completion`` out.

How a request runs: every prompt is prefilled once (batch of one), its key/value cache is
broadcast to the rows that continue it (n, or best_of candidates), and then all rows of all prompts
decode together, one batched forward pass per token. Rows that finish leave the batch. One code path
serves `complete` and `stream`, so the same seed gives the same text either way.

The parts, one concept each: `_plan` resolves a request against the model (`Plan`), `_job` is a
request while it is sampled (`Job`), `_batch` decodes the rows of many jobs together
(`DecodeBatch`), `_response` writes what is sent back; this module loads the model and serves
requests with them.

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

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._checks import check_optional_count
from .._errors import RequestError
from .._request import CompletionRequest
from ._batch import DecodeBatch
from ._gpt2 import GPT2Weights, load_weights, read_tensors
from ._job import Job
from ._kernels import Packed, pack, warm
from ._kernels import available as compiled_available
from ._notice import announced_load
from ._plan import plan_request
from ._tokenizer import ByteTokenizer

# Job and DecodeBatch live in _job and _batch; they are exported here too, where the server's
# scheduler and the tests have always found them.
__all__ = ["DecodeBatch", "Engine", "Job"]


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
        packed: Packed | None = None,
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
        self.model_id = model_id
        self.system_fingerprint = fingerprint
        config = weights.config
        self.vocab_size = config.vocab_size
        self.context_length = config.n_positions
        #: The model's tokens (a padded vocabulary's unspellable rows are never sampled).
        self.vocab = tokenizer.vocabulary(config.vocab_size, config.eos_token_id)
        self.eot_token_id = self.vocab.eot_token_id
        #: Key/value cache bytes per position per row: layers x (k, v) x n_embd x float32.
        self.kv_bytes_per_position = config.n_layer * 2 * config.n_embd * 4
        #: Bytes a decoding row holds besides its cache: its next-token logits and the forward
        #: pass's output (float32, V each).
        self.row_bytes = 2 * 4 * config.vocab_size

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
        with announced_load(compiling=compiled and compiled_available()):
            tensors = read_tensors(path)
            weights = load_weights(path, tensors)
            packed = pack(tensors, weights.config) if compiled else None
            if packed is not None:
                warm(packed)
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

    def map_rows(self, calls: list[tuple[int, int]], run: Callable[[int, int], None]) -> None:
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
        return self.vocab.tokenizer.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids)

    def token_str(self, token_id: int) -> str:
        """OpenAI's string for a token: its text, or ``bytes:\\xe2\\x80`` for partial UTF-8."""
        if not 0 <= token_id < self.vocab_size:
            raise RequestError(
                "token_id",
                f"token_id must be from 0 to {self.vocab_size - 1}; got {token_id}",
                allowed=f"0..{self.vocab_size - 1}",
                value=token_id,
            )
        return self.vocab.token_strings[token_id]

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
        plan = plan_request(
            request, self.vocab, context_length=self.context_length, model_id=self.model_id
        )
        return Job(self, plan, stream=stream)

    @staticmethod
    def _stream(job: Job) -> Iterator[dict[str, Any]]:
        batch = DecodeBatch(job.engine)
        batch.admit([job])
        yield from job.take()
        while batch.jobs:
            batch.step()
            yield from job.take()


def _model_id_from(path: Path) -> str:
    """``nbc_model_id`` in config.json if present, else the folder's name."""
    try:
        with open(path / "config.json", encoding="utf-8") as fh:
            name = json.load(fh).get("nbc_model_id")
    except (OSError, ValueError):
        name = None
    return str(name) if name else path.resolve().name
