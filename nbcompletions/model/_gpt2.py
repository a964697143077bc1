"""GPT-2 inference in numpy: a handful of pure functions and a key/value cache.

The files are Hugging Face's GPT-2 layout (``config.json`` + ``model.safetensors``), so the very
same weights load in ``transformers``; the parity test holds the two to 1e-4. Shapes in comments use
B = batch rows, T = new positions, S = cached positions (keys), D = n_embd, H = n_head,
K = D // H (head size), V = vocab size, L = n_layer.

Everything runs in float32 (the weights are float16 on disk). Linear weights are stored as
``(in, out)`` because GPT-2 uses ``Conv1D``, so ``x @ w + b`` needs no transpose; the tied output
projection is ``wte.T``, copied once at load into a contiguous ``(D, V)`` array so every decode
step's matmul reads memory in order.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Block",
    "GPT2Config",
    "GPT2Weights",
    "KVCache",
    "Linear",
    "forward",
    "gelu_erf",
    "gelu_tanh",
    "layer_norm",
    "linear",
    "load_weights",
    "log_softmax",
    "softmax",
]

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of ``config.json`` that the forward pass reads."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    eos_token_id: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GPT2Config:
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json model_type must be 'gpt2'; got {model_type!r}")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            n_positions=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
            n_embd=int(raw["n_embd"]),
            n_layer=int(raw["n_layer"]),
            n_head=int(raw["n_head"]),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            activation_function=str(raw.get("activation_function", "gelu_new")),
            scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
            eos_token_id=raw.get("eos_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> GPT2Config:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


#: Batches up to this many rows multiply by weight blocks of BLOCK x BLOCK (see `Linear`).
SMALL_BATCH = 16
BLOCK = 256


@dataclasses.dataclass(frozen=True)
class Linear:
    """A linear layer: ``w`` is (in, out), ``b`` is (out,) or None.

    ``blocks[j][i]`` is a contiguous copy of ``w[i*BLOCK:(i+1)*BLOCK, j*BLOCK:(j+1)*BLOCK]``. A
    decode step of a few rows (n > 1, best_of) multiplies by those blocks instead of the whole
    matrix: OpenBLAS, numpy's BLAS, packs the whole weight matrix for every general matmul, which at
    2 to 16 rows costs more than the arithmetic, while blocks this size take its unpacked
    small-matrix path (about 2x faster at 8 rows here). One row goes to gemv, which needs neither.
    """

    w: np.ndarray
    b: np.ndarray | None
    blocks: tuple[tuple[np.ndarray, ...], ...]

    @classmethod
    def of(cls, w: np.ndarray, b: np.ndarray | None = None) -> Linear:
        n_in, n_out = w.shape
        blocks = tuple(
            tuple(
                _frozen(np.ascontiguousarray(w[i : i + BLOCK, j : j + BLOCK]))
                for i in range(0, n_in, BLOCK)
            )
            for j in range(0, n_out, BLOCK)
        )
        return cls(_frozen(w), None if b is None else _frozen(b), blocks)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True)
class Block:
    """One transformer block's parameters (float32)."""

    ln_1_g: np.ndarray  # (D,)
    ln_1_b: np.ndarray  # (D,)
    attn: Linear  # (D, 3D): q, k, v side by side
    attn_proj: Linear  # (D, D)
    ln_2_g: np.ndarray  # (D,)
    ln_2_b: np.ndarray  # (D,)
    fc: Linear  # (D, 4D)
    mlp_proj: Linear  # (4D, D)


@dataclasses.dataclass(frozen=True)
class GPT2Weights:
    """All parameters, read-only after load; shared by every request."""

    config: GPT2Config
    wte: np.ndarray  # (V, D) token embeddings
    wpe: np.ndarray  # (n_positions, D) position embeddings
    blocks: tuple[Block, ...]
    ln_f_g: np.ndarray  # (D,)
    ln_f_b: np.ndarray  # (D,)
    lm_head: Linear  # (D, V): wte.T, contiguous (tied weights), no bias


