"""Client.chat against a real vLLM server (CPU build) serving our model with the chat template of
its tokenizer_config.json (issue 17): the same conversation as a chat on vLLM, as a chat on our
server, and as a completion of `render_chat` on vLLM give the same greedy text and logprobs.

Uses the ``vllm_server`` fixture of tests/peers/vllm.py (branch peers); skips where that is not
there or vLLM's venv is not installed (CI runs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from nbcompletions import Client
from nbcompletions.model import render_chat

vllm_peer = pytest.importorskip("peers.vllm", reason="the vLLM peer's fixtures (branch peers)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MESSAGES = [{"role": "user", "content": "What news, good sir?"}]
FIELDS: dict[str, Any] = {"logprobs": True, "top_logprobs": 3, "max_tokens": 6, "temperature": 0}
#: float32 in both; measured 3.3e-6 at most (2026-12-07).
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def peer_client(vllm_server: Any, embedded_client: Client) -> Iterator[Client]:
    client = Client(
        vllm_server.base_url,
        model=vllm_server.model,
        max_retries=0,
        vocab_size=embedded_client.vocab_size,
    )
    yield client
    client.close()


def test_a_chat_on_vllm_is_ours_and_its_own_completion(
    peer_client: Client, embedded_client: Client
) -> None:
    theirs = peer_client.chat(MESSAGES, **FIELDS)
    ours = embedded_client.chat(MESSAGES, **FIELDS)
    completion = peer_client.complete(
        render_chat(MESSAGES), logprobs=3, max_tokens=6, temperature=0
    )
    assert theirs.text == ours.text == completion.text
    assert theirs.tokens["token"].tolist() == ours.tokens["token"].tolist()
    for other in (ours, completion):
        np.testing.assert_allclose(
            theirs.tokens["logprob"], other.tokens["logprob"], atol=LOGPROB_TOL
        )
    np.testing.assert_allclose(
        theirs.tokens["entropy_high"], ours.tokens["entropy_high"], atol=1e-3
    )
    assert not theirs.tokens["below_cap"].any()


def test_vllms_chat_stream_merges_into_its_whole_answer(peer_client: Client) -> None:
    whole = peer_client.chat(MESSAGES, **FIELDS)
    merged = peer_client.chat(MESSAGES, stream=True, **FIELDS)
    assert merged.text == whole.text
    assert merged.tokens["token"].tolist() == whole.tokens["token"].tolist()
