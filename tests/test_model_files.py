"""Consistency of the shipped model files (nbcompletions/model/files), without torch."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "nbcompletions" / "model" / "files"
SCRIPT = ROOT / "scripts" / "train_embedded_model.py"
EOT = "<|endoftext|>"
MAX_BYTES = 12 * 1000 * 1000
TARGET_NATS_PER_CHAR = 1.6


def _json(name: str) -> dict[str, Any]:
    data = json.loads((FILES / name).read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _json("config.json")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(FILES / "tokenizer.json"))


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    with safe_open(str(FILES / "model.safetensors"), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.fixture(scope="module")
def card() -> str:
    return (FILES / "README.md").read_text()


@pytest.fixture(scope="module")
def script() -> ModuleType:
    # The script imports torch only inside main(), so loading it here stays torch-free.
    spec = importlib.util.spec_from_file_location("train_embedded_model", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_config_is_gpt2(config: dict[str, Any]) -> None:
    assert config["model_type"] == "gpt2"
    assert config["architectures"] == ["GPT2LMHeadModel"]
    # The safetensors file has no lm_head.weight: loaders must tie it to wte.
    assert config.get("tie_word_embeddings", True) is True
    assert config["activation_function"] == "gelu_new"
    assert config["n_embd"] % config["n_head"] == 0
    assert config["n_positions"] >= 128


def test_tokenizer_vocab_matches_config(config: dict[str, Any], tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size(with_added_tokens=True) == config["vocab_size"]
    ids = set(tokenizer.get_vocab(with_added_tokens=True).values())
    assert ids == set(range(config["vocab_size"]))


def test_eot_token_matches_config(config: dict[str, Any], tokenizer: Tokenizer) -> None:
    eot = tokenizer.token_to_id(EOT)
    assert eot is not None
    assert config["eos_token_id"] == eot
    assert config["bos_token_id"] == eot
    # Written as text, the end-of-text marker is recognised as the one special token.
    assert tokenizer.encode(f"Exit.{EOT}").ids[-1] == eot
    generation = _json("generation_config.json")
    assert generation["eos_token_id"] == eot
    tok_config = _json("tokenizer_config.json")
    assert tok_config["eos_token"] == EOT


def test_tokenizer_is_byte_level_and_lossless(tokenizer: Tokenizer) -> None:
    text = "  Ham. To be, or not to be: that is the question.\n\nÆ café — naïve ✓ 𝄞\t"
    enc = tokenizer.encode(text)
    assert tokenizer.decode(enc.ids) == text
    # No prefix space is added (GPT-2 behaviour): "To" alone is not " To".
    assert tokenizer.decode(tokenizer.encode("To").ids) == "To"
    # Multi-token words exist, so the merges were really learned (not a byte vocabulary).
    assert len(tokenizer.encode(" the king").ids) == 2


def test_safetensors_match_config(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    d, v, ctx = config["n_embd"], config["vocab_size"], config["n_positions"]
    inner = config.get("n_inner") or 4 * d
    expected = {
        "transformer.wte.weight": (v, d),
        "transformer.wpe.weight": (ctx, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        expected.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, inner),
                p + "mlp.c_fc.bias": (inner,),
                p + "mlp.c_proj.weight": (inner, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    assert {k: t.shape for k, t in tensors.items()} == expected
    for name, t in tensors.items():
        assert t.dtype == np.float16, name
        assert np.isfinite(t).all(), name
    # Trained, not freshly initialised: init draws N(0, 0.02) and sets LayerNorm weights to 1.
    assert not np.allclose(tensors["transformer.ln_f.weight"], 1.0)


def test_size_within_budget() -> None:
    total = (FILES / "model.safetensors").stat().st_size + (FILES / "tokenizer.json").stat().st_size
    assert total <= MAX_BYTES


def test_card_states_results(
    card: str, tensors: dict[str, np.ndarray], tokenizer: Tokenizer
) -> None:
    assert "nbc-shakespeare" in card
    m = re.search(r"held-out cross-entropy \| \*\*([0-9.]+) nats/char\*\*", card)
    assert m is not None, "model card must state the held-out nats/char"
    assert 0.0 < float(m.group(1)) <= TARGET_NATS_PER_CHAR
    # The card describes these very files, not an earlier run.
    n_params = sum(t.size for t in tensors.values())
    assert f"| parameters | {n_params:,} |" in card
    weights_bytes = (FILES / "model.safetensors").stat().st_size
    assert f"{weights_bytes:,} bytes" in card
    assert f"id **{tokenizer.token_to_id(EOT)}**" in card


def test_card_names_held_out_works(card: str, script: ModuleType) -> None:
    held = re.search(r"\*\*Held out\*\*(.*?)\n- \*\*Training", card, re.S)
    train = re.search(r"\*\*Training\*\*(.*?)\n\n", card, re.S)
    assert held is not None
    assert train is not None
    for work in script.HELD_OUT:
        assert work in held.group(1)
        assert f"`{work}" not in train.group(1)


@pytest.mark.parametrize(
    ("modern", "folio"),
    [
        ("macbeth_gut", "macbeth_gut_f"),
        ("twelfth_night_gut", "twelfe-night_gut_f"),
        ("comedy_of_errors_gut", "comedy_of_errours_gut_f"),
        ("tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f"),
        ("alls_well_that_ends_well_gut", "all_is_well_that_ends_well_gut_f"),
    ],
)
def test_both_spellings_are_one_work(script: ModuleType, modern: str, folio: str) -> None:
    assert script.work_name(modern) == script.work_name(folio)


def test_unknown_corpus_file_is_rejected(script: ModuleType) -> None:
    with pytest.raises(ValueError, match="unexpected corpus file name 'notes'"):
        script.work_name("notes")


def test_reproduce_command_lists_changed_options(script: ModuleType) -> None:
    parser = script.build_parser()
    args = parser.parse_args(["--steps", "300", "--out", "/tmp/x", "--no-bf16", "--lr", "0.001"])
    assert script.reproduce_command(parser, args) == (
        "python scripts/train_embedded_model.py --steps 300 --lr 0.001 --no-bf16"
    )
    assert script.reproduce_command(parser, parser.parse_args([])) == (
        "python scripts/train_embedded_model.py"
    )