def load_weights(directory: str | Path) -> GPT2Weights:
    """Read ``config.json`` and ``model.safetensors`` from ``directory`` as float32 arrays."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = GPT2Config.from_file(directory / "config.json")
    raw = load_file(str(directory / "model.safetensors"))
    # GPT2LMHeadModel saves "transformer.h.0..."; a bare GPT2Model saves "h.0...".
    tensors = {key.removeprefix("transformer."): value for key, value in raw.items()}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"model.safetensors has no tensor {name!r}")
        return _frozen(np.ascontiguousarray(tensors[name], dtype=F32))

    def linear_at(name: str) -> Linear:
        return Linear.of(get(f"{name}.weight"), get(f"{name}.bias"))

    blocks = tuple(
        Block(
            ln_1_g=get(f"h.{i}.ln_1.weight"),
            ln_1_b=get(f"h.{i}.ln_1.bias"),
            attn=linear_at(f"h.{i}.attn.c_attn"),
            attn_proj=linear_at(f"h.{i}.attn.c_proj"),
            ln_2_g=get(f"h.{i}.ln_2.weight"),
            ln_2_b=get(f"h.{i}.ln_2.bias"),
            fc=linear_at(f"h.{i}.mlp.c_fc"),
            mlp_proj=linear_at(f"h.{i}.mlp.c_proj"),
        )
        for i in range(config.n_layer)
    )
    wte = get("wte.weight")
    # The output layer is tied to the input embedding unless the file carries its own.
    lm_head_src = tensors.get("lm_head.weight")
    lm_head = Linear.of(
        np.ascontiguousarray((wte if lm_head_src is None else lm_head_src.astype(F32)).T)
    )
    if wte.shape != (config.vocab_size, config.n_embd):
        raise ValueError(
            f"wte has shape {wte.shape}; config.json says ({config.vocab_size}, {config.n_embd})"
        )
    return GPT2Weights(
        config=config,
        wte=wte,
        wpe=get("wpe.weight"),
        blocks=blocks,
        ln_f_g=get("ln_f.weight"),
        ln_f_b=get("ln_f.bias"),
        lm_head=lm_head,
    )


# -- pure functions --------------------------------------------------------------------------------


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """(..., D) -> (..., D): normalise over the last axis, then scale and shift."""
    # np.add.reduce rather than np.mean: the same sum without mean()'s Python-level bookkeeping,
    # which costs more than the arithmetic on a decode step's few rows.
    inv_d = F32(1.0 / x.shape[-1])
    centered = x - np.add.reduce(x, axis=-1, keepdims=True) * inv_d
    var = np.add.reduce(centered * centered, axis=-1, keepdims=True) * inv_d
    out: np.ndarray = centered / np.sqrt(var + F32(eps)) * g + b
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU ("gelu_new"): the tanh approximation, elementwise."""
    out: np.ndarray = (
        F32(0.5)
        * x
        * (F32(1.0) + np.tanh(F32(math.sqrt(2.0 / math.pi)) * (x + F32(0.044715) * x * x * x)))
    )
    return out


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 is only good to 1.5e-7 absolute: fine for float32 activations, and
    # numpy has no erf of its own (scipy would be a heavy dependency for one function).
    sign = np.sign(x)
    a = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    out: np.ndarray = (sign * (1.0 - poly * np.exp(-a * a))).astype(x.dtype)
    return out


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """The exact GELU ("gelu"): x * Phi(x), elementwise."""
    out: np.ndarray = F32(0.5) * x * (F32(1.0) + _erf(x / F32(math.sqrt(2.0))))
    return out


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / (F32(1.0) + np.exp(F32(-1.702) * x))
    return out


