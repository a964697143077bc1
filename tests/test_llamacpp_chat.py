"""Client.chat against a real llama.cpp server (llama-cpp-python) serving the embedded model
converted to GGUF, whose chat template came along from tokenizer_config.json (issue 17).

The same conversation on our embedded server and on the peer: the same greedy text, and the same
logprobs within the f16 tolerance, read from llama.cpp's chat shape (``bytes`` null there) into
the same frames. Skips where the peer's venv is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from peers.llamacpp import LlamaCppServer

from nbcompletions import Client

MESSAGES = [{"role": "user", "content": "What news, good sir?"}]
#: Greedy, with llama.cpp's own samplers off (what OpenAI's temperature 0 means).
FIELDS: dict[str, Any] = {"logprobs": True, "top_logprobs": 3, "max_tokens": 6, "temperature": 0}
LLAMACPP_OFF = {"top_k": 0, "min_p": 0, "repeat_penalty": 1}
TOL = 0.01  # f16 weights in both; llama.cpp accumulates differently


@pytest.fixture(scope="module")
def peer_client(llamacpp_server: LlamaCppServer, embedded_client: Client) -> Iterator[Client]:
    client = Client(
        llamacpp_server.base_url,
        model=llamacpp_server.model,
        api_key="unused",
        vocab_size=embedded_client.vocab_size,
    )
    yield client
    client.close()


def test_the_same_chat_on_the_peer_and_on_our_server(
    peer_client: Client, embedded_client: Client
) -> None:
    theirs = peer_client.chat(MESSAGES, extra=LLAMACPP_OFF, **FIELDS)
    ours = embedded_client.chat(MESSAGES, **FIELDS)
    assert theirs.text == ours.text
    assert theirs.tokens["token"].tolist() == ours.tokens["token"].tolist()
    np.testing.assert_allclose(theirs.tokens["logprob"], ours.tokens["logprob"], atol=TOL)
    np.testing.assert_allclose(
        theirs.tokens["entropy_high"], ours.tokens["entropy_high"], atol=10 * TOL
    )
    assert theirs.alternatives.groupby("position").size().eq(3).all()
    assert set(theirs.tokens["role"]) == {"assistant"}
    assert set(theirs.choices["api"]) == {"chat"}


def test_the_peers_chat_stream_merges_into_its_whole_answer(peer_client: Client) -> None:
    whole = peer_client.chat(MESSAGES, extra=LLAMACPP_OFF, **FIELDS)
    merged = peer_client.chat(MESSAGES, extra=LLAMACPP_OFF, stream=True, **FIELDS)
    assert merged.text == whole.text
    assert merged.tokens["token"].tolist() == whole.tokens["token"].tolist()
    np.testing.assert_allclose(merged.tokens["logprob"], whole.tokens["logprob"], atol=1e-6)
