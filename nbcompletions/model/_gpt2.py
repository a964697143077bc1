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
    "linear",
    "load_weights",
    "log_softmax",
    "normalise",
    "read_tensors",
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


@dataclasses.dataclass(frozen=True)
class Linear:
    """A linear layer: ``w`` is (in, out), ``b`` is (out,) or None.

    Every batch size multiplies by the whole matrix in one BLAS call. (Multiplying a few rows by
    256 x 256 blocks of it, to skip OpenBLAS's packing, was 15% slower per decode step at 4 to 16
    rows once the weights no longer sit in cache, which is the case across a step's layers.)
    """

    w: np.ndarray
    b: np.ndarray | None

    @classmethod
    def of(cls, w: np.ndarray, b: np.ndarray | None = None) -> Linear:
        return cls(_frozen(w), None if b is None else _frozen(b))


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True)
class Block:
    """One transformer block's parameters (float32), as the forward pass uses them.

    Each layer norm's scale and shift are folded into the linear layer that reads its output, and
    so is the normalisation's sqrt(D) (see `normalise`): ``(norm(x) * g + beta) @ w + b`` equals
    ``(norm(x) / sqrt(D)) @ (sqrt(D) * g[:, None] * w) + (beta @ w + b)``. The attention's
    1/sqrt(K) (and 1/(layer + 1) where configured) is folded into the query columns. A decode
    step then makes no elementwise pass for them; the results differ from the unfolded order by
    float32 rounding only.
    """

    attn: Linear  # (D, 3D): q, k, v side by side; ln_1 and the attention scale folded in
    attn_proj: Linear  # (D, D)
    fc: Linear  # (D, 4D); ln_2 folded in
    mlp_proj: Linear  # (4D, D)


@dataclasses.dataclass(frozen=True)
class GPT2Weights:
    """All parameters, read-only after load; shared by every request."""

    config: GPT2Config
    wte: np.ndarray  # (V, D) token embeddings
    wpe: np.ndarray  # (n_positions, D) position embeddings
    blocks: tuple[Block, ...]
    lm_head: Linear  # (D, V): wte.T, contiguous (tied weights), with ln_f folded in


def _folded(w: np.ndarray, b: np.ndarray | None, g: np.ndarray, beta: np.ndarray) -> Linear:
    """The linear layer ``w, b`` reading ``norm(x) / sqrt(D)`` instead of ``norm(x) * g + beta``."""
    dim = w.shape[0]
    w64 = w.astype(np.float64)
    bias = beta.astype(np.float64) @ w64
    if b is not None:
        bias += b
    scaled = (math.sqrt(dim) * g.astype(np.float64))[:, None] * w64
    return Linear.of(np.ascontiguousarray(scaled, dtype=F32), bias.astype(F32))


def read_tensors(directory: str | Path) -> dict[str, np.ndarray]:
    """``model.safetensors`` in ``directory`` as stored (float16 here), by GPT-2 parameter name."""
    from safetensors.numpy import load_file

    raw = load_file(str(Path(directory) / "model.safetensors"))
    # GPT2LMHeadModel saves "transformer.h.0..."; a bare GPT2Model saves "h.0...".
    return {key.removeprefix("transformer."): value for key, value in raw.items()}


def load_weights(
    directory: str | Path, tensors: Mapping[str, np.ndarray] | None = None
) -> GPT2Weights:
    """Read ``config.json`` and ``model.safetensors`` from ``directory`` as float32 arrays
    (``tensors``: the file already read by `read_tensors`)."""
    directory = Path(directory)
    config = GPT2Config.from_file(directory / "config.json")
    if tensors is None:
        tensors = read_tensors(directory)

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"model.safetensors has no tensor {name!r}")
        return _frozen(np.ascontiguousarray(tensors[name], dtype=F32))

    def linear_at(name: str) -> Linear:
        return Linear.of(get(f"{name}.weight"), get(f"{name}.bias"))

    head = config.n_embd // config.n_head

    def block(i: int) -> Block:
        qkv_w, qkv_b = get(f"h.{i}.attn.c_attn.weight"), get(f"h.{i}.attn.c_attn.bias")
        scale = 1.0
        if config.scale_attn_weights:
            scale /= math.sqrt(head)
        if config.scale_attn_by_inverse_layer_idx:
            scale /= i + 1
        column = np.ones(qkv_w.shape[1])
        column[: config.n_embd] = scale  # the query columns: scores come out scaled
        attn = _folded(
            qkv_w * column, qkv_b * column, get(f"h.{i}.ln_1.weight"), get(f"h.{i}.ln_1.bias")
        )
        fc = _folded(
            get(f"h.{i}.mlp.c_fc.weight"),
            get(f"h.{i}.mlp.c_fc.bias"),
            get(f"h.{i}.ln_2.weight"),
            get(f"h.{i}.ln_2.bias"),
        )
        return Block(
            attn=attn,
            attn_proj=linear_at(f"h.{i}.attn.c_proj"),
            fc=fc,
            mlp_proj=linear_at(f"h.{i}.mlp.c_proj"),
        )

    blocks = tuple(block(i) for i in range(config.n_layer))
    wte = get("wte.weight")
    if wte.shape != (config.vocab_size, config.n_embd):
        raise ValueError(
            f"wte has shape {wte.shape}; config.json says ({config.vocab_size}, {config.n_embd})"
        )
    # The output layer is tied to the input embedding unless the file carries its own.
    lm_head_src = tensors.get("lm_head.weight")
    lm_head = _folded(
        (wte if lm_head_src is None else lm_head_src.astype(F32)).T,
        None,
        get("ln_f.weight"),
        get("ln_f.bias"),
    )
    return GPT2Weights(
        config=config, wte=wte, wpe=get("wpe.weight"), blocks=blocks, lm_head=lm_head
    )


