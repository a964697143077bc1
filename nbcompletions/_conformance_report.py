"""The conformance check's report: one `Check` per probe, gathered in a `ConformanceReport`.

The probes that fill it live in `nbcompletions._conformance` (sending) and
`nbcompletions._conformance_checks` (judging); what follows from it (``score()`` refusing, sweeps
refused before spending) in `nbcompletions._conformance_consequences`.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ._checks import positive_int
from ._profiles import PROFILES, ServerProfile

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["CHECKS", "STATUSES", "Check", "ConformanceReport", "Status"]

Status = Literal["ok", "fails", "unsupported", "error"]
STATUSES: tuple[str, ...] = ("ok", "fails", "unsupported", "error")

#: The checks, in report order.
CHECKS: tuple[str, ...] = (
    "echo_alignment",
    "max_tokens_0",
    "n",
    "best_of",
    "stream_echo",
    "include_usage",
    "logprobs_cap",
    "stop_in_logprobs",
    "multiple_prompts",
    "token_id_prompts",
    "seed",
    "default_sampling",
    "penalties",
    "text_offset",
    "byte_tokens",
    "suffix",
    "penalty_window",
    "sampler_order",
    "end_of_text",
    "echo_generated",
    "context_length",
    "stream_finish",
    "model_info",
)


@dataclasses.dataclass(frozen=True)
class Check:
    """One check's outcome: ``status`` and, in words, the ``detail`` that shows it."""

    name: str
    status: Status
    detail: str
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class ConformanceReport:
    """What an endpoint was measured to do. ``frame`` has one row per check; ``ok`` is True when no
    check fails or errored (``unsupported`` features are refused openly, which is fine)."""

    def __init__(
        self,
        checks: Sequence[Check],
        *,
        endpoint: str | None,
        model: str | None,
        requests: int,
        seconds: float,
        profile_name: str,
        context_length: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.checks: dict[str, Check] = {c.name: c for c in checks}
        self.endpoint = endpoint
        self.model = model
        self.requests = requests
        self.seconds = seconds
        self.profile_name = profile_name
        self.context_length = context_length
        self.vocab_size = vocab_size

    @property
    def ok(self) -> bool:
        return all(c.status in ("ok", "unsupported") for c in self.checks.values())

    @property
    def profile(self) -> ServerProfile:
        """The detected server profile, knowing the vocabulary size where the server said it."""
        base = PROFILES.get(self.profile_name, PROFILES["openai"])
        return base.with_vocab_size(self.vocab_size or base.vocab_size)

    def status(self, name: str) -> str | None:
        check = self.checks.get(name)
        return check.status if check is not None else None

    def evidence(self, name: str) -> Mapping[str, Any]:
        check = self.checks.get(name)
        return check.evidence if check is not None else {}

    def failed(self) -> list[Check]:
        return [c for c in self.checks.values() if c.status in ("fails", "error")]

    @property
    def frame(self) -> pd.DataFrame:
        """One row per check: ``check``, ``status``, ``detail``."""
        import pandas as pd

        frame: pd.DataFrame = pd.DataFrame(
            [(c.name, c.status, c.detail) for c in self.checks.values()],
            columns=["check", "status", "detail"],
        )
        return frame

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-able dict (what sweeps store); `from_dict` reads it back."""
        return {
            "endpoint": self.endpoint,
            "model": self.model,
            "ok": self.ok,
            "profile": self.profile_name,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "checks": {
                c.name: {"status": c.status, "detail": c.detail, "evidence": dict(c.evidence)}
                for c in self.checks.values()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConformanceReport | None:
        """The report `to_dict` wrote, or None for anything else (an older capabilities note)."""
        checks = data.get("checks")
        if not isinstance(checks, Mapping):
            return None
        rows = []
        for name, item in checks.items():
            if not isinstance(item, Mapping) or item.get("status") not in STATUSES:
                return None
            evidence = item.get("evidence")
            rows.append(
                Check(
                    str(name),
                    item["status"],
                    str(item.get("detail", "")),
                    dict(evidence) if isinstance(evidence, Mapping) else {},
                )
            )
        return cls(
            rows,
            endpoint=data.get("endpoint"),
            model=data.get("model"),
            requests=int(data.get("requests") or 0),
            seconds=float(data.get("seconds") or 0.0),
            profile_name=str(data.get("profile") or "openai"),
            context_length=positive_int(data.get("context_length")),
            vocab_size=positive_int(data.get("vocab_size")),
        )

    def __repr__(self) -> str:
        head = (
            f"ConformanceReport(endpoint={self.endpoint!r}, model={self.model!r}, ok={self.ok}, "
            f"profile={self.profile_name!r}, {self.requests} requests, {self.seconds:.2f} s)"
        )
        width = max((len(name) for name in self.checks), default=0)
        lines = [f"  {c.name:<{width}}  {c.status:<11}  {c.detail}" for c in self.checks.values()]
        return "\n".join([head, *lines])

    def _repr_html_(self) -> str:
        colours = {
            "ok": "#1a7f37",
            "fails": "#cf222e",
            "unsupported": "#9a6700",
            "error": "#cf222e",
        }
        rows = "".join(
            f"<tr><td><code>{html.escape(c.name)}</code></td>"
            f'<td style="color:{colours[c.status]};font-weight:bold">{c.status}</td>'
            f'<td style="text-align:left">{html.escape(c.detail)}</td></tr>'
            for c in self.checks.values()
        )
        summary = html.escape(
            f"{self.endpoint} · {self.model} · profile {self.profile_name} · "
            f"{'all ok' if self.ok else 'NOT ok'} · {self.requests} requests, {self.seconds:.2f} s"
        )
        return (
            f"<div><p><b>Conformance</b>: {summary}</p>"
            "<table><thead><tr><th>check</th><th>status</th><th>detail</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>"
        )