def _relu(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.maximum(x, F32(0.0))
    return out


def _silu(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / (F32(1.0) + np.exp(-x))
    return out


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": gelu_erf,
    "quick_gelu": _quick_gelu,
    "relu": _relu,
    "silu": _silu,
    "swish": _silu,
}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (subtract the max before exp)."""
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / e.sum(axis=axis, keepdims=True)
    return out


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax: x - max - log(sum(exp(x - max)))."""
    shifted = x - x.max(axis=axis, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return out


# -- the key/value cache ---------------------------------------------------------------------------


class KVCache:
    """Keys and values of every position seen so far, per layer, per batch row.

    ``k[l]`` and ``v[l]`` are (B, H, capacity, K); ``lengths[b]`` is how many positions row b holds.
    Rows may hold different lengths (several prompts decoded together): each row writes its next key
    at its own length and attends only to its own filled positions. A cache belongs to one request.
    """

    def __init__(self, k: list[np.ndarray], v: list[np.ndarray], lengths: np.ndarray) -> None:
        self.k = k
        self.v = v
        self.lengths = lengths  # (B,) int64

    @classmethod
    def empty(cls, config: GPT2Config, batch: int, capacity: int) -> KVCache:
        head = config.n_embd // config.n_head
        shape = (batch, config.n_head, capacity, head)
        return cls(
            [np.zeros(shape, F32) for _ in range(config.n_layer)],
            [np.zeros(shape, F32) for _ in range(config.n_layer)],
            np.zeros(batch, np.int64),
        )

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.k[0].shape[2])

    @classmethod
    def stack(cls, sources: list[tuple[KVCache, int]], capacity: int) -> KVCache:
        """A new cache whose rows copy row 0 of each source ``repeats`` times (prefill once, share).

        ``sources`` is ``[(prefilled_cache, repeats), ...]``; the result has sum(repeats) rows.
        """
        first = sources[0][0]
        n_layer = len(first.k)
        batch = sum(repeats for _, repeats in sources)
        _, heads, _, head = first.k[0].shape
        k = [np.zeros((batch, heads, capacity, head), F32) for _ in range(n_layer)]
        v = [np.zeros((batch, heads, capacity, head), F32) for _ in range(n_layer)]
        lengths = np.zeros(batch, np.int64)
        row = 0
        for cache, repeats in sources:
            n = int(cache.lengths[0])
            for layer in range(n_layer):
                k[layer][row : row + repeats, :, :n] = cache.k[layer][
                    0, :, :n
                ]  # broadcast over rows
                v[layer][row : row + repeats, :, :n] = cache.v[layer][0, :, :n]
            lengths[row : row + repeats] = n
            row += repeats
        return cls(k, v, lengths)

    def select(self, rows: np.ndarray) -> KVCache:
        """A cache holding only ``rows`` (used to drop finished rows from the batch)."""
        return KVCache([k[rows] for k in self.k], [v[rows] for v in self.v], self.lengths[rows])


# -- the forward pass ------------------------------------------------------------------------------


def linear(x: np.ndarray, layer: Linear) -> np.ndarray:
    """(..., in) @ (in, out) + (out,) -> (..., out), as 2-D matmuls.

    numpy would run a (B, T, in) @ (in, out) product as B separate matmuls; folding the leading axes
    into one lets BLAS process every row of the batch in a single call.
    """
    flat = x.reshape(-1, x.shape[-1])  # (M, in)
    rows = flat.shape[0]
    if 1 < rows <= SMALL_BATCH:
        out = np.empty((rows, layer.w.shape[1]), F32)  # (M, out)
        for j, column in enumerate(layer.blocks):
            part = out[:, j * BLOCK : (j + 1) * BLOCK]
            np.matmul(flat[:, :BLOCK], column[0], out=part)
            for i in range(1, len(column)):
                part += flat[:, i * BLOCK : (i + 1) * BLOCK] @ column[i]
    else:
        out = flat @ layer.w
    if layer.b is not None:
        out += layer.b
    return out.reshape(*x.shape[:-1], out.shape[1])


def _attention(
    x: np.ndarray,
    block: Block,
    config: GPT2Config,
    layer: int,
    cache: KVCache,
    positions: np.ndarray,
) -> np.ndarray:
    """(B, T, D) -> (B, T, D): causal self-attention over the cache plus the T new positions."""
    batch, steps, dim = x.shape
    heads = config.n_head
    head = dim // heads
    qkv = linear(x, block.attn)  # (B, T, 3D)
    qkv = qkv.reshape(batch, steps, 3, heads, head).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, K)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, K) each

    lengths = cache.lengths
    start = int(lengths[0])
    uniform = bool((lengths == start).all())
    if uniform:
        cache.k[layer][:, :, start : start + steps] = k
        cache.v[layer][:, :, start : start + steps] = v
    else:
        # Ragged rows take one step at a time, each at its own position.
        rows = np.arange(batch)
        cache.k[layer][rows, :, lengths] = k[:, :, 0]  # (B, H, K)
        cache.v[layer][rows, :, lengths] = v[:, :, 0]
    end = int(lengths.max()) + steps
    keys = cache.k[layer][:, :, :end]  # (B, H, S, K)
    values = cache.v[layer][:, :, :end]  # (B, H, S, K)

    scores = q @ keys.transpose(0, 1, 3, 2)  # (B, H, T, S)
    if config.scale_attn_weights:
        scores *= F32(1.0 / math.sqrt(head))
    if config.scale_attn_by_inverse_layer_idx:
        scores *= F32(1.0 / (layer + 1))
    if steps > 1 or not uniform:
        # Key s is visible from the query at absolute position p iff s <= p.
        hidden = np.arange(end)[None, None, :] > positions[:, :, None]  # (B, T, S)
        scores = np.where(hidden[:, None], F32(-np.inf), scores)
    weights = softmax(scores)  # (B, H, T, S)
    out = (weights @ values).transpose(0, 2, 1, 3).reshape(batch, steps, dim)  # (B, T, D)
    return linear(out, block.attn_proj)  # (B, T, D)


