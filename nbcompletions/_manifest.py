"""A study's record of the endpoint it measured, and a check that the endpoint is still the same.

A sweep's cached answers are only worth reusing while the endpoint behind them is unchanged: a
provider can swap the model behind a name, a server can be upgraded, a quantised build can replace
a full one. `endpoint_manifest(client)` records what identifies the endpoint now:

- ``endpoint`` and ``model`` as the client names them;
- ``system_fingerprint`` from a response (OpenAI's and vLLM's backend identity; None where absent);
- ``model_card``: the model's entry of ``GET /models`` (None where the server lists no such model);
- ``conformance``: a summary of `Client.conformance()` (ok, profile, the checks that fail, the
  context length and vocabulary size);
- ``tokenizer_hash``: SHA-256 of the tokens the server echoes for a fixed text (None where it
  cannot echo), so a changed tokenizer shows even when the text comes back the same;
- ``fingerprints``: a few seeded greedy completions (``temperature=0``, ``seed=0``, a handful of
  tokens each) with their texts, tokens and summed log-probabilities.

`check_drift(client, manifest)` sends the fingerprint set again (a few tiny requests, plus ``GET
/models`` and one echo) and warns `DriftWarning` naming what changed: a text or token that differs,
a log-probability that moved more than ``tolerance`` nats, a new fingerprint, card or tokenizer.
`sweep_manifest(client, path)` is what a sweep calls beside its cache or results: the first run
writes the manifest there, and every later run checks the endpoint against it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._conformance import aconformance
from ._errors import APIError
from ._request import CompletionRequest, Limits
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

__all__ = [
    "FINGERPRINT_PROMPTS",
    "DriftWarning",
    "acheck_drift",
    "aendpoint_manifest",
    "asweep_manifest",
    "check_drift",
    "drift",
    "endpoint_manifest",
    "load_manifest",
    "manifest_path",
    "save_manifest",
    "sweep_manifest",
]

MANIFEST_VERSION = 1
#: Short prompts whose greedy continuations identify a model (plain ASCII: any tokenizer has them).
FINGERPRINT_PROMPTS = ("To be, or not to be", "ROMEO:\n", "The king is")
FINGERPRINT_TOKENS = 8
#: The text whose echoed tokens give the tokenizer hash: words, digits, punctuation, non-ASCII.
TOKENIZER_TEXT = "First Citizen: We are accounted poor citizens, 1,234 times: café, naïve — “done”."
MANIFEST_NAME = "manifest.json"
_LIMITS = Limits(max_logprobs=None)


class DriftWarning(UserWarning):
    """The endpoint answers differently from when the study's cached answers were recorded."""


