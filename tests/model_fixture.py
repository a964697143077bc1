"""A tiny random GPT-2 in Hugging Face's layout, built without torch, for the model/engine tests.

The tokenizer is a real byte-level BPE trained here with `tokenizers` on a few lines that include
multi-byte characters, so some tokens are partial UTF-8. The weights are random but large enough
(std 0.3, random layer-norm gains) that the next-token distributions are far from uniform, which a
parity test needs to mean anything. `transformers` loads the very same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "café naïve – “quotes” 日本語 ü ö ä €",
] * 20

VOCAB = 320
CONFIG = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "layer_norm_epsilon": 1e-5,
    "model_type": "gpt2",
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "n_positions": 64,
    "tie_word_embeddings": True,
    "vocab_size": VOCAB,
}


def build_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """Write config.json, model.safetensors (float16, like the shipped model) and tokenizer.json."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    tokenizer.save(str(directory / "tokenizer.json"))

    rng = np.random.default_rng(seed)
    d, layers, ctx = CONFIG["n_embd"], CONFIG["n_layer"], CONFIG["n_positions"]
    assert isinstance(d, int)
    assert isinstance(layers, int)
    assert isinstance(ctx, int)

    def rand(*shape: int, scale: float = 0.3, mean: float = 0.0) -> np.ndarray:
        return (mean + scale * rng.standard_normal(shape)).astype(np.float16)

    tensors = {
        "transformer.wte.weight": rand(VOCAB, d),
        "transformer.wpe.weight": rand(ctx, d),
        "transformer.ln_f.weight": rand(d, mean=1.0),
        "transformer.ln_f.bias": rand(d),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        tensors |= {
            p + "ln_1.weight": rand(d, mean=1.0),
            p + "ln_1.bias": rand(d),
            p + "attn.c_attn.weight": rand(d, 3 * d),
            p + "attn.c_attn.bias": rand(3 * d),
            p + "attn.c_proj.weight": rand(d, d),
            p + "attn.c_proj.bias": rand(d),
            p + "ln_2.weight": rand(d, mean=1.0),
            p + "ln_2.bias": rand(d),
            p + "mlp.c_fc.weight": rand(d, 4 * d),
            p + "mlp.c_fc.bias": rand(4 * d),
            p + "mlp.c_proj.weight": rand(4 * d, d),
            p + "mlp.c_proj.bias": rand(d),
        }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2), encoding="utf-8")
    return directory
