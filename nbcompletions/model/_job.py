"""A request while it is generated (`Job`): its rows, its own random generator, its sampler and
its output, a response or a stream of chunks. A `DecodeBatch` runs jobs; what they need of the
model is `Model` (the `Engine` is one).

Everything random about a request lives here (its own ``Generator``, drawn for its own rows in
row order), so what else shares the batch never changes which draws a request gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ._gpt2 import GPT2Weights, log_softmax
from ._kernels import Packed, sample_slots
from ._kernels import available as compiled_available
from ._plan import Plan
from ._response import (
    Parts,
    PromptLogprobs,
    choice,
    echo_parts,
    envelope,
    finite_logprob,
    generated_parts,
    logprobs_object,
    top_logprobs,
    usage,
)
from ._rows import Row
from ._sampling import adjust_logits, sample, top_k
from ._tokenizer import Vocabulary

__all__ = [
    "PREFILL_POSITIONS",
    "Job",
    "Model",
    "combined_prefill_limit",
    "prefill_bytes",
    "prompts_per_pass",
]

#: Rows sampled per numpy pass (bounds the float64 copies of the vocabulary a step makes).
_SAMPLE_ROWS = 64
#: float64 copies of the vocabulary a sampled row holds at once in numpy (`adjust_logits`, `sample`,
#: the log-softmax for logprobs): 13 MiB measured for 64 rows with top_p and logprobs, 6.3 a row.
_SAMPLE_COPIES = 8
#: A prefill forward pass covers at most this many prompt positions (bounds its activations).
PREFILL_POSITIONS = 4096


class Model(Protocol):
    """What jobs and batches need of the model that runs them (`Engine` has it all)."""

    weights: GPT2Weights
    #: The compiled decode step's weights, or None: every step runs the numpy forward.
    packed: Packed | None
    threads: int
    vocab: Vocabulary
    vocab_size: int
    eot_token_id: int
    model_id: str
    system_fingerprint: str
    kv_bytes_per_position: int
    row_bytes: int

    def map_rows(self, calls: list[tuple[int, int]], run: Callable[[int, int], None]) -> None:
        """``run(lo, hi)`` for each row range, on the model's threads."""


def prefill_bytes(engine: Model, length: int, prompts: int, *, logprobs: bool) -> int:
    """Bytes a prefill pass of ``prompts`` prompts of ``length`` tokens allocates besides the
    key/value pool, from the forward pass's float32 shapes (D = n_embd, H = n_head, V = vocab):

    - per position, its own key/value cache (copied into the pool's slots after the pass);
    - per position, one layer's live activations: at most 24 x D (the MLP's 4D-wide GELU
      temporaries, the residual, the normalised input, q/k/v) and (H + 2) x length for the
      attention scores and the causal mask;
    - the last position's logits per prompt, or with prompt logprobs every position's (V each)
      and one prompt's log-softmax (3 x length x V).

    tests/test_scheduler.py checks it against tracemalloc's peak around real prefills.
    """
    config = engine.weights.config
    per_position = engine.kv_bytes_per_position + 4 * (
        24 * config.n_embd + (config.n_head + 2) * length
    )
    logits = 4 * engine.vocab_size * prompts
    if logprobs:
        per_position += 4 * engine.vocab_size
        logits = 3 * 4 * length * engine.vocab_size
    return prompts * length * per_position + logits