def forward(
    weights: GPT2Weights, ids: np.ndarray, cache: KVCache, *, last_only: bool = False
) -> np.ndarray:
    """(B, T) token ids -> (B, T, V) logits, appending the T positions to ``cache``.

    ``last_only`` computes the output layer for the last position only, (B, 1, V): a prefill whose
    prompt logprobs nobody asked for skips T - 1 rows of the largest matmul.

    With T > 1 every row must hold the same number of cached positions (a prefill); with T == 1 rows
    may differ (a decode step). The cache must have room: lengths + T <= capacity <= n_positions.
    """
    config = weights.config
    act = ACTIVATIONS.get(config.activation_function)
    if act is None:
        raise ValueError(
            f"activation_function {config.activation_function!r} is not supported; "
            f"supported: {sorted(ACTIVATIONS)}"
        )
    steps = ids.shape[1]
    positions = cache.lengths[:, None] + np.arange(steps)[None, :]  # (B, T)
    if int(positions.max()) >= cache.capacity:
        raise ValueError(
            f"the cache holds {cache.capacity} positions; position "
            f"{int(positions.max())} does not fit"
        )
    eps = config.layer_norm_epsilon
    x = weights.wte[ids] + weights.wpe[positions]  # (B, T, D)
    for layer, block in enumerate(weights.blocks):
        x = x + _attention(
            layer_norm(x, block.ln_1_g, block.ln_1_b, eps), block, config, layer, cache, positions
        )  # (B, T, D)
        h = layer_norm(x, block.ln_2_g, block.ln_2_b, eps)  # (B, T, D)
        h = act(linear(h, block.fc))  # (B, T, 4D)
        x = x + linear(h, block.mlp_proj)  # (B, T, D)
    cache.lengths = cache.lengths + steps
    if last_only:
        x = x[:, -1:]  # (B, 1, D)
    x = layer_norm(x, weights.ln_f_g, weights.ln_f_b, eps)  # (B, T, D)
    return linear(x, weights.lm_head)  # (B, T, V)


def forward_full(weights: GPT2Weights, ids: np.ndarray) -> np.ndarray:
    """(B, T) -> (B, T, V) logits in one pass: the reference the cached path must match."""
    batch, steps = ids.shape
    cache = KVCache.empty(weights.config, batch, steps)
    return forward(weights, ids, cache)
