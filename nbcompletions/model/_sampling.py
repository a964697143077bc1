"""Turning next-token logits into tokens, exactly as the Completions API describes.

Order of operations for each row (one candidate completion) and step, as vLLM orders them:
1. ``logit_bias`` is added to the logits (a bias of -100 is an exact ban: the token gets -inf);
2. vLLM's (and transformers') ``repetition_penalty`` r, for every token j already in the prompt or
   the completion: ``mu[j] = mu[j] / r if mu[j] > 0 else mu[j] * r``;
3. OpenAI's penalties: ``mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty`` where
   ``c[j]`` counts how often token j was already sampled in this completion;
4. temperature 0 takes the argmax; otherwise the logits are divided by the temperature, then cut:
   ``min_p`` drops tokens less likely than min_p times the most likely one, ``top_k`` keeps the k
   most likely (ties with the k-th kept), ``top_p`` keeps the nucleus (the smallest set of most
   likely tokens whose probability reaches top_p, always at least one); what is left is sampled
   with the request's ``numpy.random.Generator``.

Sampling works in float64 so that the nucleus's cumulative sums are exact enough to be reproducible.
"""

from __future__ import annotations

import numpy as np

from . import _kernels

__all__ = ["BAN", "GREEDY_BELOW", "adjust_logits", "bias_vector", "sample", "top_k"]

#: A logit_bias at or below this bans the token outright (OpenAI: "-100 should result in a ban").
BAN = -100.0
#: A temperature below this samples as temperature 0 (the argmax). Dividing logits by a
#: temperature near 2.2e-308 overflows to inf (and inf - inf is NaN, which picked the vocabulary's
#: last token); well above that, at 1e-100, any two logits that differ by more than 1e-97 already
#: give the smaller one a probability that underflows to 0, so the argmax is what sampling picks.
GREEDY_BELOW = 1e-100


def bias_vector(logit_bias: dict[int, float], vocab_size: int) -> np.ndarray | None:
    """(V,) float64 additive bias from ``{token_id: bias}``; -inf bans; None when empty."""
    if not logit_bias:
        return None
    bias = np.zeros(vocab_size, np.float64)
    for token, value in logit_bias.items():
        bias[token] = -np.inf if value <= BAN else value
    return bias


def adjust_logits(
    logits: np.ndarray,
    bias: np.ndarray | None,
    counts: np.ndarray | None,
    frequency_penalty: float,
    presence_penalty: float,
    *,
    seen: np.ndarray | None = None,
    repetition_penalty: float = 1.0,
) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 logits after logit_bias and the penalties.

    ``seen``: (B, V) bool, the tokens of each row's prompt and completion so far, which
    ``repetition_penalty`` applies to.
    """
    mu = logits.astype(np.float64)
    if bias is not None:
        mu += bias
    if seen is not None and repetition_penalty != 1.0:
        # A penalty near 0 or near float64's max overflows to +-inf: a limit `sample` handles.
        with np.errstate(over="ignore"):
            scaled = np.where(mu > 0, mu / repetition_penalty, mu * repetition_penalty)
        mu = np.where(seen, scaled, mu)
    if counts is not None:
        if frequency_penalty:
            mu -= counts * frequency_penalty
        if presence_penalty:
            mu -= (counts > 0) * presence_penalty
    return mu


def sample(
    mu: np.ndarray,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
    *,
    top_k: int = 0,
    min_p: float = 0.0,
    draws: np.ndarray | None = None,
) -> np.ndarray:
    """(B, V) adjusted logits -> (B,) sampled token ids; one uniform draw per row when sampling.

    ``top_k`` 0 (or -1) and ``min_p`` 0 are off; temperature 0 ignores both (as vLLM does), and a
    temperature below `GREEDY_BELOW` is temperature 0.
    ``draws``: the (B,) uniform draws of plain sampling, already taken from ``rng``.
    """
    if temperature < GREEDY_BELOW:
        greedy: np.ndarray = np.argmax(mu, axis=1)
        return greedy
    with np.errstate(over="ignore"):
        overflowing = np.isposinf(mu.max(axis=1) / temperature)  # (B,)
    if overflowing.any():
        # The largest logit outweighs every other by more than float64 holds (a repetition
        # penalty near 0, say): the limit of sampling is the argmax. Other rows sample as usual.
        chosen: np.ndarray = np.argmax(mu, axis=1)
        rest = ~overflowing
        if rest.any():
            chosen[rest] = sample(
                mu[rest],
                temperature,
                top_p,
                rng,
                top_k=top_k,
                min_p=min_p,
                draws=None if draws is None else draws[rest],
            )
        return chosen
    batch, vocab = mu.shape
    plain = top_p >= 1.0 and not 0 < top_k < vocab and min_p <= 0.0
    if plain:  # the common case, compiled where numba is (the same draws, the same tokens)
        if draws is None:
            draws = np.asarray(rng.random(batch))
        compiled = _kernels.sample_plain(mu, temperature, draws)
        if compiled is not None:
            return compiled
    z = mu / temperature if temperature != 1.0 else mu.copy()
    z -= z.max(axis=1, keepdims=True)  # the most likely token now has z = 0
    if min_p > 0.0:
        # p[j] / p_max = exp(z[j]): keep the tokens with p[j] >= min_p * p_max.
        z = np.where(z >= np.log(min_p), z, -np.inf)
    if 0 < top_k < vocab:
        kth = np.partition(z, vocab - top_k, axis=1)[:, vocab - top_k, None]  # (B, 1)
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z, out=z)  # (B, V), unnormalised; -inf (banned) -> 0
    rows = np.arange(batch)
    if top_p < 1.0:
        probs /= probs.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")  # (B, V) most likely first
        ranked = np.take_along_axis(probs, order, axis=1)  # (B, V)
        before = np.cumsum(ranked, axis=1) - ranked  # mass of the strictly more likely tokens
        ranked = np.where(before < top_p, ranked, 0.0)
        ranked[:, 0] = np.maximum(ranked[:, 0], np.finfo(np.float64).tiny)  # keep at least one
        cum = np.cumsum(ranked, axis=1)  # (B, V)
        u = rng.random(batch) * cum[:, -1]
        picked: np.ndarray = order[rows, _pick(cum, u)]
        return picked
    cum = np.cumsum(probs, axis=1, out=probs)  # (B, V)
    u = (draws if plain else rng.random(batch)) * cum[:, -1]
    return _pick(cum, u)


def _pick(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(B, V) cumulative weights and (B,) draws -> (B,) the first index whose cum exceeds u.

    That is the count of entries <= u (cum never decreases), found by bisection per row rather
    than by comparing all V entries, capped at V - 1 against rounding at the top.
    """
    last = cum.shape[1] - 1
    return np.array(
        [
            min(int(np.searchsorted(row, draw, side="right")), last)
            for row, draw in zip(cum, u, strict=True)
        ],
        np.int64,
    ).reshape(len(u))


def top_k(logp: np.ndarray, k: int) -> np.ndarray:
    """(B, V) -> (B, k) ids of the k largest entries per row, largest first."""
    batch, vocab = logp.shape
    k = min(k, vocab)
    if k == 0:
        return np.zeros((batch, 0), np.int64)
    if k < vocab:
        idx = np.argpartition(-logp, k - 1, axis=1)[:, :k]  # (B, k) unordered
    else:
        idx = np.broadcast_to(np.arange(vocab), (batch, vocab))
    vals = np.take_along_axis(logp, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)
