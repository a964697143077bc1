"""Convert the embedded model (HF GPT-2 layout) to GGUF with llama.cpp's own `gguf` package.

Usage: ``python tests/peers/to_gguf.py <model_dir> <out.gguf>``

Runs in the llama.cpp peer's venv (numpy + gguf, no torch, no transformers), so it mirrors what
llama.cpp's ``convert_hf_to_gguf.py`` does for ``GPT2LMHeadModel`` (``conversion/gpt2.py`` and
``TextModel._set_vocab_gpt2``) without importing it: that script needs torch and transformers and
is not part of the wheel. The GGUF file itself is written only by ``gguf.GGUFWriter``; names,
keys and tensor types come from gguf-py's constants.

Two things the stock converter cannot do for this model, done here by hand:
- it reads the context length from ``n_ctx``; our config.json has ``n_positions``;
- it identifies the pre-tokenizer by hashing a reference text's tokens and does not know ours;
  the tokenizer is byte-level BPE with GPT-2's regex, so the pre-tokenizer is ``gpt-2``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# safetensors' dtype names -> numpy; the embedded model ships fp16, the others keep this general.
_DTYPES: dict[str, Any] = {"F16": np.float16, "F32": np.float32, "BF16": None}

# HF's GPT-2 uses Conv1D, whose weights are (in, out); ggml wants (out, in) like nn.Linear.
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor in a single-file safetensors checkpoint, as numpy arrays (read-only view)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    body = memoryview(raw)[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}; want F16/F32")
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
    return tensors


def vocab(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their gguf token types, as ``get_vocab_base`` builds them."""
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {int(i): s for s, i in tok["model"]["vocab"].items()}
    special = {int(t["id"]) for t in tok.get("added_tokens", []) if t.get("special")}
    for t in tok.get("added_tokens", []):
        by_id[int(t["id"])] = t["content"]
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    return tokens, types


def convert(model_dir: Path, out: Path) -> None:
    """Write ``out`` (f16 weights, f32 norms/biases/positions, like ``--outtype f16``)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "gpt2":
        raise ValueError(f"{model_dir}/config.json: model_type {config.get('model_type')!r}")
    n_layer = int(config["n_layer"])
    n_embd = int(config["n_embd"])
    n_vocab = int(config["vocab_size"])
    arch = gguf.MODEL_ARCH.GPT2
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])

    writer.add_name(model_dir.name)
    writer.add_block_count(n_layer)
    writer.add_context_length(int(config.get("n_ctx", config["n_positions"])))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(int(config.get("n_inner") or 4 * n_embd))
    writer.add_head_count(int(config["n_head"]))
    writer.add_layer_norm_eps(float(config["layer_norm_epsilon"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tokens, types = vocab(model_dir, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ValueError(f"{model_dir}/tokenizer.json: no BPE merges found")
    special.add_to_gguf(writer)
    # Our tokenizer adds no BOS/EOS around a prompt; say so rather than rely on a default.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)

    names = gguf.TensorNameMap(arch, n_layer)
    for hf_name, data in sorted(read_safetensors(model_dir / "model.safetensors").items()):
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not weights
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        kind, name = found
        if hf_name.endswith(_CONV1D):
            data = data.T
        # convert_hf_to_gguf keeps 1-D tensors, norms and position embeddings in f32.
        as_f32 = data.ndim <= 1 or kind == gguf.MODEL_TENSOR.POS_EMBD
        writer.add_tensor(
            name, np.ascontiguousarray(data, dtype=np.float32 if as_f32 else np.float16)
        )

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: to_gguf.py <model_dir> <out.gguf>", file=sys.stderr)
        return 2
    convert(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
