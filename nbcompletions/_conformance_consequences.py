"""What follows from a conformance report: ``score()`` refuses or adapts, sweeps are refused.

Pure functions of a `ConformanceReport`; the client, scoring and sweeps call them before they
spend anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._conformance_report import ConformanceReport
from ._errors import ConformanceError
from ._request import CompletionRequest

__all__ = ["check_sweep", "score_max_tokens"]


def score_max_tokens(report: ConformanceReport) -> int:
    """The ``max_tokens`` scoring may send, or `ConformanceError` where no right number can come.

    Misaligned or shifted echo logprobs are refused (never wrong numbers). Where ``max_tokens=0``
    is not honoured, 1 is used and the generated token dropped, as lm-evaluation-harness does.
    """
    echo = report.checks.get("echo_alignment")
    if (
        echo is not None
        and echo.status == "fails"
        and echo.evidence.get("kind") in ("shifted", "misaligned")
    ):
        raise ConformanceError(
            f"score() refuses this endpoint: check echo_alignment fails ({echo.detail}); its "
            "echoed prompt log-probabilities are not the prompt tokens' own, so every score "
            "would be wrong",
            check="echo_alignment",
            detail=echo.detail,
        )
    return 0 if report.status("max_tokens_0") == "ok" else 1


def check_sweep(
    report: ConformanceReport,
    requests: Sequence[CompletionRequest],
    *,
    corrects_sampling: bool = False,
) -> list[str]:
    """What in these requests the endpoint was measured to ignore or refuse (empty: nothing).

    A sweep calls it before sending anything, and refuses (or warns) with these problems.
    ``corrects_sampling``: each request will be sent with the detected profile's neutral
    sampling fields (a live sweep, `nbcompletions._governance`), so their absence is no problem.
    """
    problems: list[str] = []

    def uses(name: str, when: Callable[[CompletionRequest], bool]) -> None:
        check = report.checks.get(name)
        if check is None or check.status == "ok":
            return
        count = sum(1 for r in requests if when(r))
        if count:
            problems.append(
                f"{count} request(s) need {name!r}, which {check.status}: {check.detail}"
            )

    uses("n", lambda r: (r.n or 1) > 1)
    uses("best_of", lambda r: (r.best_of or 1) > 1)
    uses("stream_echo", lambda r: bool(r.stream and r.echo))
    uses(
        "include_usage", lambda r: bool(r.stream_options and r.stream_options.get("include_usage"))
    )
    uses("penalties", lambda r: bool(r.frequency_penalty or r.presence_penalty))
    uses(
        "multiple_prompts",
        lambda r: (
            isinstance(r.prompt, list) and bool(r.prompt) and isinstance(r.prompt[0], str | list)
        ),
    )
    uses(
        "token_id_prompts",
        lambda r: (
            isinstance(r.prompt, list) and bool(r.prompt) and not isinstance(r.prompt[0], str)
        ),
    )
    uses("seed", lambda r: r.seed is not None)
    uses("suffix", lambda r: r.suffix is not None)
    uses("max_tokens_0", lambda r: r.max_tokens == 0)
    defaults = report.checks.get("default_sampling")
    neutral = report.profile.neutral_fields
    if defaults is not None and defaults.status == "fails" and not corrects_sampling:
        count = sum(
            1 for r in requests if r.temperature != 0 and not all(k in r.extra for k in neutral)
        )
        if count:
            extra = dict(neutral)
            problems.append(
                f"{count} sampled request(s) without the server's neutral fields: "
                f"{defaults.detail}; add extra={extra!r} and explicit temperature/top_p "
                f"(profile {report.profile_name!r})"
            )
    return problems
