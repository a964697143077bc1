"""The numpy GPT-2 against `transformers`: a recorded reference always, a live one where torch is.

torch and transformers are not in the dev extra (1 GB). `scripts/record_reference_logits.py`
recorded transformers' logits for the embedded model into tests/fixtures/reference_logits.json;
every run checks the numpy inference against it. The live check runs that script under a Python
with torch: NBC_TORCH_PYTHON (CI points it at .venv-lmeval), else NBC_LMEVAL_PYTHON or
.venv-lmeval, else this interpreter if it has torch. Without one it skips, saying why; with
NBC_REQUIRE_TORCH=1 (CI) it fails instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from model_fixture import build_tiny_model

from nbcompletions.model import FILES_DIR, load_engine
from nbcompletions.model._gpt2 import forward_full, load_weights

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "reference_logits.json"
SCRIPT = ROOT / "scripts" / "record_reference_logits.py"
TOLERANCE = 1e-4
RERECORD = "re-record it: python scripts/record_reference_logits.py (needs torch and transformers)"


def compare(model_dir: Path, reference: dict[str, Any]) -> int:
    """Check our logits against a recording; returns how many numbers were compared."""
    weights = load_weights(model_dir)
    probes = np.array(reference["probe_ids"])
    compared = 0
    for prompt in reference["prompts"]:
        ours = forward_full(weights, np.array([prompt["ids"]]))[0].astype(np.float64)
        for row in prompt["positions"]:
            logits = ours[row["position"]]
            where = f"prompt {prompt['text'] or prompt['ids'][:8]!r}, position {row['position']}"
            np.testing.assert_allclose(
                logits[row["top_ids"]], row["top_logits"], atol=TOLERANCE, rtol=0, err_msg=where
            )
            np.testing.assert_allclose(
                logits[probes], row["probe_logits"], atol=TOLERANCE, rtol=0, err_msg=where
            )
            top = logits.max()
            normaliser = top + np.log(np.exp(logits - top).sum())
            assert abs(normaliser - row["logsumexp"]) < TOLERANCE, where
            assert int(logits.argmax()) in row["top_ids"][:2], where  # ties may swap the first two
            compared += len(row["top_ids"]) + len(probes) + 1
    return compared


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return data


def test_the_reference_is_of_the_shipped_weights(reference: dict[str, Any]) -> None:
    import hashlib

    digest = hashlib.sha256((FILES_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert reference["model_sha256"] == digest, f"the model was retrained since; {RERECORD}"


def test_our_tokenizer_matches_the_recorded_transformers_one(reference: dict[str, Any]) -> None:
    engine = load_engine()
    for prompt in reference["prompts"]:
        assert engine.encode(prompt["text"]) == prompt["ids"], prompt["text"]


def test_logits_match_the_recorded_transformers_logits(reference: dict[str, Any]) -> None:
    assert len(reference["prompts"]) >= 3
    assert compare(FILES_DIR, reference) > 400
    # The reference is not flat: a uniform distribution would make the comparison meaningless.
    assert (
        max(abs(v) for p in reference["prompts"] for r in p["positions"] for v in r["top_logits"])
        > 1.0
    )


def test_the_comparison_catches_a_wrong_logit(reference: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(reference))
    broken["prompts"][0]["positions"][-1]["top_logits"][0] += 5 * TOLERANCE
    with pytest.raises(AssertionError):
        compare(FILES_DIR, broken)


# -- live, against transformers itself ---------------------------------------------------------
def _has_torch() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def torch_python() -> str:
    """A Python with torch and transformers, or skip (fail under NBC_REQUIRE_TORCH=1)."""
    candidates = [
        os.environ.get("NBC_TORCH_PYTHON"),
        os.environ.get("NBC_LMEVAL_PYTHON"),
        str(ROOT / ".venv-lmeval" / "bin" / "python"),
        sys.executable if _has_torch() else None,
    ]
    problems = []
    for candidate in filter(None, candidates):
        if not Path(candidate).exists():
            problems.append(f"no Python at {candidate}")
            continue
        probe = subprocess.run(
            [candidate, "-c", "import torch, transformers"], capture_output=True, text=True
        )
        if probe.returncode == 0:
            return candidate
        problems.append(f"{candidate} cannot import torch/transformers")
    problem = (
        "no Python with torch and transformers for the live parity check ("
        + ("; ".join(problems) or "none configured")
        + "): set NBC_TORCH_PYTHON; the recorded reference was checked"
    )
    if os.environ.get("NBC_REQUIRE_TORCH") == "1":  # CI: never skip silently
        pytest.fail(problem)
    pytest.skip(problem)


def record_live(python: str, model_dir: Path, out: Path, ids: list[list[int]] | None) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [python, str(SCRIPT), "--model-dir", str(model_dir), "--out", str(out)]
    if ids is not None:
        command += ["--ids", json.dumps(ids)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_logits_match_transformers_live(tmp_path: Path, reference: dict[str, Any]) -> None:
    python = torch_python()
    # The shipped model on the fixture's prompts (transformers' tokenizer included)...
    live = record_live(python, FILES_DIR, tmp_path / "shipped.json", None)
    assert [p["ids"] for p in live["prompts"]] == [p["ids"] for p in reference["prompts"]]
    assert compare(FILES_DIR, live) > 400
    # ...and a tiny random model with partial-UTF-8 tokens, on random ids.
    tiny = build_tiny_model(tmp_path / "tiny")
    config = json.loads((tiny / "config.json").read_text())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config["vocab_size"], (2, min(48, config["n_positions"]))).tolist()
    assert compare(tiny, record_live(python, tiny, tmp_path / "tiny.json", ids)) > 50