async def _fingerprint(aclient: AsyncCompletionsClient, prompt: str) -> dict[str, Any]:
    request = CompletionRequest(
        prompt=prompt,
        temperature=0,
        seed=0,
        max_tokens=FINGERPRINT_TOKENS,
        logprobs=0,
        model=aclient.model,
        limits=_LIMITS,
    )
    # The server's own answer, as it is: a fingerprint of what it does, not of our corrections.
    raw = (await aclient.complete_as_is(request)).raw
    choice = (raw.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs") or {}
    tokens = [str(t) for t in logprobs.get("tokens") or []]
    values = [v for v in logprobs.get("token_logprobs") or [] if isinstance(v, int | float)]
    return {
        "prompt": prompt,
        "text": choice.get("text"),
        "tokens": tokens,
        "sum_logprob": math.fsum(values) if values else None,
        "system_fingerprint": raw.get("system_fingerprint"),
    }


async def _tokenizer_hash(aclient: AsyncCompletionsClient) -> str | None:
    request = CompletionRequest(
        prompt=TOKENIZER_TEXT,
        echo=True,
        max_tokens=1,
        logprobs=0,
        temperature=0,
        model=aclient.model,
        limits=_LIMITS,
    )
    try:
        raw = (await aclient.complete_as_is(request)).raw
    except APIError:  # a server that refuses echo has no tokenizer we can see; that is fine
        return None
    choice = (raw.get("choices") or [{}])[0]
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if not tokens:
        return None
    # Only the echoed text's tokens: the generated one is an answer, not the tokenizer.
    spelled, echoed = "", []
    for token in tokens:
        if len(spelled) >= len(TOKENIZER_TEXT):
            break
        echoed.append(str(token))
        spelled += str(token)
    return hashlib.sha256(json.dumps(echoed).encode("utf-8")).hexdigest()


async def _model_card(aclient: AsyncCompletionsClient) -> dict[str, Any] | None:
    try:
        body = await aclient.request("GET", "/models")
    except APIError:  # no GET /models is an identity too: recorded as None
        return None
    data = body.get("data") if isinstance(body, Mapping) else None
    cards = [c for c in data or [] if isinstance(c, Mapping)]
    for card in cards:
        if card.get("id") == aclient.model or (aclient.model is None and len(cards) == 1):
            # ``created`` is when this server process started, not what it serves.
            return {k: v for k, v in card.items() if k != "created"}
    return None


async def _identity(aclient: AsyncCompletionsClient, prompts: Sequence[str]) -> dict[str, Any]:
    fingerprints = await asyncio.gather(*(_fingerprint(aclient, p) for p in prompts))
    card, tokenizer = await asyncio.gather(_model_card(aclient), _tokenizer_hash(aclient))
    seen = [f.pop("system_fingerprint") for f in fingerprints]
    return {
        "system_fingerprint": next((s for s in seen if s), None),
        "model_card": card,
        "tokenizer_hash": tokenizer,
        "fingerprints": list(fingerprints),
    }


async def aendpoint_manifest(
    client: HasAsyncClient, *, prompts: Sequence[str] = FINGERPRINT_PROMPTS
) -> dict[str, Any]:
    """`endpoint_manifest`, awaited."""
    aclient = as_async(client)
    report = await aconformance(aclient)
    identity = await _identity(aclient, _prompts(prompts))
    return {
        "version": MANIFEST_VERSION,
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "endpoint": aclient.endpoint,
        "model": aclient.model,
        "conformance": {
            "ok": report.ok,
            "profile": report.profile_name,
            "failing_checks": sorted(c.name for c in report.failed()),
            "context_length": report.context_length,
            "vocab_size": report.vocab_size,
        },
        **identity,
    }


def endpoint_manifest(
    client: HasAsyncClient, *, prompts: Sequence[str] = FINGERPRINT_PROMPTS
) -> dict[str, Any]:
    """What identifies ``client``'s endpoint now, as a JSON-able dict (see the module docstring).

    Sends the conformance check (cached per client), ``len(prompts)`` seeded greedy completions of
    8 tokens, one echo of a fixed text and ``GET /models``.
    """
    from ._loop import run_sync

    return run_sync(aendpoint_manifest(client, prompts=prompts))


def _prompts(prompts: Any) -> list[str]:
    if (
        isinstance(prompts, str)
        or not isinstance(prompts, Sequence)
        or not prompts
        or not all(isinstance(p, str) and p for p in prompts)
    ):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings; got {prompts!r}")
    return list(prompts)


def drift(
    recorded: Mapping[str, Any], now: Mapping[str, Any], *, tolerance: float = 0.05
) -> list[str]:
    """What differs between a recorded identity and one probed now (empty: nothing).

    Both are manifests (or `_identity` parts of one); ``tolerance`` is in nats, per fingerprint's
    summed log-probability (numbers move a little between batch sizes and hardware).
    """
    changes = []
    for field in ("system_fingerprint", "model_card", "tokenizer_hash"):
        if recorded.get(field) != now.get(field):
            changes.append(f"{field} was {recorded.get(field)!r}, now {now.get(field)!r}")
    before = {f["prompt"]: f for f in recorded.get("fingerprints") or []}
    for after in now.get("fingerprints") or []:
        old = before.get(after["prompt"])
        if old is None:
            continue
        prompt = after["prompt"]
        if old.get("text") != after.get("text"):
            changes.append(
                f"the greedy completion of {prompt!r} was {old.get('text')!r}, "
                f"now {after.get('text')!r}"
            )
        elif old.get("tokens") != after.get("tokens"):
            changes.append(f"the tokens of {prompt!r}'s completion differ: {after.get('tokens')!r}")
        old_lp, new_lp = old.get("sum_logprob"), after.get("sum_logprob")
        if (
            isinstance(old_lp, int | float)
            and isinstance(new_lp, int | float)
            and abs(old_lp - new_lp) > tolerance
        ):
            changes.append(
                f"the log-probability of {prompt!r}'s completion was {old_lp:.4f}, now "
                f"{new_lp:.4f} (more than {tolerance} nats apart)"
            )
    return changes


async def acheck_drift(
    client: HasAsyncClient, manifest: Mapping[str, Any], *, tolerance: float = 0.05
) -> list[str]:
    """`check_drift`, awaited."""
    _check_manifest(manifest)
    prompts = [f["prompt"] for f in manifest["fingerprints"]] or list(FINGERPRINT_PROMPTS)
    now = await _identity(as_async(client), prompts)
    changes = drift(manifest, now, tolerance=tolerance)
    if changes:
        warnings.warn(
            f"the endpoint {manifest.get('endpoint')!r} (model {manifest.get('model')!r}) has "
            f"changed since {manifest.get('recorded')}: " + "; ".join(changes) + ". Answers "
            "cached before then came from a different endpoint: start a new cache to measure "
            "the new one, or keep the old one to reproduce the study.",
            DriftWarning,
            stacklevel=3,
        )
    return changes


def check_drift(
    client: HasAsyncClient, manifest: Mapping[str, Any], *, tolerance: float = 0.05
) -> list[str]:
    """Probe ``client`` again and warn `DriftWarning` if it answers differently from ``manifest``.

    Sends the manifest's fingerprint prompts (seeded greedy, 8 tokens each), one echo and ``GET
    /models``; returns what changed (empty when nothing did). ``tolerance`` (nats) is how far a
    fingerprint's summed log-probability may move before it counts.
    """
    from ._loop import run_sync

    return run_sync(acheck_drift(client, manifest, tolerance=tolerance))


def _check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, Mapping) or not isinstance(manifest.get("fingerprints"), list):
        raise ValueError(
            "manifest must be a dict made by endpoint_manifest() (with a 'fingerprints' list); "
            f"got {type(manifest).__name__}"
        )
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"manifest version must be {MANIFEST_VERSION}; got {manifest.get('version')!r}"
        )


