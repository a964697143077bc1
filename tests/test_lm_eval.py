"""lm-evaluation-harness against `nbcompletions serve`, checked against its own `hf` model.

The harness's ``local-completions`` model scores a tiny local multiple-choice task
(tests/fixtures/lm_eval: a task YAML and its jsonl, no downloads) through a real `nbcompletions
serve`; its ``hf`` model scores the same task with transformers on the same model files. Every
per-choice loglikelihood must agree within 1e-3.

lm-eval pulls in torch, transformers, datasets and evaluate, so it lives in its own environment:
NBC_LMEVAL_PYTHON names that environment's Python (default: .venv-lmeval/bin/python in the
checkout, when present). Without it the test skips, saying why; with NBC_REQUIRE_LMEVAL=1 (CI) it
fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two harness runs (~100 s): CI and --full

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
MODEL_FILES = ROOT / "nbcompletions" / "model" / "files"
MODEL = "nbc-shakespeare"
TOLERANCE = 1e-3
#: Guards each harness run, so a hung run fails the test instead of stalling the suite.
RUN_GUARD_S = 900


@pytest.fixture(scope="session")
def lmeval_python() -> str:
    """The lm-eval environment's Python; checked before any server starts."""
    configured = os.environ.get("NBC_LMEVAL_PYTHON")
    candidate = configured or str(ROOT / ".venv-lmeval" / "bin" / "python")
    problem = None
    if not Path(candidate).exists():
        problem = (
            f"lm-evaluation-harness is not installed: no Python at {candidate} (set "
            "NBC_LMEVAL_PYTHON, or: python3 -m venv .venv-lmeval && .venv-lmeval/bin/pip install "
            "'lm-eval[api,hf]==0.4.13' torch==2.13.0)"
        )
    else:
        probe = subprocess.run(
            [candidate, "-c", "import lm_eval.models.openai_completions, transformers"],
            capture_output=True,
            text=True,
            timeout=RUN_GUARD_S,
        )
        if probe.returncode != 0:
            problem = f"{candidate} cannot import lm_eval: {probe.stderr.strip()[-500:]}"
    if problem is not None:
        if os.environ.get("NBC_REQUIRE_LMEVAL") == "1":  # CI: never skip silently
            pytest.fail(problem)
        pytest.skip(problem)
    return candidate


def _harness(python: str, model: str, model_args: str, out: Path, home: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENAI_API_KEY")}
    # Nothing may be downloaded: the task's data and the model files are local.
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(home),
        TOKENIZERS_PARALLELISM="false",
    )
    result = subprocess.run(
        [python, "run_harness.py", model, model_args, str(out)],
        cwd=FIXTURES,  # the task's data_files path is relative to its folder
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_GUARD_S,
    )
    assert result.returncode == 0, f"lm-eval {model} failed:\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())  # type: ignore[no-any-return]  # json.loads gives Any


def test_local_completions_scores_like_the_harness_hf_model(
    lmeval_python: str, live_server: str, tmp_path: Path
) -> None:
    python = lmeval_python
    api_args = ",".join(
        [
            f"model={MODEL}",
            f"base_url={live_server}/completions",
            "tokenizer_backend=huggingface",
            f"tokenizer={MODEL_FILES}",
            "num_concurrent=1",
            "max_retries=1",
            "max_length=256",
        ]
    )
    ours = _harness(python, "local-completions", api_args, tmp_path / "api.json", tmp_path / "hf")
    reference = _harness(
        python,
        "hf",
        f"pretrained={MODEL_FILES},dtype=float32",
        tmp_path / "hf.json",
        tmp_path / "hf",
    )
    got, want = ours["loglikelihoods"], reference["loglikelihoods"]
    assert isinstance(got, dict)
    assert isinstance(want, dict)
    assert len(want) == 24  # 8 documents x 3 choices
    assert got.keys() == want.keys()
    worst = max(abs(got[key] - want[key]) for key in want)
    assert worst <= TOLERANCE, {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > 1e-4}
    assert ours["acc"] == reference["acc"]
