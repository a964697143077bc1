"""A candidate completion while it is generated: its text, tokens and logprobs as they are
sampled (`Row`), where a stop string cuts it, and what streaming may send of it yet."""

from __future__ import annotations

import codecs

from ._plan import Plan

__all__ = ["Row"]


class Row:
    """One candidate completion's state while it is generated."""

    def __init__(self, prompt_index: int, base_offset: int, plan: Plan) -> None:
        self.prompt_index = prompt_index
        self.base_offset = base_offset  # len(prompt text): where generated text_offsets start
        self.max_tokens = plan.max_tokens
        self.stops = plan.stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # completion text decoded so far (not yet cut at a stop)
        self.tokens: list[int] = []  # sampled tokens that are part of the text (no end-of-text)
        self.logprobs: list[float] = []
        self.tops: list[dict[str, float] | None] = []
        self.starts: list[int] = []  # char offset of each token within the completion text
        self.ends: list[int] = []
        self.n_sampled = 0
        self.sum_logprob = 0.0
        self.finish_reason: str | None = None
        self.cut: int | None = None  # where a stop string begins
        self.emitted_chars = 0  # streaming: text already sent
        self.emitted_tokens = 0
        self.end_of_text: tuple[float, dict[str, float] | None] | None = None  # (logprob, top)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / self.n_sampled if self.n_sampled else 0.0

    def add(
        self, token: int, raw: bytes, logprob: float, top: dict[str, float] | None, eot: int
    ) -> None:
        self.n_sampled += 1
        self.sum_logprob += logprob
        if token == eot:
            self.end_of_text = (logprob, top)
            self._finish("stop")
            return
        start = len(self.text)
        self.text += self.decoder.decode(raw)
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top)
        self.starts.append(start)
        self.ends.append(len(self.text))
        if self.stops and len(self.text) > start:
            # (end, start) of each stop's first occurrence that this token completed: the one that
            # ends first wins, as if the text had arrived a character at a time (" ba" with stops
            # "b" and " ba" stops at " "), and of those ending together the one starting first.
            found = [
                (m + len(s), m)
                for m, s in ((self.text.find(s, max(0, start - len(s) + 1)), s) for s in self.stops)
                if m >= 0
            ]
            if found:
                self.cut = min(found)[1]
                self._finish("stop")
                return
        if self.n_sampled >= self.max_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.cut is None:
            tail = self.decoder.decode(b"", final=True)  # an unfinished character becomes U+FFFD
            if tail:
                self.text += tail
                if self.ends:
                    self.ends[-1] = len(self.text)

    # -- the finished result -----------------------------------------------------------------------
    @property
    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]

    @property
    def kept_tokens(self) -> int:
        if self.cut is None:
            return len(self.tokens)
        return sum(1 for start in self.starts if start < self.cut)

    # -- streaming ---------------------------------------------------------------------------------
    def _held_back(self) -> int:
        """How many trailing characters could be the start of a stop string."""
        text = self.text
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def release(self) -> tuple[str, int, int]:
        """Streaming: (text delta, first token, end token) safe to send now; advances the marks."""
        first = self.emitted_tokens
        if self.finished:
            end, chars = self.kept_tokens, len(self.final_text)
        else:
            safe = len(self.text) - (self._held_back() if self.stops else 0)
            end = first
            while end < len(self.tokens) and self.starts[end] < safe and self.ends[end] <= safe:
                end += 1
            chars = self.ends[end - 1] if end > first else self.emitted_chars
        delta = (
            self.final_text[self.emitted_chars : chars]
            if self.finished
            else self.text[self.emitted_chars : chars]
        )
        self.emitted_chars = max(self.emitted_chars, chars)
        self.emitted_tokens = end
        return delta, first, end