# -- pure functions --------------------------------------------------------------------------------


def normalise(x: np.ndarray, eps: float) -> np.ndarray:
    """(M, D) -> (M, D): layer norm without its scale and shift, divided by sqrt(D).

    ``(x - mean) / sqrt(sum((x - mean)**2) + D * eps)``: sums by matmul with a ones column (one
    BLAS call each, fewer numpy passes than mean and var), and the sqrt(D) that a plain layer norm
    would multiply by is folded into the next layer's weights (see `Block`).
    """
    dim = x.shape[-1]
    ones = _ones_column(dim)
    centered: np.ndarray = x - (x @ ones) * F32(1.0 / dim)  # (M, D)
    sum_sq = (centered * centered) @ ones  # (M, 1)
    sum_sq += F32(dim * eps)
    centered /= np.sqrt(sum_sq, out=sum_sq)
    return centered


_ONES: dict[int, np.ndarray] = {}


def _ones_column(dim: int) -> np.ndarray:
    ones = _ONES.get(dim)
    if ones is None:
        ones = _ONES[dim] = _frozen(np.ones((dim, 1), F32))
    return ones


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
    out: np.ndarray = flat @ layer.w  # (M, out)
    if layer.b is not None:
        out += layer.b
    return out.reshape(*x.shape[:-1], out.shape[1])


def _attention(
    x: np.ndarray,
    block: Block,
    config: GPT2Config,
    layer: int,
    cache: KVCache,
    mask: np.ndarray | None,
    start: int | None,
    end: int,
) -> np.ndarray:
    """(B, T, D) normalised input -> (B, T, D): causal self-attention over the cache plus the T
    new positions.

    ``start`` is every row's cached length when they are all equal (the new keys go in one slice),
    else None (one step, each row at its own length); ``end`` the positions attended to; ``mask``
    (B, 1, T, S) is 0 where a key is visible and -inf where not, or None when all are visible.
    """
    batch, steps, dim = x.shape
    heads = config.n_head
    head = dim // heads
    qkv = linear(x, block.attn)  # (B, T, 3D); the query comes out scaled (see `Block`)
    qkv = qkv.reshape(batch, steps, 3, heads, head).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, K)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, K) each

    cache_k, cache_v = cache.k[layer], cache.v[layer]
    if start is not None:
        cache_k[:, :, start : start + steps] = k
        cache_v[:, :, start : start + steps] = v
    else:
        # Ragged rows take one step at a time, each at its own position.
        rows = np.arange(batch)
        cache_k[rows, :, cache.lengths] = k[:, :, 0]  # (B, H, K)
        cache_v[rows, :, cache.lengths] = v[:, :, 0]
    keys = cache_k[:, :, :end]  # (B, H, S, K)
    values = cache_v[:, :, :end]  # (B, H, S, K)

    scores = q @ keys.transpose(0, 1, 3, 2)  # (B, H, T, S)
    if mask is not None:
        scores += mask
    # softmax in place: subtract the max, exponentiate, normalise
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores, out=scores)
    weights /= np.add.reduce(weights, axis=-1, keepdims=True)
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
    batch, steps = ids.shape
    lengths = cache.lengths
    low, high = int(lengths.min()), int(lengths.max())
    if high + steps > cache.capacity:
        raise ValueError(
            f"the cache holds {cache.capacity} positions; position {high + steps - 1} does not fit"
        )
    end = high + steps  # keys attended to: (B, H, T, S) with S = end
    start: int | None = low
    mask = None
    if steps == 1 and low == high:
        positions = np.full((batch, 1), low)  # (B, T): every key is visible
    else:
        positions = lengths[:, None] + np.arange(steps)[None, :]  # (B, T)
        if low != high:
            start = None
        # Key s is visible from the query at absolute position p iff s <= p.
        hidden = np.arange(end)[None, None, :] > positions[:, :, None]  # (B, T, S)
        mask = np.where(hidden, F32(-np.inf), F32(0.0))[:, None]  # (B, 1, T, S)
    eps = config.layer_norm_epsilon
    x = weights.wte[ids] + weights.wpe[positions]  # (B, T, D)
    for layer, block in enumerate(weights.blocks):
        x += _attention(normalise(x, eps), block, config, layer, cache, mask, start, end)
        h = act(linear(normalise(x, eps), block.fc))  # (B, T, 4D)
        x += linear(h, block.mlp_proj)  # (B, T, D)
    cache.lengths = lengths + steps
    if last_only:
        x = x[:, -1:]  # (B, 1, D)
    return linear(normalise(x, eps), weights.lm_head)  # (B, T, V)


def forward_full(weights: GPT2Weights, ids: np.ndarray) -> np.ndarray:
    """(B, T) -> (B, T, V) logits in one pass: the reference the cached path must match."""
    batch, steps = ids.shape
    cache = KVCache.empty(weights.config, batch, steps)
    return forward(weights, ids, cache)