def manifest_path(location: str | os.PathLike[str]) -> Path:
    """Where a study's manifest lives: ``manifest.json`` in a results directory, or beside a cache
    file (``study.sqlite`` -> ``study.manifest.json``)."""
    path = Path(location)
    if path.is_dir() or not path.suffix:
        return path / MANIFEST_NAME
    return path.with_name(f"{path.stem}.manifest.json")


def save_manifest(manifest: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``manifest`` as JSON to ``path`` (a file; its folder is made); returns the path."""
    _check_manifest(manifest)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    temporary.replace(target)  # a reader never sees half a file
    return target


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a manifest written by `save_manifest`."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{os.fspath(path)} is not a manifest (not JSON: {exc})") from None
    _check_manifest(manifest)
    result: dict[str, Any] = manifest
    return result


async def asweep_manifest(
    client: HasAsyncClient, location: str | os.PathLike[str], *, tolerance: float = 0.05
) -> dict[str, Any]:
    """`sweep_manifest`, awaited."""
    path = manifest_path(location)
    if path.exists():
        manifest = load_manifest(path)
        await acheck_drift(client, manifest, tolerance=tolerance)
        return manifest
    manifest = await aendpoint_manifest(client)
    save_manifest(manifest, path)
    return manifest


def sweep_manifest(
    client: HasAsyncClient, location: str | os.PathLike[str], *, tolerance: float = 0.05
) -> dict[str, Any]:
    """The manifest a sweep keeps beside its cache or results (``location``: either).

    The first call records the endpoint (`endpoint_manifest`) and writes it to
    `manifest_path(location)`; every later call reads it back and checks the endpoint against it
    (`check_drift`: a `DriftWarning` if it changed). Returns the recorded manifest.
    """
    from ._loop import run_sync

    return run_sync(asweep_manifest(client, location, tolerance=tolerance))