def prompts_per_pass(engine: Model, length: int, *, logprobs: bool, limit: int | None) -> int:
    """Prompts of ``length`` tokens one prefill pass takes: `PREFILL_POSITIONS` positions, and
    no more than ``limit`` bytes of `prefill_bytes` (None: no byte limit); at least one."""
    count = max(1, PREFILL_POSITIONS // length)
    if limit is not None:
        count = min(count, max(1, limit // prefill_bytes(engine, length, 1, logprobs=logprobs)))
    return count


def combined_prefill_limit(scratches: list[int], limit: int) -> int:
    """Bytes a prefill pass over jobs admitted together may allocate: what their prompts need
    together (the sum of their `Job.scratch_bytes`) up to ``limit``, and never less than the
    largest one alone."""
    return max(max(scratches, default=0), min(sum(scratches), limit))


class Job:
    """One request while it is generated: its rows, random generator and output.

    Made by `Engine.job`; run by a `DecodeBatch`, alone (`Engine.complete`, `Engine.stream`) or
    beside other requests' jobs (the server's scheduler). Everything random about a request lives
    here (its own ``Generator``, drawn for its own rows in row order), so what else shares the batch
    never changes which draws a request gets.
    """

    def __init__(self, engine: Model, plan: Plan, *, stream: bool) -> None:
        self.engine = engine
        self.plan = plan
        self.stream = stream
        #: Rows (candidate completions): prompts x best_of, made when a batch admits the job, so
        #: that a request waiting for memory holds no more than its plan.
        self.rows: list[Row] = []
        self.n_rows = len(plan.prompts) * plan.best_of
        seed = plan.seed
        entropy = None if seed is None else seed % (1 << 128)  # PCG64 wants a non-negative seed
        self.rng = np.random.Generator(np.random.PCG64(entropy))
        #: The echoed prompt's logprob lists, per prompt, filled at prefill when echo + logprobs.
        self.echo: list[Parts | None] = [None] * len(plan.prompts)
        #: vLLM's prompt_logprobs lists, per prompt, filled at prefill when asked for.
        self.prompt_lp: list[PromptLogprobs | None] = [None] * len(plan.prompts)
        self.active = np.zeros(0, np.int64)  # row ids still generating, in order
        self.slots = np.zeros(0, np.int64)  # the batch slot of each active row
        self.penalised = bool(plan.frequency_penalty or plan.presence_penalty)
        #: Sampled by the compiled sampler straight from the batch's float32 logits: no penalties,
        #: no cut (top_p, top_k, min_p), and nothing that reads the model's logprobs.
        self.plain = (
            compiled_available()
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
        #: Bytes one prefill pass of this job may allocate (`prefill_bytes`); None: only
        #: `PREFILL_POSITIONS` bounds a pass. The server's scheduler sets it from its budget.
        self.prefill_limit: int | None = None
        self.done = False
        self._outbox: list[dict[str, Any]] = []
        self._envelope = envelope(engine.model_id, engine.system_fingerprint)
        if stream and plan.include_usage:
            self._envelope["usage"] = None

    def start(self) -> None:
        """Make the rows: called when a batch admits the job."""
        plan = self.plan
        self.rows = [
            Row(p, len(prompt.text), plan)
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

    @property
    def scratch_bytes(self) -> int:
        """The most this job allocates at once besides `memory_bytes`, during one step: its largest
        prefill pass (`prefill_bytes`, passes of `prompts_per_pass`), or the float64 copies of
        the vocabulary its numpy sampler makes for up to 64 rows at a time."""
        engine, plan = self.engine, self.plan
        sampling = 0 if self.plain else min(self.n_rows, _SAMPLE_ROWS) * _SAMPLE_COPIES * 8
        largest = sampling * engine.vocab_size
        logprobs = plan.prompt_logp
        lengths: dict[int, int] = {}
        for ids in {tuple(prompt.ids) for prompt in plan.prompts}:
            lengths[len(ids)] = lengths.get(len(ids), 0) + 1
        for length, count in lengths.items():
            if length and (plan.max_tokens > 0 or logprobs):
                per_pass = prompts_per_pass(
                    engine, length, logprobs=logprobs, limit=self.prefill_limit
                )
                passed = prefill_bytes(engine, length, min(count, per_pass), logprobs=logprobs)
                largest = max(largest, passed)
        return largest

    # -- output ------------------------------------------------------------------------------------
    def take(self) -> list[dict[str, Any]]:
        """Streaming: the chunks generated since the last call (the usage chunk comes last)."""
        out, self._outbox = self._outbox, []
        return out

    def response(self) -> dict[str, Any]:
        """The whole ``text_completion`` response of a finished job."""
        if not self.done:
            raise RuntimeError("the job has not finished")
        vocab, plan = self.engine.vocab, self.plan
        choices = []
        for p, prompt in enumerate(plan.prompts):
            candidates = [row for row in self.rows if row.prompt_index == p]
            if plan.best_of > plan.n:
                candidates = sorted(candidates, key=lambda r: -r.mean_logprob)[: plan.n]
            for k, row in enumerate(candidates):
                choices.append(choice(vocab, plan, prompt, self.echo[p], row, p * plan.n + k))
                if plan.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = self.prompt_lp[p]
        response = dict(self._envelope)
        response["choices"] = choices
        response["usage"] = usage(plan, self.rows)
        return response

    def _chunk(
        self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None
    ) -> None:
        out = dict(self._envelope)
        out["choices"] = [
            {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        ]
        self._outbox.append(out)

    def emit_echo(self) -> None:
        """Streaming with echo: each row's first chunk, its prompt."""
        plan, vocab = self.plan, self.engine.vocab
        if not (self.stream and plan.echo):
            return
        for i, row in enumerate(self.rows):
            prompt = plan.prompts[row.prompt_index]
            if prompt.text or prompt.echo_ids:
                lp = None
                if plan.logprobs is not None:
                    echo = self.echo[row.prompt_index]
                    if echo is None:
                        echo = echo_parts(vocab, prompt, None, plan.logprobs)
                    lp = logprobs_object(*echo)
                self._chunk(i, prompt.text, lp, None)

    def emit_rows(self, changed: list[int]) -> None:
        """Streaming: a chunk for each of the rows ``changed`` that has something to send."""
        if not self.stream:
            return
        vocab, plan = self.engine.vocab, self.plan
        for i in changed:
            row = self.rows[i]
            delta, first, end = row.release()
            if not delta and first == end and not row.finished:
                continue
            lp = None
            if plan.logprobs is not None:
                lp = logprobs_object(*generated_parts(vocab, row, first, end))
            self._chunk(i, delta, lp, row.finish_reason)

    def finish(self) -> None:
        """Done: the usage chunk, when a stream asked for one, is queued last."""
        self.done = True
        if self.stream and self.plan.include_usage:
            final = dict(self._envelope)
            final["choices"] = []
            final["usage"] = usage(self.plan, self.rows)
            self._outbox.append(final)

    # -- one decode step ---------------------------------------------------------------------------
    def sample_next(self, logits: np.ndarray) -> np.ndarray:
        """Sample the next token of every active row from the batch's (rows, V) ``logits``.

        Returns (A,) tokens and records them in the rows. Rows are sampled in chunks so that a job
        of thousands of rows never holds thousands of float64 copies of the vocabulary; the
        generator's draws come in the same order either way.
        """
        active = self.active
        if self.plain:
            chosen = self._sample_plain(logits)
            self.steps += 1
            self.emit_rows(active.tolist())
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
        self.emit_rows(active.tolist())
        return chosen

    def _sample_plain(self, logits: np.ndarray) -> np.ndarray:
        """`_sample_rows` for a `plain` job, reading the batch's logits in place: the same draws
        and arithmetic, so the same tokens."""
        plan, engine = self.plan, self.engine
        draws = np.asarray(self.rng.random(len(self.active)))
        chosen = sample_slots(logits, self.slots, plan.bias, plan.temperature, draws)
        if chosen is None:  # a row with every token banned: numpy decides, with the same draws
            mu = adjust_logits(logits[self.slots], plan.bias, None, 0.0, 0.0)
            chosen = sample(mu, plan.temperature, 1.0, self.rng, draws=draws)
        eot, token_bytes, rows = engine.eot_token_id, engine.vocab.token_bytes, self.rows
        for r, token in zip(self.active.tolist(), chosen.tolist(), strict=True):
            rows[r].add(token, token_bytes[token], 0.0, None, eot)
        return chosen

    def _sample_rows(self, active: np.ndarray, next_logits: np.ndarray) -> np.ndarray:
        """(A,) row ids and their (A, V) next-token logits -> (A,) sampled tokens."""
        engine, plan = self.engine, self.plan
        counts = None if self.counts is None else self.counts[active]
        seen = None if self.seen is None else self.seen[active]
        mu = adjust_logits(
            next_logits,
            plan.bias,
            counts,
            plan.frequency_penalty,
            plan.presence_penalty,
            seen=seen,
            repetition_penalty=plan.repetition_penalty,
        )
        chosen = sample(
            mu, plan.temperature, plan.top_p, self.rng, top_k=plan.top_k, min_p=plan.min_p
        )  # (A,)
        k = plan.logprobs
        # Only logprobs and best_of's ranking read the model's log-probabilities.
        if k is not None or plan.best_of > plan.n:
            logp = log_softmax(next_logits)  # (A, V) raw model logprobs
            chosen_lp = logp[np.arange(len(active)), chosen].tolist()  # (A,)
        else:
            logp, chosen_lp = None, [0.0] * len(active)
        top_ids = top_k(logp, k) if k is not None and logp is not None else None
        eot = engine.eot_token_id
        token_bytes = engine.vocab.token_bytes
        rows = self.rows
        for j, r in enumerate(active.tolist()):
            token = int(chosen[j])
            top = None
            if top_ids is not None and logp is not None:
                top = top_logprobs(engine.vocab, logp[j], top_ids[j], token)
            rows[r].add(token, token_bytes[token], finite_logprob(chosen_lp[j]), top, eot)
        return chosen
