"""Continuous batching (`DecodeBatch`): the rows of many jobs decode together, one forward pass
per token, with one key/value cache pool for them all."""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any

import numpy as np

from ._gpt2 import KVCache, forward, log_softmax
from ._job import Job, Model, combined_prefill_limit, prompts_per_pass
from ._kernels import Packed, decode
from ._response import echo_parts, prompt_logprobs

__all__ = ["DecodeBatch"]


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


def _no_cache(engine: Model) -> np.ndarray:
    config = engine.weights.config
    return np.zeros(
        (config.n_layer, 0, config.n_head, 0, config.n_embd // config.n_head), np.float32
    )


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

    def __init__(self, engine: Model) -> None:
        self.engine = engine
        self.jobs: list[Job] = []
        self.steps = 0  # decode steps run
        # The key/value pool, (L, slots, H, capacity, K) each: one array, so a compiled step
        # reaches every layer's cache through one argument.
        self._k = self._v = _no_cache(engine)
        self._lengths = np.zeros(0, np.int64)  # positions cached per slot
        #: Positions ever written per slot since the pool was made: their pages stay resident
        #: after the row leaves (a slot's next row reuses them), until the pool is replaced.
        self._written = np.zeros(0, np.int64)
        self._tokens = np.zeros(0, np.int64)  # each slot's last sampled token (next input)
        self._logits = np.zeros((0, engine.vocab_size), np.float32)  # (rows, V) next-token logits
        self._rows = 0

    @property
    def rows(self) -> int:
        """Rows decoding now (all jobs)."""
        return self._rows

    @property
    def resident_bytes(self) -> int:
        """What the batch holds now: every position ever written in the pool (rows that left
        included: their pages stay until the pool is replaced) and the rows' logits."""
        engine = self.engine
        return int(self._written.sum()) * engine.kv_bytes_per_position + (
            self._rows * engine.row_bytes
        )

    def growth_bytes(self, rows: int, capacity: int) -> int:
        """What making room for ``rows`` rows of ``capacity`` positions allocates besides
        `resident_bytes` while the pool is copied: the active rows' copy (0 when it fits)."""
        if rows <= self._k.shape[1] and capacity <= self._k.shape[3]:
            return 0
        return self._rows * self._span() * self.engine.kv_bytes_per_position

    def _span(self) -> int:
        return int(self._lengths[: self._rows].max()) if self._rows else 0

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
            job.start()
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
            wants_echo = plan.prompt_logp
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
        # A pass allocates no more than the scheduler counted on for the jobs admitted together.
        limits = [job.prefill_limit for job in jobs]
        limit = None
        if jobs and None not in limits:
            scratches = [job.scratch_bytes for job in jobs]
            limit = combined_prefill_limit(scratches, min(limit for limit in limits if limit))
        self._prefill(uses, logits, first, limit)
        self._logits = np.concatenate([self._logits[: self._rows], logits])
        self._rows = total
        slot = first
        for job in jobs:
            job.emit_echo()
            if job.plan.max_tokens == 0:
                for row in job.rows:
                    row.finish_reason = "length"
                job.emit_rows(list(range(len(job.rows))))
                job.finish()
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
        limit: int | None,
    ) -> None:
        """Run each distinct prompt once and copy its cache and last logits into its rows' slots;
        a pass allocates at most ``limit`` bytes besides the pool (one prompt at least)."""
        engine = self.engine
        weights = engine.weights
        groups: dict[tuple[int, bool], list[tuple[int, ...]]] = {}
        for ids, users in uses.items():
            want_lp = any(job.plan.prompt_logp for job, _, _ in users)
            groups.setdefault((len(ids), want_lp), []).append(ids)
        for (length, want_lp), prompts in groups.items():
            per_pass = prompts_per_pass(engine, length, logprobs=want_lp, limit=limit)
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
                            job.echo[p] = echo_parts(
                                engine.vocab, plan.prompts[p], logp, plan.logprobs
                            )
                        if plan.prompt_logprobs is not None:
                            job.prompt_lp[p] = prompt_logprobs(
                                engine.vocab, plan.prompts[p].ids, logp, plan.prompt_logprobs
                            )
                        if len(slots):
                            for layer in range(len(cache.k)):
                                self._k[layer, slots, :, :length] = cache.k[layer][g, :, :length]
                                self._v[layer, slots, :, :length] = cache.v[layer][g, :, :length]
                            self._lengths[slots] = length
                            self._written[slots] = np.maximum(self._written[slots], length)
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
        span = self._span()  # the positions the active rows hold: the rest is zeros anyway
        ks[:, :keep, :, :span] = self._k[:, :keep, :, :span]
        vs[:, :keep, :, :span] = self._v[:, :keep, :, :span]
        self._k, self._v = ks, vs
        lengths = np.zeros(new_rows, np.int64)
        lengths[:keep] = self._lengths[:keep]
        self._written = np.zeros(new_rows, np.int64)
        self._written[:keep] = span  # the copy above wrote these positions
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
            chosen = job.sample_next(logits)
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
            job.finish()
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
        np.maximum(self._written[:rows], cache.lengths, out=self._written[:rows])

    def _forward_compiled(self, packed: Packed, rows: int) -> None:
        """The compiled step, its rows split over up to ``engine.threads`` threads."""
        logits = np.empty((rows, self.engine.vocab_size), np.float32)
        tokens, lengths, k, v = self._tokens, self._lengths, self._k, self._v
        parts = max(1, min(self.engine.threads, rows // _ROWS_PER_THREAD))
        # Equal parts in whole blocks of four rows (the matmul's unit), the remainder last.
        per_part = math.ceil(rows / parts)
        size = math.ceil(per_part / _ROWS_PER_THREAD) * _ROWS_PER_THREAD
        bounds = [*range(0, rows, size), rows]

        def run(lo: int, hi: int) -> None:
            decode(packed, tokens, k, v, lengths, logits, lo, hi)

        self.engine.map_rows(list(itertools.pairwise(bounds)), run)
        self._lengths[:rows] += 1
        np.maximum(self._written[:rows], self._lengths[:rows], out=self._written[:rows])
        self._logits = logits

    def _release(self, slots: np.ndarray) -> None:
        """Free ``slots``: the rows after the new end move into the holes below it."""
        count = self._rows - len(slots)
        if count == 0:
            self._rows = 0
            self._k = self._v = _no_cache(self.engine)  # an idle batch holds no cache
            self._lengths = np.zeros(0, np.int64)
            self._written = np.zeros(0, np.int64)
            self._tokens = np.zeros(0, np.int64)
            self._logits = self._logits[:0]
            return
        gone = np.zeros(self._rows, bool)
        gone[slots] = True
        holes = np.flatnonzero(gone[:count])
        movers = np.flatnonzero(~gone[count:]) + count
        if len(holes):
            # One slot at a time: a fancy-indexed move of all movers at once copies them first,
            # a temporary as big as the rows moved (29 MiB when 44 rows of 92 left together).
            for hole, mover in zip(holes.tolist(), movers.tolist(), strict=True):
                span = int(self._lengths[mover])
                self._k[:, hole, :, :span] = self._k[:, mover, :, :span]
                self._v[:, hole, :, :span] = self._v[:, mover, :, :span]
            self._lengths[holes] = self._lengths[movers]
            self._written[holes] = np.maximum(self._written[holes], self._lengths[movers])
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
