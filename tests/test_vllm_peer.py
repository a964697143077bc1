"""A real vLLM server (CPU build 0.32.0) serving our model, through our Client: the smoke test.

Uses the ``vllm_server`` fixture (tests/peers/vllm.py; started once a session, about 2 minutes);
skips without vLLM's venv, saying how to get it, and fails under ``NBC_REQUIRE_VLLM=1`` (CI).
vLLM runs our Hugging Face files in float32 as we do, so greedy texts are the same and logprobs
agree to float32 rounding. The conformance report's own findings are asserted by the conformance
tests; here it must run to the end, and its cost is printed (``pytest -s``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from peers.vllm import VllmServer

from nbcompletions import Client, ConformanceReport

# Start-up takes about 2 minutes and both cores: the everyday run leaves it out, CI runs it.
# The first test also waits for the start-up (pytest-timeout counts fixture set-up).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = [
    "To be, or not to be, that is the question:",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
    "My lord, I",
]
#: float32 in both; measured 7.4e-6 at most over these prompts.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def peer_client(vllm_server: VllmServer) -> Iterator[Client]:
    client = Client(vllm_server.base_url, model=vllm_server.model, max_retries=0)
    yield client
    client.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_and_logprobs_are_ours(
    peer_client: Client, embedded_client: Client, prompt: str
) -> None:
    theirs = peer_client.complete(prompt, max_tokens=24, temperature=0, logprobs=5)
    mine = embedded_client.complete(prompt, max_tokens=24, temperature=0, logprobs=5)
    assert theirs.text == mine.text
    assert theirs.tokens["token"].tolist() == mine.tokens["token"].tolist()
    differences = np.abs(theirs.tokens["logprob"].to_numpy() - mine.tokens["logprob"].to_numpy())
    print(f"\n{prompt!r}: largest logprob difference {differences.max():.2e}")
    assert differences.max() <= LOGPROB_TOL
    their_alternatives = theirs.alternatives.sort_values(["position", "rank"])
    my_alternatives = mine.alternatives.sort_values(["position", "rank"])
    assert their_alternatives["token"].tolist() == my_alternatives["token"].tolist()


def test_conformance_report_runs(peer_client: Client) -> None:
    report: ConformanceReport = peer_client.conformance()
    print(f"\nvLLM conformance: {report.requests} requests, {report.seconds:.2f} s\n{report!r}")
    assert report.profile_name == "vllm"
    assert report.requests > 0
    assert report.status("echo_alignment") == "ok"
